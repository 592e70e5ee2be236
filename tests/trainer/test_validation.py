"""The validation loss (--val_ratio, --val_data_path, --eval_interval), from real trainer processes on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from trainer_core.config import TrainConfig
from trainer_core.data import build_samples, collate_batch, load_or_tokenize, split_validation
from trainer_core.layout import IGNORE_INDEX
from trainer_core.model import load_adapter_dir, parallel_logits

pytestmark = pytest.mark.slow


def train(out, model, data, *flags) -> list[dict]:
    """`python -m trainer_core.train` with the guide's quick-start data flags; its metric records."""
    proc = subprocess.run([sys.executable, "-m", "trainer_core.train", "--base_model", str(model), "--data_path",
                           str(data), "--batch_size", "4", "--batch_by_samples", "--max_branches_per_sample", "8",
                           "--learning_rate", "2e-2", "--output_dir", str(out), *flags],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r for r in map(json.loads, proc.stdout.splitlines()) if "step" in r and "event" not in r]


def loss_per_token(model, ds, samples, cfg: TrainConfig) -> float:
    """The mean cross-entropy per label token over `samples`, one sample at a time from full logits: another
    way to the number than the trainer's (batched, packed, chunked)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(len(samples)):
            batch = collate_batch(ds, samples, [s], cfg)
            logits = parallel_logits(model, batch.input_ids, batch.pos1d, batch.branch_pos, batch.time_ids,
                                     batch.sample_ids)
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((batch.labels != IGNORE_INDEX).sum())
    return total / count


def test_held_out_samples_give_the_saved_adapters_loss_before_during_and_after_training(tmp_path, tiny_model_dir,
                                                                                      demo_data_path):
    out = tmp_path / "out"
    records = train(out, tiny_model_dir, demo_data_path, "--val_ratio", "0.2", "--max_steps", "7",
                    "--eval_interval", "3", "--log_interval", "2")
    # evaluated before the first step, every 3 steps and after the last; a step evaluated is logged even
    # off the log interval, and the validation loss is in metrics.jsonl as on stdout
    assert [r["step"] for r in records if r.get("val_loss") is not None] == [0, 3, 6, 7]
    assert [r["step"] for r in records] == [0, 2, 3, 4, 6, 7]
    assert [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] == records

    cfg = TrainConfig(base_model=str(tiny_model_dir), data_path=str(demo_data_path), max_branches_per_sample=8,
                      val_ratio=0.2)
    ds = load_or_tokenize(cfg.data_path, cfg.base_model, cfg.max_seq_len)
    _, held_out = split_validation(build_samples(ds, cfg), cfg.val_ratio, cfg.seed)
    model = load_adapter_dir(str(tiny_model_dir), out / "adapter")
    after = loss_per_token(model, ds, held_out, cfg)
    with model.disable_adapter():   # step 0: LoRA B starts at zero, so the base model (with the 2D RoPE patch)
        before = loss_per_token(model, ds, held_out, cfg)
    assert records[-1]["val_loss"] == pytest.approx(after, abs=2e-5)
    assert records[0]["val_loss"] == pytest.approx(before, abs=2e-5)
    assert records[0]["loss"] is None and after < before   # trained on the rest, it predicts the held-out better


def test_a_validation_file_changes_nothing_in_training_and_ranks_share_its_samples(tmp_path, tiny_model_dir,
                                                                                   demo_data_path):
    val_file = tmp_path / "val.jsonl"
    val_file.write_text("".join(line for i, line in enumerate(demo_data_path.read_text().splitlines(True)) if i % 7 == 0))
    common = ("--max_steps", "4", "--eval_interval", "2")
    plain = train(tmp_path / "plain", tiny_model_dir, demo_data_path, *common)
    validated = train(tmp_path / "val", tiny_model_dir, demo_data_path, *common, "--val_data_path", str(val_file))
    trained = [r for r in validated if r["step"] > 0]
    for key in ("loss", "grad_norm", "lr"):   # evaluating (eval mode, no gradients) leaves the training alone
        assert [r[key] for r in trained] == [r[key] for r in plain], key
    assert [r["step"] for r in validated if r.get("val_loss") is not None] == [0, 2, 4]

    # two ranks evaluate a share each: the same loss as one process, so every sample counts once
    ddp = subprocess.run([str(sys.executable.rsplit("/", 1)[0] + "/torchrun"), "--nproc_per_node", "2",
                          "-m", "trainer_core.train", "--base_model", str(tiny_model_dir), "--data_path",
                          str(demo_data_path), "--batch_size", "4", "--batch_by_samples", "--max_branches_per_sample",
                          "8", "--output_dir", str(tmp_path / "ddp"), "--max_steps", "1", "--val_data_path",
                          str(val_file), "--ddp"], capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    step0 = next(json.loads(line) for line in ddp.stdout.splitlines() if line.startswith('{"step": 0'))
    assert step0["val_loss"] == pytest.approx(validated[0]["val_loss"], abs=1e-5)
