"""`paratrain data check FILE [--tokenizer DIR] [--val_data_path FILE]`: the dataset's errors (FILE:LINE) or a
summary of what training will see: records, samples, branches per sample, token lengths, packing and padding.
`summarize()` is also what the server's /api/datasets/check returns."""

from __future__ import annotations

import argparse
import sys

import numpy as np
from pydantic import ValidationError

from trainer_core.config import SAMPLE_SHAPING_FIELDS, TrainConfig, add_cli_arguments, format_validation_error
from trainer_core.data import (DataError, build_samples, epoch_batches, has_tokenizer_files, load_or_tokenize,
                               load_tokenizer, local_model_dir, sample_lengths, sample_token_ids, split_validation,
                               validate_file)
from trainer_core.layout import FLEX_BLOCK_TOKENS, round_up, row_plan

EXAMPLE_MAX_COLUMNS = 48


def tokenising_progress(line: str) -> None:
    """A large file's tokenising, on stderr: silent for minutes otherwise. A cached one needs no word."""
    if not line.startswith("using cached tokens"):
        print(line, file=sys.stderr)


def summarize(cfg: TrainConfig, with_example: bool = True, log=None) -> dict:
    """Summary dict, or {"errors": ["FILE:LINE: ...", ...]} for a bad file; `log` takes the tokenising's
    progress lines (a large file takes minutes)."""
    warnings: list[str] = []
    try:
        ds = load_or_tokenize(cfg.data_path, cfg.base_model, cfg.max_seq_len, log=log, warnings=warnings)
    except DataError as e:
        return {"errors": e.lines}
    samples = build_samples(ds, cfg)
    held_out = 0
    if cfg.val_ratio > 0:   # the rest describes the samples trained on
        try:
            samples, validation = split_validation(samples, cfg.val_ratio, cfg.seed)
        except DataError as e:
            return {"errors": e.lines}
        held_out = len(validation)
    lengths = sample_lengths(ds, samples)
    # The main is not counted, so the histogram is on the scale of --max_branches_per_sample.
    branches = np.diff(samples.ptr)
    text_lens = np.diff(ds.text_offsets)
    text_lens = text_lens[text_lens > 0]
    hist = {int(k): int(v) for k, v in zip(*np.unique(branches, return_counts=True))}

    packed_slots = padded_slots = 0
    for batch in epoch_batches(samples, cfg, epoch=0):
        lens = [int(lengths[s]) for s in batch]
        rows, row_len = row_plan(lens, cfg.tokens_per_row, dense_attention=False)   # as on a GPU (flex)
        packed_slots += len(rows) * row_len
        # what padding every sample to the longest costs, in the same blocks
        padded_slots += len(lens) * round_up(max(lens), FLEX_BLOCK_TOKENS)
    total = int(lengths.sum())
    summary = {
        "data_path": cfg.data_path,
        "records": ds.num_records,
        "samples": len(samples),
        "validation_samples": held_out,
        "texts": int(branches.sum() + (samples.main >= 0).sum()),
        "mains": int((samples.main >= 0).sum()),
        "branches_histogram": hist,
        "token_length_percentiles": _percentiles(text_lens),
        "sample_token_percentiles": _percentiles(lengths),
        "tokens": total,
        "tokens_after_packing": packed_slots,
        "padding_share": round(1 - total / packed_slots, 4) if packed_slots else 0.0,
        "padding_share_if_padded_to_longest": round(1 - total / padded_slots, 4) if padded_slots else 0.0,
        "truncated_texts": int(ds.text_truncated.sum()),
        "errors": [],
        "warnings": warnings,
    }
    if with_example and len(samples):
        summary["example_layout"] = example_layout(ds, samples, cfg)
    return summary


def check_lines(path) -> dict:
    """Without a tokenizer, the lines only: {data_path, records (None for a bad file), errors, warnings}."""
    found = {"data_path": str(path), "records": None, "errors": [], "warnings": []}
    try:
        found["records"] = validate_file(path, warnings=found["warnings"])
    except DataError as e:
        found["errors"] = e.lines
    return found


def add_validation_file(found: dict, val_path) -> None:
    """The validation file's lines, as the trainer reads them, into a check's result (its samples are not
    summarised): `validation_records`, or its bad lines among `errors`; its warnings among `warnings`."""
    try:   # (a file summarize() found bad has errors alone)
        found["validation_records"] = validate_file(val_path, warnings=found.setdefault("warnings", []))
    except DataError as e:
        found["errors"] = [*found.get("errors", []), *e.lines]


def example_layout(ds, samples, cfg: TrainConfig, sample: int = 0) -> dict:
    """The first time steps of the main and of every branch of one sample (a long main would otherwise
    fill the window and hide the branches): which branch and time each token has, and its text."""
    from trainer_core.layout import build_sample_layout

    main, branches = sample_token_ids(ds, samples, sample)
    lay = build_sample_layout(main.astype(np.int64), [b.astype(np.int64) for b in branches], cfg.branch_stride)
    row = lay.branch_pos // cfg.branch_stride
    is_main = (row == 0) & bool(len(main))
    step_in_row = lay.time_ids - len(main) * (~is_main).long()      # branches start at time len(main)
    keep = step_in_row < EXAMPLE_MAX_COLUMNS
    tokenizer = load_tokenizer(cfg.base_model)
    ids = lay.input_ids[keep].tolist()
    return {
        "has_main": bool(len(main)),
        "branch_index": row[keep].tolist(),
        "time_ids": lay.time_ids[keep].tolist(),
        "tokens": [tokenizer.decode([i]) for i in ids],
        "columns_shown": int(lay.time_ids[keep].unique().numel()),   # time steps in the picture
        "columns_total": int(lay.time_ids.max()) + 1,
        "tokens_total": int(len(lay.input_ids)),                      # the whole sample's
    }


def _percentiles(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    p = np.percentile(values, [50, 90, 99])
    return {"p50": int(p[0]), "p90": int(p[1]), "p99": int(p[2]), "max": int(values.max())}


def format_summary(s: dict) -> str:
    hist = " ".join(f"{k}:{v}" for k, v in sorted(s["branches_histogram"].items()))
    t, st = s["token_length_percentiles"], s["sample_token_percentiles"]
    return "\n".join([
        f"{s['data_path']}: OK",
        *[f"  warning: {w}" for w in s["warnings"]],
        f"  records {s['records']:,} -> samples {s['samples']:,} ({s['texts']:,} texts"
        + (f", {s['mains']:,} of them mains)" if s.get("mains") else ")")
        + (f"; {s['validation_samples']:,} more held out for validation" if s.get("validation_samples") else ""),
        f"  branches per sample, main not counted (branches:samples): {hist}",
        f"  tokens per text   p50 {t['p50']}  p90 {t['p90']}  p99 {t['p99']}  max {t['max']}"
        f"  ({s['truncated_texts']} truncated)",
        f"  tokens per sample p50 {st['p50']}  p90 {st['p90']}  p99 {st['p99']}  max {st['max']}",
        f"  tokens {s['tokens']:,}; packed as on a GPU {s['tokens_after_packing']:,} slots: padding "
        f"{s['padding_share']:.1%} (padding to the longest sample would waste "
        f"{s['padding_share_if_padded_to_longest']:.1%})",
    ])


# --- CLI hooks: paratrain data check FILE [--tokenizer DIR] ------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    check = sub.add_parser("check", help="Validate a Parallel JSONL file and summarise it.")
    check.add_argument("file", help="Parallel JSONL file.")
    check.add_argument("--tokenizer", default=None, help="Model directory whose tokenizer to use (without it only "
                       "the lines are checked: no token lengths, samples or packing).")
    check.add_argument("--json", action="store_true", help="Print the summary as JSON.")
    add_cli_arguments(check, only=CHECK_FIELDS)


CHECK_FIELDS = (*SAMPLE_SHAPING_FIELDS, "val_data_path")   # a validation file's lines are checked too


def run(args: argparse.Namespace) -> int:
    import json

    overrides = {k: getattr(args, k) for k in CHECK_FIELDS if getattr(args, k) is not None}
    try:   # the flags are checked with or without a tokenizer: a bad one is never "valid"
        cfg = TrainConfig(base_model=args.tokenizer or "none", data_path=args.file, **overrides)
    except ValidationError as e:
        print(f"paratrain data check: {format_validation_error(e)}", file=sys.stderr)
        return 2
    if args.tokenizer is None:
        summary = check_lines(args.file)
    elif not has_tokenizer_files(local_model_dir(args.tokenizer)):
        print(f"--tokenizer {args.tokenizer}: not a model directory with tokenizer files, nor such a model in the "
              "local HuggingFace cache", file=sys.stderr)
        return 2
    else:
        summary = summarize(cfg, with_example=args.json, log=tokenising_progress)
    summary["validation_records"] = None
    if cfg.val_data_path:
        add_validation_file(summary, cfg.val_data_path)
    if summary["errors"]:
        print("\n".join(summary["errors"]), file=sys.stderr)
        return 2
    val_records = summary["validation_records"]
    plural = "s" if val_records != 1 else ""
    val_line = [f"  validation file {cfg.val_data_path}: {val_records:,} valid record{plural}"] if val_records else []
    if args.tokenizer is None:
        # the sample flags shape samples, which need tokens: given without a tokenizer, they are named as unused
        unused = ", ".join(f"--{k}" for k in overrides if k in SAMPLE_SHAPING_FIELDS)
        print(json.dumps({k: summary[k] for k in ("data_path", "records", "validation_records", "warnings")})
              if args.json else
              "\n".join([f"{args.file}: {summary['records']:,} valid records (give --tokenizer for samples, token "
                         "lengths and packing" + (f"; {unused}: no effect without it)" if unused else ")"),
                         *[f"  warning: {w}" for w in summary["warnings"]], *val_line]))
        return 0
    print(json.dumps(summary, indent=2) if args.json else "\n".join([format_summary(summary), *val_line]))
    return 0
