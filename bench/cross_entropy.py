"""The LM-head cross-entropy alone, at the quick-start shape: time, peak memory and exactness per method.

The head of a 0.5B Qwen (896 x 151,936) is about a quarter of the model's matmuls, and its logits are the
largest tensors of a step. Methods, all on the same labelled hidden states:
  full logits       F.cross_entropy(lm_head(h).float(), y): every logit at once (the naive baseline)
  checkpointed      chunks of 2,048 tokens recomputed in backward (trainer_core before this bench)
  grad in forward   trainer_core.model.LinearCrossEntropy: chunks, gradient computed while the logits
                    exist, so backward recomputes nothing (shipped)
  liger             liger-kernel's fused linear cross-entropy (Triton), when installed and on CUDA

    python bench/cross_entropy.py                # CUDA: 7,000 labelled tokens; CPU: 2,048 (slow, ~1 min)
    python bench/cross_entropy.py --json bench/results/cross_entropy_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from results_file import write_json  # bench/ is on the path of a script run from it
from trainer_core.config import CE_CHUNK_TOKENS
from trainer_core.model import LinearCrossEntropy, checkpointed_cross_entropy


def methods(head: nn.Linear, chunk: int) -> dict:
    found = {
        "full logits": lambda h, y: F.cross_entropy(head(h).float(), y, reduction="sum"),
        "checkpointed": lambda h, y: checkpointed_cross_entropy(h, y, head, chunk),
        "grad in forward (shipped)": lambda h, y: LinearCrossEntropy.apply(h, head.weight, y, chunk, True),
    }
    if head.weight.is_cuda:
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
            liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
            found["liger fused linear CE"] = lambda h, y: liger(head.weight, h, y)
        except Exception as e:  # noqa: BLE001 - not carried, or not importable on this stack: say so, go on
            print(f"liger-kernel not available: {type(e).__name__}: {e}")
    return found


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, h: torch.Tensor, y: torch.Tensor, reps: int) -> dict:
    device = h.device
    times = []
    for i in range(reps + 1):   # the first call warms up (kernel autotuning, allocator)
        h.grad = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        sync(device)
        t0 = time.perf_counter()
        loss = fn(h, y)
        (loss / y.numel()).backward()
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else None
    return {"ms": statistics.median(times) * 1e3, "peak_gb": peak, "loss": float(loss.detach()),
            "grad": h.grad.detach().float().clone()}


HEADER = f"{'method':<28} {'ms fwd+bwd':>10} {'peak GiB':>8} {'loss diff':>10} {'grad err':>9}"


def print_row(r: dict) -> None:
    if "error" in r:
        print(f"{r['method']:<28} {r['error']}", flush=True)
        return
    peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
    print(f"{r['method']:<28} {r['ms']:>10.1f} {peak:>8} {r['loss_rel_diff']:>10.1e} {r['grad_rel_err']:>9.1e}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=None, help="labelled tokens (default 7000 on CUDA, 2048 on CPU)")
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10 on CUDA, 2 on CPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    n = args.tokens or (7000 if cuda else 2048)
    reps = args.reps or (10 if cuda else 2)
    g = torch.Generator(device=device).manual_seed(0)
    head = nn.Linear(args.hidden, args.vocab, bias=False, device=device, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        head.weight.normal_(0, 0.02, generator=g)
    h = torch.randn(n, args.hidden, device=device, dtype=dtype, generator=g).requires_grad_(True)
    y = torch.randint(0, args.vocab, (n,), device=device, generator=g)
    env = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "tokens": n, "hidden": args.hidden, "vocab": args.vocab, "dtype": str(dtype), "chunk": CE_CHUNK_TOKENS}
    print(json.dumps(env), flush=True)

    rows, reference = [], None

    def save() -> None:   # at the start and after every method: a run cut short keeps what it measured
        if args.json:
            write_json(args.json, {"env": env, "results": rows})

    save()
    print(HEADER, flush=True)
    for name, fn in methods(head, CE_CHUNK_TOKENS).items():
        try:
            r = measure(fn, h, y, reps)
            grad = r.pop("grad")
            reference = reference or (r["loss"], grad)
            r.update(method=name, loss_rel_diff=abs(r["loss"] - reference[0]) / abs(reference[0]),
                     grad_rel_err=float((grad - reference[1]).norm() / reference[1].norm()))
        except Exception as e:  # noqa: BLE001 - an unavailable kernel is a row, not the end of the run
            r = {"method": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"}
        rows.append(r)
        print_row(r)
        save()
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
