"""The real trainer command, end to end, at a model shape: what `bench/train_gpu.py` measures on the model
alone, here through `python -m trainer_core.train` (data, packing, BlockMask, optimiser, checkpoints).

Builds a random model directory of the shape (the demo tokenizer, no download) and the demo dataset, runs
the trainer with the guide's quick-start flags for a few steps, and prints the trainer's own tokens/s,
peak GPU memory and losses. The JSON summary is rewritten after every step, and `--timeout` (or a SIGTERM)
stops the trainer and leaves a summary of the steps so far with "timed_out": true.

    python bench/train_cli_smoke.py                          # 0.5B shape on CUDA, the tiny one on CPU
    python bench/train_cli_smoke.py --steps 30 --json out.json -- --compile
    python bench/train_cli_smoke.py --timeout 110 --json out.json   # inside a 120-s `timeout`
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_json  # noqa: E402
from train_gpu import SHAPES  # noqa: E402

from trainer_core.demo import make_demo_data, make_tiny_model  # noqa: E402

QUICK_START = ["--batch_by_samples", "--max_branches_per_sample", "16", "--min_branches_per_sample", "1",
               "--batch_size", "4", "--rope_2d_ratio", "0.5", "--lora_rank", "8", "--max_seq_len", "384"]


def make_model(out: Path, shape: str) -> Path:
    """The demo tokenizer with a random model of `shape` (its vocabulary is a superset of the tokenizer's)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    make_tiny_model(out)
    if shape != "tiny":
        tokenizer_config = json.loads((out / "config.json").read_text())
        config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768,
                             eos_token_id=tokenizer_config["eos_token_id"],
                             bos_token_id=tokenizer_config["bos_token_id"])
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return out


class Terminated(Exception):
    """SIGTERM (a shell `timeout`): stop the trainer, still write the summary."""


def on_sigterm(signum, frame) -> None:
    raise Terminated


def summarize(records: list[dict], shape: str, cuda: bool, flags: list[str], exit_code, wall: float,
              timed_out: bool) -> dict:
    # training steps: not the events, nor the validation before the first step (with --val_ratio)
    metrics = [r for r in records if "event" not in r and r.get("loss") is not None]
    timed = metrics[3:] or metrics  # the first steps compile kernels
    return {
        "shape": shape, "device": torch.cuda.get_device_name() if cuda else "cpu", "flags": flags,
        "exit_code": exit_code, "timed_out": timed_out, "steps": len(metrics), "wall_s": round(wall, 1),
        "tokens_per_s_median": round(statistics.median(m["tokens_per_s"] for m in timed)) if timed else None,
        "peak_gpu_mem_gb": max((m["gpu_mem_gb"] or 0 for m in metrics), default=None) if cuda else None,
        "first_loss": metrics[0]["loss"] if metrics else None, "last_loss": metrics[-1]["loss"] if metrics else None,
        "done": any(r.get("event") == "done" for r in records),
        # with --val_ratio: [step, validation loss] (step 0: before training), to check validation on the device
        "val_losses": [[r["step"], r["val_loss"]] for r in records if r.get("val_loss") is not None],
    }


def stop_after(proc: subprocess.Popen, seconds: float, fired: threading.Event) -> threading.Timer:
    """SIGTERM the trainer after `seconds` (it saves and exits at the next step), SIGKILL 10 s later."""
    def stop() -> None:
        fired.set()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    timer = threading.Timer(max(seconds, 0.0), stop)
    timer.daemon = True
    timer.start()
    return timer


def run_trainer(argv: list[str], stderr_path: Path, deadline: float, on_record) -> tuple[int | None, bool]:
    """Streams the trainer's JSON lines to `on_record` as they come. Returns (exit code, timed out)."""
    fired = threading.Event()
    with open(stderr_path, "w") as err, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True) as proc:
        timer = stop_after(proc, deadline - time.time(), fired)
        try:
            for line in proc.stdout:
                if line.startswith("{"):
                    on_record(json.loads(line))
            proc.wait()
        except Terminated:
            fired.set()
            proc.kill()
            proc.wait()
        finally:
            timer.cancel()
    return proc.returncode, fired.is_set()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: qwen2.5-0.5b on CUDA, else tiny")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps (default 20 on CUDA, 4 on CPU)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds for the whole run, model building included")
    ap.add_argument("--json", default=None)
    ap.add_argument("extra", nargs="*", help="more trainer flags, after --")
    args = ap.parse_args()
    started = time.time()
    deadline = started + args.timeout
    signal.signal(signal.SIGTERM, on_sigterm)
    cuda = torch.cuda.is_available()
    shape = args.shape or ("qwen2.5-0.5b" if cuda else "tiny")
    steps = args.steps or (20 if cuda else 4)
    records: list[dict] = []
    exit_code, timed_out = None, False

    def write() -> dict:
        summary = summarize(records, shape, cuda, args.extra, exit_code, time.time() - started, timed_out)
        if args.json:
            write_json(args.json, summary)
        return summary

    def on_record(record: dict) -> None:
        records.append(record)
        if "event" not in record:   # one line per step in the log, and the JSON as it stands
            val = f", val loss {record['val_loss']}" if record.get("val_loss") is not None else ""
            print(f"step {record.get('step')}: loss {record.get('loss')}{val}, {record.get('tokens_per_s')} tokens/s, "
                  f"peak {record.get('gpu_mem_gb')} GiB", flush=True)
            write()

    with tempfile.TemporaryDirectory(prefix="paratrain-smoke-") as tmp:
        work = Path(tmp)
        try:
            model = make_model(work / "model", shape)
            data = make_demo_data(work / "demo.jsonl")
            argv = [sys.executable, "-m", "trainer_core.train", "--base_model", str(model), "--data_path", str(data),
                    "--output_dir", str(work / "out"), "--max_steps", str(steps), "--log_interval", "1",
                    "--save_interval", "1000", *QUICK_START, *args.extra]
            if time.time() < deadline:
                exit_code, timed_out = run_trainer(argv, work / "stderr.txt", deadline, on_record)
            else:
                timed_out = True
        except Terminated:
            timed_out = True
        summary = write()
        print(json.dumps(summary), flush=True)
        ok = exit_code == 0 and summary["done"]
        if not ok and (work / "stderr.txt").exists():
            print((work / "stderr.txt").read_text()[-4000:], file=sys.stderr)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
