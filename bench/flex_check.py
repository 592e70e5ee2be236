"""Correctness of the CUDA training path in float32, in seconds: FlexAttention BlockMask vs SDPA, and no leaks.

The CPU test suite cannot run FlexAttention's backward (torch refuses it on CPU), and train_gpu.py's loss
cannot tell a wrong attention rule from bf16 noise (random 24-layer weights, LoRA B = 0 at step 1). So here,
on a small model in float32 with the quick-start's head layout and non-zero LoRA B (the adapters take part):
  1. the same samples and weights through the CUDA path (flex BlockMask, samples packed into long rows) and
     the CPU path (SDPA with a dense bool mask, rows cut at the longest sample) give the same loss and the
     same LoRA gradients, for two batches of different length (the second one compiles with dynamic shapes);
  2. changing one packed sample's tokens leaves the other samples of its row unchanged, and changes its own.
Prints PASS/FAIL per check, then `flex_check: PASS` or `flex_check: FAIL`; exits 1 on any FAIL.

    python bench/flex_check.py                        # CUDA: the real path (flex compiled by inductor)
    python bench/flex_check.py --backend aot_eager    # CPU: the same tracing (dynamo + AOTAutograd), eager maths
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from trainer_core.config import TrainConfig
from trainer_core.data import pack_layouts
from trainer_core.demo import make_tiny_model
from trainer_core.layout import build_sample_layout
from trainer_core.model import ParallelBranchLM, hidden_states, load_base_model, prepare_for_training

# Qwen2.5-0.5B's attention layout: 14 query heads share 2 K/V heads. 14 is not a power of two, so transformers
# would expand K/V before calling flex; trainer_core's flex_attention_shared_kv lets flex share them
# (enable_gqa=True), the code path the 0.5B model takes.
QUERY_HEADS, KV_HEADS = 14, 2
LOSS_TOL = 1e-5       # relative, float32
GRAD_TOL = 1e-3       # relative L2 error of each LoRA gradient
LEAK_TOL = 1e-5       # absolute, on the other samples' final hidden states


def make_check_model(out_dir: Path, head_dim: int, layers: int = 2) -> Path:
    return make_tiny_model(out_dir, hidden_size=QUERY_HEADS * head_dim, num_layers=layers,
                           num_heads=QUERY_HEADS, num_kv_heads=KV_HEADS)


def compile_flex_with(backend: str, patch=setattr) -> None:
    """transformers compiles flex with inductor, which has no flex backward on CPU; aot_eager traces the same
    graphs (dynamo + AOTAutograd, as on CUDA) and runs them with eager maths. `patch`: pytest's
    monkeypatch.setattr in tests, so that it is undone afterwards."""
    import torch.nn.attention.flex_attention as torch_flex
    import transformers.integrations.flex_attention as hf_flex

    compiled = torch.compile(torch_flex.flex_attention, backend=backend)
    patch(hf_flex, "compile_friendly_flex_attention", lambda q, k, v, training=False, **kw: compiled(q, k, v, **kw))


def allow_flex_backward_on_cpu(patch=setattr) -> None:
    """torch refuses flex backward on CPU outright; its maths (the eager HOP) is the same on every device."""
    import torch.nn.attention.flex_attention as torch_flex

    refuse = torch_flex._validate_device
    patch(torch_flex, "_validate_device", lambda q, k, v: refuse(q.detach(), k.detach(), v.detach()))


def random_samples(n: int, vocab: int, seed: int, max_branches: int = 6, max_len: int = 40) -> list[tuple]:
    """n samples (main, branches): a main of 0..max_len tokens and 1..max_branches branches of 4..max_len."""
    g = torch.Generator().manual_seed(seed)

    def draw(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    def ids(lo: int) -> list[int]:
        return torch.randint(1, vocab, (draw(lo, max_len),), generator=g).tolist()
    return [(ids(0), [ids(4) for _ in range(draw(1, max_branches))]) for _ in range(n)]


def layouts_of(samples: list[tuple]) -> list:
    return [build_sample_layout(main, branches) for main, branches in samples]


def build(model_dir: Path, attn: str, device: torch.device):
    """The trainer's LoRA model in float32, with the same non-zero LoRA B for every attention backend."""
    cfg = TrainConfig(base_model=str(model_dir), data_path="unused", lora_rank=8, rope_2d_ratio=0.5, dtype="float32")
    torch.manual_seed(0)
    model = prepare_for_training(load_base_model(str(model_dir), device, torch.float32, attn), cfg).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:   # PEFT starts B at zero, which would leave the adapters out of the loss
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    return model


def pack(samples: list[tuple], device: torch.device, dense: bool):
    """The trainer's packing rule per backend; with flex, all these small samples share one row."""
    return pack_layouts(layouts_of(samples), 4096, dense).to(device)


def loss_and_grads(model, samples: list[tuple], device: torch.device, dense: bool):
    """One training forward + backward as the trainer does it: (mean loss, LoRA gradients, row shape)."""
    batch = pack(samples, device, dense)
    model.zero_grad(set_to_none=True)
    loss = ParallelBranchLM(model)(**vars(batch)) / batch.num_label_tokens
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, tuple(batch.input_ids.shape)


def compare_flex_with_sdpa(flex, sdpa, samples: list[tuple], device: torch.device) -> tuple[bool, str]:
    lf, gf, shape_f = loss_and_grads(flex, samples, device, dense=False)
    ls, gs, shape_s = loss_and_grads(sdpa, samples, device, dense=True)
    if gf.keys() != gs.keys() or not gs:
        return False, f"different parameters have LoRA gradients ({len(gf)} flex vs {len(gs)} sdpa)"
    loss_err = abs(lf - ls) / abs(ls)
    grad_err = max(float((gf[n] - gs[n]).norm() / gs[n].norm().clamp_min(1e-30)) for n in gs)
    ok = loss_err <= LOSS_TOL and grad_err <= GRAD_TOL
    return ok, (f"rows flex {shape_f} sdpa {shape_s}; loss {lf:.6f} vs {ls:.6f} (rel diff {loss_err:.1e}, "
                f"tol {LOSS_TOL:.0e}); max LoRA-grad rel err {grad_err:.1e} over {len(gs)} tensors (tol {GRAD_TOL:.0e})")


def check_no_leak(flex, samples: list[tuple], device: torch.device, vocab: int) -> tuple[bool, str]:
    """Change every token of the last sample. Lengths stay the same, so the packing and the shapes do too
    (nothing compiles again), and the tokens that differ mark where that sample sits in its row."""
    def final_hidden(batch):
        inputs = {k: v for k, v in vars(batch).items() if k != "labels"}
        with torch.enable_grad():   # the training graph, already compiled (no_grad would compile another one)
            return hidden_states(flex, **inputs).detach()

    def shift(ids: list[int]) -> list[int]:
        return [t % (vocab - 1) + 1 for t in ids]   # 1..vocab-1 onto itself, no token stays the same

    main, branches = samples[-1]
    before = pack(samples, device, dense=False)
    after = pack(samples[:-1] + [(shift(main), [shift(b) for b in branches])], device, dense=False)
    moved = (final_hidden(before) - final_hidden(after)).abs().amax(-1)
    row, col = (before.input_ids != after.input_ids).nonzero()[0].tolist()
    mine = torch.zeros_like(before.sample_ids, dtype=torch.bool)
    mine[row] = before.sample_ids[row] == before.sample_ids[row, col]
    others = (before.sample_ids >= 0) & ~mine
    neighbours = int(others[row].sum())
    if not neighbours:
        return False, "the changed sample shares its row with no other sample: nothing to check"
    leak, own = float(moved[others].max()), float(moved[mine].max())
    ok = leak <= LEAK_TOL and own > 1e-3
    return ok, (f"the {neighbours} tokens of other samples in its row moved by {leak:.1e} (tol {LEAK_TOL:.0e}); "
                f"the changed sample's own by {own:.1e} (must be > 1e-3)")


def checks(flex, sdpa, device: torch.device, samples_per_batch: int = 4) -> list[tuple]:
    """(name, check) pairs, cheapest first: the leak check reuses the first batch's compiled shapes, the
    second batch is longer, so flex compiles again with dynamic shapes (as in training from step 2 on)."""
    vocab = flex.get_base_model().config.vocab_size
    first, longer = (random_samples(samples_per_batch * k, vocab, seed=k) for k in (1, 2))
    return [("flex vs sdpa, batch 1", lambda: compare_flex_with_sdpa(flex, sdpa, first, device)),
            ("no leak between packed samples", lambda: check_no_leak(flex, first, device, vocab)),
            ("flex vs sdpa, batch 2 (dynamic shapes)", lambda: compare_flex_with_sdpa(flex, sdpa, longer, device))]


def run_checks(named_checks: list[tuple]) -> bool:
    """Prints each check's PASS/FAIL as soon as it is done (a run cut short keeps them); True if all passed."""
    passed = True
    for name, check in named_checks:
        t0 = time.perf_counter()
        try:
            ok, detail = check()
        except Exception as e:  # noqa: BLE001 - a kernel that does not compile is a FAIL with its reason
            traceback.print_exc(file=sys.stderr)
            ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail} ({time.perf_counter() - t0:.1f} s)", flush=True)
        passed &= ok
    return passed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default=None,
                    help="compile flex with this torch.compile backend (CPU: aot_eager, the default there); "
                         "default on CUDA: transformers' own compile (inductor), the path training takes")
    ap.add_argument("--head-dim", type=int, default=64, help="64 as in Qwen2.5-0.5B; smaller is faster on CPU")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = args.backend or (None if device.type == "cuda" else "aot_eager")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # float32 means float32
    if device.type == "cpu":
        allow_flex_backward_on_cpu()
    if backend:
        compile_flex_with(backend)
    import transformers

    print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "torch": torch.__version__, "transformers": transformers.__version__, "backend": backend or "inductor",
                      "heads": f"{QUERY_HEADS} query / {KV_HEADS} K/V of {args.head_dim}"}), flush=True)
    with tempfile.TemporaryDirectory(prefix="flex-check-") as tmp:
        model_dir = make_check_model(Path(tmp), args.head_dim)
        transformers.utils.logging.disable_progress_bar()   # make_tiny_model turns it back on; noise in the log
        warnings.filterwarnings("ignore", category=FutureWarning)
        flex, sdpa = build(model_dir, "flex_attention", device), build(model_dir, "sdpa", device)
        passed = run_checks(checks(flex, sdpa, device))
    print(f"flex_check: {'PASS' if passed else 'FAIL'}", flush=True)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
