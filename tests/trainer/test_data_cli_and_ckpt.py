"""`paratrain data check` as users run it, and gradient checkpointing giving the same gradients."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_core.config import TrainConfig
from trainer_core.data import DataError
from trainer_core.layout import build_sample_layout, collate_packed
from trainer_core.model import ParallelBranchLM, load_base_model, prepare_for_training

PARATRAIN = str(Path(sys.executable).parent / "paratrain")


def test_data_check_summarises_a_good_file(tiny_model_dir, demo_data_path):
    proc = subprocess.run([PARATRAIN, "data", "check", str(demo_data_path), "--tokenizer", str(tiny_model_dir),
                           "--max_branches_per_sample", "16", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    n_lines = sum(1 for _ in open(demo_data_path))
    assert s["records"] == n_lines and s["errors"] == []
    assert sum(int(v) for v in s["branches_histogram"].values()) == s["samples"]
    assert 0 <= s["padding_share"] < s["padding_share_if_padded_to_longest"]
    assert s["token_length_percentiles"]["p50"] <= s["token_length_percentiles"]["max"]
    lay = s["example_layout"]
    assert len(lay["tokens"]) == len(lay["time_ids"]) == len(lay["branch_index"])
    first = json.loads(open(demo_data_path).readline())   # the example is the first sample: every row shows
    rows = len(first["branches"]) + bool(first.get("main"))
    assert sorted(set(lay["branch_index"])) == list(range(rows))


def test_the_checks_packing_numbers_are_the_gpu_trainers_rows(tiny_model_dir, demo_data_path):
    """tokens_after_packing counts the slots of the rows the trainer builds on a GPU (flex: rows filled up to
    tokens_per_row, in 128-token blocks), batch by batch; the flags that shape batches change it."""
    from trainer_core.data import build_samples, collate_batch, epoch_batches, load_or_tokenize
    from trainer_core.data_cli import summarize

    for fields in ({}, {"batch_size": 3, "tokens_per_row": 512}, {"batch_by_samples": True, "batch_size": 2}):
        cfg = TrainConfig(base_model=str(tiny_model_dir), data_path=str(demo_data_path), max_seq_len=128, **fields)
        ds = load_or_tokenize(cfg.data_path, cfg.base_model, cfg.max_seq_len)
        samples = build_samples(ds, cfg)
        rows = [collate_batch(ds, samples, b, cfg, dense_attention=False) for b in epoch_batches(samples, cfg, 0)]
        s = summarize(cfg, with_example=False)
        assert s["tokens_after_packing"] == sum(r.input_ids.numel() for r in rows), fields
        assert s["tokens"] == sum(r.num_tokens for r in rows), fields


def test_data_check_describes_the_samples_trained_on_and_counts_those_held_out(tiny_model_dir, demo_data_path):
    from trainer_core.data import build_samples, load_or_tokenize, sample_lengths, split_validation
    from trainer_core.data_cli import format_summary, summarize

    cfg = TrainConfig(base_model=str(tiny_model_dir), data_path=str(demo_data_path), max_seq_len=128)
    whole = summarize(cfg, with_example=False)
    held = summarize(cfg.model_copy(update={"val_ratio": 0.2}), with_example=False)
    assert whole["validation_samples"] == 0 and held["validation_samples"] == round(0.2 * whole["samples"])
    assert held["samples"] + held["validation_samples"] == whole["samples"]
    ds = load_or_tokenize(cfg.data_path, cfg.base_model, cfg.max_seq_len)
    kept, _ = split_validation(build_samples(ds, cfg), 0.2, cfg.seed)
    assert held["tokens"] == int(sample_lengths(ds, kept).sum()) < whole["tokens"]   # the training part's
    assert f"; {held['validation_samples']} more held out for validation" in format_summary(held)
    assert "held out" not in format_summary(whole)
    too_many = summarize(cfg.model_copy(update={"val_ratio": 0.999}), with_example=False)
    assert "none is left to train on" in too_many["errors"][0]


def test_data_check_takes_every_flag_that_shapes_samples(tiny_model_dir, demo_data_path):
    from trainer_core.config import SAMPLE_SHAPING_FIELDS

    proc = subprocess.run([PARATRAIN, "data", "check", "--help"], capture_output=True, text=True, timeout=60)
    assert all(f"--{name}" in proc.stdout for name in SAMPLE_SHAPING_FIELDS), proc.stdout
    proc = subprocess.run([PARATRAIN, "data", "check", str(demo_data_path), "--tokenizer", str(tiny_model_dir),
                           "--json", "--branch_stride", "64", "--batch_by_samples", "--seed", "5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["samples"] > 0


def test_data_check_lists_bad_lines(tmp_path, tiny_model_dir):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n{"branches": "not a list"}\n{"text": "ok"}\n')
    proc = subprocess.run([PARATRAIN, "data", "check", str(f), "--tokenizer", str(tiny_model_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"{f}:2: 'branches' must be a list of strings, got a string"


def test_data_check_without_a_tokenizer_checks_the_lines(tmp_path, demo_data_path):
    proc = subprocess.run([PARATRAIN, "data", "check", str(demo_data_path), "--json"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout)["records"] == sum(1 for _ in open(demo_data_path))
    # the sample flags need tokens: without a tokenizer they are named as not counted, not silently dropped
    proc = subprocess.run([PARATRAIN, "data", "check", str(demo_data_path), "--val_ratio", "0.1"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--val_ratio: no effect without it" in proc.stdout, proc.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"branches": 3}\n')
    proc = subprocess.run([PARATRAIN, "data", "check", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"{bad}:2: 'branches' must be a list of strings, got a number"


def test_data_check_reads_the_validation_files_lines_too(tmp_path, tiny_model_dir, demo_data_path):
    val = tmp_path / "val.jsonl"
    val.write_text('{"text": "held out"}\n{"main": "a", "branches": ["b", "c"]}\n')
    bad = tmp_path / "bad_val.jsonl"
    bad.write_text('{"text": "ok"}\n{"main": 3}\n')
    for tokenizer in ([], ["--tokenizer", str(tiny_model_dir)]):
        check = [PARATRAIN, "data", "check", str(demo_data_path), *tokenizer, "--val_data_path"]
        proc = subprocess.run([*check, str(val)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and f"validation file {val}: 2 valid records" in proc.stdout, proc.stderr
        proc = subprocess.run([*check, str(val), "--json"], capture_output=True, text=True, timeout=120)
        assert json.loads(proc.stdout)["validation_records"] == 2
        proc = subprocess.run([*check, str(bad)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip() == f"{bad}:2: 'main' must be a string, got a number"
    proc = subprocess.run([*check, str(val), "--val_ratio", "0.1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "give one of them" in proc.stderr


def test_data_check_names_a_bad_tokenizer_or_flag_without_a_traceback(tmp_path, demo_data_path):
    for extra, message in [(["--tokenizer", str(tmp_path / "nope")], f"--tokenizer {tmp_path / 'nope'}: not a model"),
                           (["--tokenizer", str(tmp_path), "--max_seq_len", "0"], "max_seq_len: Input should be"),
                           (["--max_seq_len", "-5"], "max_seq_len: Input should be")]:   # also without a tokenizer
        proc = subprocess.run([PARATRAIN, "data", "check", str(demo_data_path), *extra],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model_dir):
    batch = collate_packed([build_sample_layout([1, 2, 3], [[4, 5, 6], [7, 8]]),
                            build_sample_layout([], [[9, 10, 11, 12]])], tokens_per_row=64)
    grads = []
    for ckpt in (False, True):
        cfg = TrainConfig(base_model=str(tiny_model_dir), data_path="unused", gradient_checkpointing=ckpt)
        torch.manual_seed(0)
        model = prepare_for_training(load_base_model(str(tiny_model_dir), torch.device("cpu"), torch.float32, "sdpa"), cfg)
        loss = ParallelBranchLM(model)(**vars(batch))
        loss.backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert abs(grads[0][0] - grads[1][0]) < 1e-6
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads[0][1].values())


def test_lora_weights_of_other_modules_or_rank_are_refused_by_name(tmp_path, tiny_model_dir):
    """A .pth from another config must not load half-way (PEFT keeps fresh LoRA init for missing keys)."""
    import pytest

    from trainer_core.data import DataError
    from trainer_core.model import build_lora_model, load_pth, lora_state_dict

    cfg = TrainConfig(base_model=str(tiny_model_dir), data_path="unused.jsonl", lora_rank=4)
    weights = lora_state_dict(build_lora_model(cfg, torch.device("cpu")))
    good = tmp_path / "good.pth"
    torch.save(weights, good)
    assert load_pth(str(tiny_model_dir), good, cfg) is not None

    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in weights.items() if "q_proj" not in k}, partial)
    with pytest.raises(DataError, match=r"partial\.pth: LoRA weights for other modules.*q_proj"):
        load_pth(str(tiny_model_dir), partial, cfg)
    with pytest.raises(DataError, match=r"good\.pth: LoRA weights of another shape.*size mismatch"):
        load_pth(str(tiny_model_dir), good, cfg.model_copy(update={"lora_rank": 8}))


def test_data_check_counts_branches_without_the_main_and_warns_of_ignored_keys(tmp_path, tiny_model_dir):
    """The histogram is on --max_branches_per_sample's scale (a main is not a branch), a text of exactly
    max_seq_len tokens is not truncated, and keys paratrain ignores are a warning (exit 0)."""
    f = tmp_path / "d.jsonl"
    lines = [{"main": "m", "branches": ["a", "b", "c", "d"], "source": "x"}, {"text": "z" * 16}, {"text": "z" * 17}]
    f.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = [PARATRAIN, "data", "check", str(f), "--tokenizer", str(tiny_model_dir), "--max_seq_len", "16",
            "--max_branches_per_sample", "4", "--min_branches_per_sample", "2"]
    proc = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["branches_histogram"] == {"4": 1, "2": 1} and s["texts"] == 7
    assert s["truncated_texts"] == 1
    assert s["warnings"] == [f"{f}: 1 record has keys paratrain ignores: source (first on line 1)"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "branches per sample, main not counted (branches:samples): 2:1 4:1" in proc.stdout
    assert "warning: " in proc.stdout and "(1 truncated)" in proc.stdout


def test_a_misspelled_module_in_a_target_list_is_an_error_not_dropped(tiny_model_dir):
    """PEFT drops a listed name that matches nothing when another name matches: q_proj,vproj trained q_proj
    alone, while the log and adapter_config.json still listed vproj."""
    cfg = TrainConfig(base_model=str(tiny_model_dir), data_path="d", lora_target_modules="q_proj,vproj")
    with pytest.raises(DataError, match="vproj"):
        prepare_for_training(load_base_model(str(tiny_model_dir), torch.device("cpu"), torch.float32, "sdpa"), cfg)
