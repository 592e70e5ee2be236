"""Collator throughput for the guide's quick-start shape, on this machine's CPU.

Samples of 1..16 branches of 32..384 tokens (no main, as text records are grouped), 4 samples per step.
Prints samples/s for: layout only; layout + packing into rows (what the training loop does per step
on every device); and, for reference, + the dense [B,1,T,T] SDPA mask that the CPU path builds (CUDA
builds a FlexAttention BlockMask on the GPU instead).

    .venv/bin/python bench/layout.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from trainer_core.layout import build_sample_layout, collate_packed, columnar_mask


def random_samples(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 17, (1,), generator=g))
        lens = torch.randint(32, 385, (k,), generator=g).tolist()
        out.append([torch.randint(0, 150_000, (n_tok,), generator=g) for n_tok in lens])
    return out


def rate(fn, samples, batch, seconds) -> tuple[float, float]:
    done, tokens, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in range(0, len(samples), batch):
            tokens += fn(samples[i:i + batch])
            done += len(samples[i:i + batch])
        if time.perf_counter() - t0 >= seconds:
            break
    dt = time.perf_counter() - t0
    return done / dt, tokens / dt


def layout_only(chunk):
    return sum(len(build_sample_layout(None, branches)) for branches in chunk)


def layout_and_pack(chunk):
    return collate_packed([build_sample_layout(None, b) for b in chunk], tokens_per_row=16384).num_tokens


def with_dense_mask(chunk):
    batch = collate_packed([build_sample_layout(None, b) for b in chunk], tokens_per_row=16384)
    columnar_mask(batch.time_ids, batch.sample_ids)
    return batch.num_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)   # one collator thread, as the reference's single DataLoader worker
    samples = random_samples(256)
    mean_branches = sum(len(s) for s in samples) / len(samples)
    print(f"shape: 1..16 branches (mean {mean_branches:.1f}) of 32..384 tokens, {args.batch} samples/step, "
          f"torch {torch.__version__}, 1 thread")
    print(f"{'variant':<40} {'samples/s':>10} {'tokens/s':>12}")
    for name, fn in [("layout + labels", layout_only), ("layout + labels + packing (train path)", layout_and_pack),
                     ("... + dense SDPA bool mask (CPU only)", with_dense_mask)]:
        s, t = rate(fn, samples, args.batch, args.seconds)
        print(f"{name:<40} {s:>10,.0f} {t:>12,.0f}")
    print("reference collator (MEASUREMENTS.md, 2-core CPU): ~25 samples/s")


if __name__ == "__main__":
    main()
