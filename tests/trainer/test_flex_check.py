"""bench/flex_check.py is the first check of the one GPU run: it must pass on the shipped path and fail on a
wrong attention rule. On CPU flex is compiled with aot_eager: the CUDA path's tracing (dynamo + AOTAutograd,
BlockMask, backward), eager maths instead of Triton."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import trainer_core.model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import flex_check  # noqa: E402

CPU = torch.device("cpu")


def no_branch_rule(time_ids, sample_ids):
    """Plain causal order within a sample: branches see their siblings' earlier tokens."""
    T = time_ids.shape[1]
    same = (sample_ids[:, :, None] == sample_ids[:, None, :]) & (sample_ids[:, :, None] >= 0)
    return (same & torch.ones(T, T, dtype=torch.bool).tril()).unsqueeze(1) | torch.eye(T, dtype=torch.bool)


def no_sample_rule(time_ids, sample_ids):
    """The columnar time rule across the whole row: samples packed together see each other."""
    T = time_ids.shape[1]
    return ((time_ids[:, None, :] < time_ids[:, :, None]) | torch.eye(T, dtype=torch.bool)).unsqueeze(1)


def test_flex_check_passes_on_cpu_and_fails_on_a_wrong_rule(tmp_path, monkeypatch):
    flex_check.allow_flex_backward_on_cpu(monkeypatch.setattr)
    flex_check.compile_flex_with("aot_eager", monkeypatch.setattr)
    model_dir = flex_check.make_check_model(tmp_path / "model", head_dim=16)
    flex, sdpa = (flex_check.build(model_dir, attn, CPU) for attn in ("flex_attention", "sdpa"))
    named = flex_check.checks(flex, sdpa, CPU)
    assert flex_check.run_checks(named[:2])   # the third, a longer batch, runs the same code for 8 s more

    # The same checks see a wrong rule (put into the dense SDPA path, which needs no new compile).
    vocab = flex.get_base_model().config.vocab_size
    samples = flex_check.random_samples(4, vocab, seed=1)
    monkeypatch.setattr(trainer_core.model, "columnar_mask", no_branch_rule)
    ok, detail = flex_check.compare_flex_with_sdpa(flex, sdpa, samples, CPU)
    assert not ok, detail
    monkeypatch.setattr(trainer_core.model, "columnar_mask", no_sample_rule)
    ok, detail = flex_check.check_no_leak(sdpa, samples, CPU, vocab)
    assert not ok, detail
