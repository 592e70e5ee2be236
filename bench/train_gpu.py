"""Training throughput and memory: a naive baseline vs trainer_core as shipped, in one run.

Builds the guide's quick-start shape with random weights (no download): Qwen2.5-0.5B shape, LoRA r8 on all
linear layers, 4 samples per step of 1..16 branches of 32..384 tokens, rope_2d_ratio 0.5, bf16 on CUDA.
  (a) naive: every sample padded to the longest in its step, a dense float [B,1,T,T] mask, full logits;
  (b) trainer_core: samples packed into rows, FlexAttention BlockMask on CUDA (SDPA + bool mask on CPU),
      chunked cross-entropy, the same LoRA and 2D RoPE.
Then a token-budget sweep of (b). Prints valid tokens/s, MFU against a measured matmul peak, peak memory
and padding share; checks that (a) and (b) give the same loss on the same batch.

    python bench/train_gpu.py                       # on a GPU: the 0.5B shape
    python bench/train_gpu.py --shape tiny          # on CPU: the same table for the tiny model
    python bench/train_gpu.py --json bench/results/train_gpu_h100.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from trainer_core.config import TrainConfig
from trainer_core.data import pack_layouts
from trainer_core.layout import IGNORE_INDEX, build_sample_layout
from trainer_core.model import ParallelBranchLM, compute_adapters_in_model_dtype, prepare_for_training
from trainer_core.rope2d import stack_position_ids

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
}


def random_steps(n_steps: int, samples_per_step: int, vocab: int, seed: int = 0):
    """Each step: a list of samples, each a list of 1..16 branches of 32..384 random token ids."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(n_steps):
        step = []
        for _ in range(samples_per_step):
            k = int(torch.randint(1, 17, (1,), generator=g))
            step.append([torch.randint(0, vocab, (int(torch.randint(32, 385, (1,), generator=g)),), generator=g)
                         for _ in range(k)])
        steps.append(step)
    return steps


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(shape: str, device: torch.device, dtype: torch.dtype, attn: str, cfg: TrainConfig,
                peft_default: bool = False):
    """The trainer's model; `peft_default` puts back PEFT's own float32 adapter math (the naive baseline)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        base = Qwen2ForCausalLM(config).to(dtype)
    base.config._attn_implementation = attn
    torch.manual_seed(1)
    model = prepare_for_training(base, cfg)
    if peft_default:
        compute_adapters_in_model_dtype(model, enabled=False)
    return model


# --- (a) the naive baseline, written here on purpose ---------------------------------------------------

def naive_batch(step):
    """Every sample in its own row, padded to the longest sample; dense float mask (0 / -inf)."""
    layouts = [build_sample_layout(None, branches) for branches in step]
    T = max(len(lay) for lay in layouts)
    B = len(layouts)
    ids = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    pos, branch, time_ids = (torch.zeros(B, T, dtype=torch.long) for _ in range(3))
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, lay in enumerate(layouts):
        n = len(lay)
        ids[b, :n], labels[b, :n], pos[b, :n] = lay.input_ids, lay.labels, lay.pos1d
        branch[b, :n], time_ids[b, :n], valid[b, :n] = lay.branch_pos, lay.time_ids, True
    allowed = (time_ids[:, None, :] < time_ids[:, :, None]) & valid[:, None, :] & valid[:, :, None]
    allowed |= torch.eye(T, dtype=torch.bool)
    return ids, labels, pos, branch, time_ids, allowed, int(valid.sum())


def naive_loss(model, ids, labels, pos, branch, time_ids, allowed, dtype):
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    out = model(input_ids=ids, attention_mask=mask.unsqueeze(1), position_ids=stack_position_ids(pos, branch, time_ids))
    logits = out.logits.float()                                  # full [B,T,V] logits in float32
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


# --- timing --------------------------------------------------------------------------------------------

def run_variant(name, model, steps, device, loss_fn, warmup: int, flops_per_token: float, peak_tflops: float):
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens = slots = 0
    t0 = None
    first_loss = None
    for i, step in enumerate(steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
            tokens = slots = 0
        loss_sum, n_labels, n_tokens, n_slots = loss_fn(step)
        (loss_sum / n_labels).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if first_loss is None:
            first_loss = float(loss_sum.detach()) / n_labels
        tokens += n_tokens
        slots += n_slots
    sync(device)
    dt = time.perf_counter() - t0
    tps = tokens / dt
    return {
        "variant": name, "valid_tokens_per_s": round(tps), "mfu": round(tps * flops_per_token / (peak_tflops * 1e12), 4),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else None,
        "padding_share": round(1 - tokens / slots, 4), "tokens_per_step": round(tokens / (len(steps) - warmup)),
        "first_step_loss": round(first_loss, 5),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: qwen2.5-0.5b on CUDA, tiny on CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on CUDA, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--samples-per-step", type=int, default=4)
    ap.add_argument("--sweep", default="8192,16384,32768", help="token budgets per step for (b); empty: skip")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    shape = args.shape or ("qwen2.5-0.5b" if cuda else "tiny")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    steps_n = args.steps or (10 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    cfg = TrainConfig(base_model=shape, data_path="random", lora_rank=8, rope_2d_ratio=0.5,
                      dtype="bfloat16" if dtype == torch.bfloat16 else "float32", tokens_per_row=32768)
    vocab = SHAPES[shape]["vocab_size"]
    steps = random_steps(warmup + steps_n, args.samples_per_step, vocab)
    peak = matmul_peak_tflops(device, dtype)
    probe = build_model(shape, torch.device("meta"), dtype, "sdpa", cfg)
    n_params = sum(p.numel() for n, p in probe.named_parameters() if "lora_" not in n)
    del probe
    flops_per_token = 4 * n_params   # forward 2N + input-gradient backward 2N; frozen weights need no weight grads
    env = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "shape": shape,
           "dtype": str(dtype), "matmul_peak_tflops": round(peak, 1), "flops_per_token": flops_per_token}
    print(json.dumps(env))
    results = []

    def free():
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    def save() -> None:  # after every variant: a run cut short by a time limit still leaves its numbers
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"env": env, "results": results}, f, indent=2)

    def record(name: str, run) -> dict:
        """Runs one variant; an error (OOM, a kernel that does not compile here) is a row, not the end."""
        try:
            r = run()
        except torch.OutOfMemoryError:
            r = {"variant": name, "error": "out of memory"}
        except Exception as e:  # noqa: BLE001 - reported in the table, traceback on stderr
            traceback.print_exc(file=sys.stderr)
            r = {"variant": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}
        results.append(r)
        free()
        save()
        return r

    if not args.skip_naive:
        model = build_model(shape, device, dtype, "sdpa", cfg, peft_default=True)

        def naive_step(step):
            ids, labels, pos, branch, time_ids, allowed, n_tok = naive_batch(step)
            t = [x.to(device) for x in (ids, labels, pos, branch, time_ids, allowed)]
            loss = naive_loss(model, *t, dtype)
            return loss, int((labels != IGNORE_INDEX).sum()), n_tok, ids.numel()
        record("(a) naive", lambda: run_variant("(a) naive: padded rows, dense float mask, full logits", model,
                                                 steps, device, naive_step, warmup, flops_per_token, peak))
        del model
        free()

    def packed_runner(model, budget, dense: bool):
        lm = ParallelBranchLM(model)

        def step_fn(step):
            layouts = [build_sample_layout(None, b) for b in step]
            batch = pack_layouts(layouts, budget, dense).to(device)   # the trainer's own packing rule
            return lm(**vars(batch)), batch.num_label_tokens, batch.num_tokens, batch.input_ids.numel()
        return step_fn

    def packed_variant(name: str, attn: str, adapter_dtype: str, run_steps, budget: int,
                       compile_layers: bool = False) -> dict:
        def run():
            options = {"adapter_dtype": adapter_dtype, "compile": compile_layers}
            model = build_model(shape, device, dtype, attn, cfg.model_copy(update=options))
            return run_variant(name, model, run_steps, device, packed_runner(model, budget, attn != "flex_attention"),
                               warmup, flops_per_token, peak)
        return record(name, run)

    attn = "flex_attention" if cuda else "sdpa"
    shipped = packed_variant(f"(b) trainer_core: packed rows, {attn}, chunked CE", attn, "float32", steps, 32768)
    if cuda and "error" in shipped:  # flex failed on this stack: the SDPA path still gives a number
        packed_variant("(b) trainer_core, SDPA fallback", "sdpa", "float32", steps, 32768)
    candidates = [("", "float32", False, shipped)]
    if cuda:   # the options a user can turn on: bf16 adapter weights, compiled layers (warm-up steps compile)
        candidates.append((", bf16 adapters", "model", False,
                           packed_variant("(b') trainer_core, --adapter_dtype model", attn, "model", steps, 32768)))
        candidates.append((", --compile", "float32", True,
                           packed_variant("(b'') trainer_core, --compile", attn, "float32", steps, 32768, True)))
    ok = [c for c in candidates if "error" not in c[3]]
    label, best_dtype, best_compile, _ = max(ok, key=lambda c: c[3]["valid_tokens_per_s"]) if ok else candidates[0]
    for budget in [int(x) for x in args.sweep.split(",") if x]:
        per_step = max(1, round(budget / 7300 * args.samples_per_step))
        sweep_steps = random_steps(warmup + steps_n, per_step, vocab, seed=budget)
        packed_variant(f"(b) sweep ~{budget} tokens/step ({per_step} samples){label}",
                       attn, best_dtype, sweep_steps, max(budget, 16384), best_compile)

    print(f"{'variant':<62} {'tokens/s':>9} {'MFU':>6} {'peak GB':>8} {'pad':>6} {'tok/step':>8} {'loss@1':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<62} {r['error']}")
            continue
        mem = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}"
        print(f"{r['variant']:<62} {r['valid_tokens_per_s']:>9,} {r['mfu']:>6.1%} {mem:>8} "
              f"{r['padding_share']:>6.1%} {r['tokens_per_step']:>8,} {r['first_step_loss']:>8.4f}")
    if not args.skip_naive and len(results) >= 2 and "error" not in results[0] and "error" not in results[1]:
        speedup = results[1]["valid_tokens_per_s"] / results[0]["valid_tokens_per_s"]
        dloss = abs(results[0]["first_step_loss"] - results[1]["first_step_loss"])
        print(f"trainer_core / naive: {speedup:.2f}x tokens/s; same-batch loss difference {dloss:.2e}")
        env.update(speedup=round(speedup, 3), loss_difference=dloss)
    save()


if __name__ == "__main__":
    main()
