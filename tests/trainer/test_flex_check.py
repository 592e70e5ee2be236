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


def test_flex_shares_kv_heads_instead_of_copying_them(tmp_path, monkeypatch):
    """transformers copies Qwen2.5-0.5B's 2 K/V heads to its 14 query heads before calling flex; the shipped
    path lets flex share them (enable_gqa): the same loss and gradients, 12 fewer K/V heads kept for backward."""
    from transformers import AttentionInterface
    from transformers.integrations import flex_attention as hf_flex

    flex_check.allow_flex_backward_on_cpu(monkeypatch.setattr)
    flex_check.compile_flex_with("aot_eager", monkeypatch.setattr)
    model_dir = flex_check.make_check_model(tmp_path / "model", head_dim=16)
    model = flex_check.build(model_dir, "flex_attention", CPU)
    samples = flex_check.random_samples(4, model.get_base_model().config.vocab_size, seed=1)

    def train_step(attention):
        monkeypatch.setitem(AttentionInterface._global_mapping, "flex_attention", attention)
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.untyped_storage().nbytes()) or t,
                                                      lambda t: t):
            loss, grads, shape = flex_check.loss_and_grads(model, samples, CPU, dense=False)
        return loss, grads, shape, sum(kept)

    copied = train_step(hf_flex.flex_attention_forward)
    shared = train_step(trainer_core.model.flex_attention_shared_kv)
    assert shared[0] == copied[0] and shared[1].keys() == copied[1].keys()
    for name, grad in copied[1].items():
        torch.testing.assert_close(shared[1][name], grad, rtol=1e-5, atol=1e-7)
    layers, tokens = 2, copied[2][0] * copied[2][1]
    fewer = layers * 2 * tokens * (flex_check.QUERY_HEADS - flex_check.KV_HEADS) * 16 * 4   # K and V, float32
    assert copied[3] - shared[3] >= 0.9 * fewer, (copied[3], shared[3], fewer)
