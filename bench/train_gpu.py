"""Training throughput and memory: a naive baseline vs trainer_core as shipped, in one run.

Builds the guide's quick-start shape with random weights (no download): Qwen2.5-0.5B shape, LoRA r8 on all
linear layers, 4 samples per step of 1..16 branches of 32..384 tokens, rope_2d_ratio 0.5, bf16 on CUDA.
  (a) naive: every sample padded to the longest in its step, a dense float [B,1,T,T] mask, full logits;
  (b) trainer_core: samples packed into rows, FlexAttention BlockMask on CUDA (SDPA + bool mask on CPU),
      chunked cross-entropy, the same LoRA and 2D RoPE.
Then (b) with the options a user can turn on, and a token-budget sweep of the fastest. Prints valid tokens/s
(median over steps), MFU against a matmul peak measured in the same run, peak memory and padding share;
the speedup of (b) over (a) is written as soon as (b) is done.

    python bench/train_gpu.py                       # on a GPU: the 0.5B shape
    python bench/train_gpu.py --shape tiny          # on CPU: the same table for the tiny model
    python bench/train_gpu.py --json bench/results/train_gpu_h200.json   # named after the card
    python bench/train_gpu.py --variants naive,shipped --json r.json     # issue 5's numbers first, then
    python bench/train_gpu.py --variants options,sweep --json r.json --append   # the rest, as rows of r.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from results_file import write_json  # bench/ is on the path of a script run from it
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


VARIANTS = ("naive", "shipped", "options", "sweep")
# Every sample of a sweep step in one row: the row count stays 1, so flex never compiles again inside the timed
# steps for a new batch dimension (a long row costs flex only its samples' own blocks).
ONE_ROW = 1 << 20
# Dense bf16 tensor-core rate of an H100 SXM; an H200 has the same SMs and clocks (more memory bandwidth only).
DATASHEET_BF16_TFLOPS = 989.4
FLOPS_NOTE = ("flops/token = 4 x non-LoRA parameters (forward 2N + input-gradient backward 2N; frozen weights get "
              "no weight gradient); attention's own FLOPs are left out, so MFU reads a few to ~15 % low")


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The MFU denominator, measured here. A GPU idles at a low clock and ramps up under load, so warm up for
    a second before timing, and time enough products (~0.3 s on an H100) that the ramp cannot hide in them."""
    cuda = device.type == "cuda"
    n, warm_s, reps = (8192, 1.0, 200) if cuda else (1024, 0.1, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    until = time.perf_counter() + warm_s
    while time.perf_counter() < until:
        for _ in range(10):
            a @ b
        sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


class StepClock:
    """Per-step times without a host sync per step, which would stop the CPU from packing the next batch
    while the GPU works: CUDA events on the GPU's timeline, read once at the end; perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def gb(n_bytes: int) -> float:
    return round(n_bytes / 2**30, 2)   # GiB, like the trainer, the VRAM estimate and MEASUREMENTS.md


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
    cuda = device.type == "cuda"
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock(device)
    step_tokens, slots, first_loss = [], 0, None
    for i, step in enumerate(steps):
        if i >= warmup:
            clock.mark()
        loss_sum, n_labels, n_tokens, n_slots = loss_fn(step)
        (loss_sum / n_labels).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if first_loss is None:
            first_loss = float(loss_sum.detach()) / n_labels
        if i >= warmup:
            step_tokens.append(n_tokens)
            slots += n_slots
    clock.mark()
    seconds = clock.seconds()
    # the median step: a compile or allocator hiccup in one timed step does not move it
    tps = statistics.median(n / s for n, s in zip(step_tokens, seconds))
    return {
        "variant": name, "valid_tokens_per_s": round(tps), "mfu": round(tps * flops_per_token / (peak_tflops * 1e12), 4),
        "mfu_vs_datasheet": round(tps * flops_per_token / (DATASHEET_BF16_TFLOPS * 1e12), 4) if cuda else None,
        "valid_tokens_per_s_mean": round(sum(step_tokens) / sum(seconds)),
        "step_ms": [round(s * 1e3, 1) for s in seconds],
        # GiB; allocated is what tensors hold, reserved adds the allocator's cached slack
        "peak_mem_gb": gb(torch.cuda.max_memory_allocated()) if cuda else None,
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if cuda else None,   # for readers of decimal GB
        "peak_reserved_gb": gb(torch.cuda.max_memory_reserved()) if cuda else None,
        "padding_share": round(1 - sum(step_tokens) / slots, 4), "tokens_per_step": round(statistics.mean(step_tokens)),
        "first_step_loss": round(first_loss, 5),
    }


# --- the run ---------------------------------------------------------------------------------------------

class Bench:
    """One benchmark run: settings, rows (each with a `key`), and the JSON rewritten after every row, so a run
    cut short by a time limit keeps what it measured. With `append`, rows go on after an earlier run's rows in
    the same JSON (its matmul peak is reused, and its (b) row decides flex or SDPA for the rest)."""

    def __init__(self, args):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.shape = args.shape or ("qwen2.5-0.5b" if self.cuda else "tiny")
        self.dtype = getattr(torch, args.dtype or ("bfloat16" if self.cuda else "float32"))
        self.warmup = args.warmup if args.warmup is not None else (3 if self.cuda else 1)
        # 30 on CUDA: fewer steps' mean tokens/step strays far from the shape's ~7,000 (seed 0's first 10: 6,005)
        self.n_steps = args.steps or (30 if self.cuda else 3)
        self.samples_per_step = args.samples_per_step
        self.vocab = SHAPES[self.shape]["vocab_size"]
        self.cfg = TrainConfig(base_model=self.shape, data_path="random", lora_rank=8, rope_2d_ratio=0.5,
                               dtype="bfloat16" if self.dtype == torch.bfloat16 else "float32", tokens_per_row=32768)
        self.steps = random_steps(self.warmup + self.n_steps, self.samples_per_step, self.vocab)
        self.json = Path(args.json) if args.json else None
        earlier = json.loads(self.json.read_text()) if args.append and self.json and self.json.exists() else None
        self.env = earlier["env"] if earlier else self.measure_env()
        self.results: list[dict] = earlier["results"] if earlier else []
        print(json.dumps(self.env), flush=True)
        print(FLOPS_NOTE, flush=True)

    def measure_env(self) -> dict:
        probe = build_model(self.shape, torch.device("meta"), self.dtype, "sdpa", self.cfg)
        n_params = sum(p.numel() for n, p in probe.named_parameters() if "lora_" not in n)
        return {"device": torch.cuda.get_device_name() if self.cuda else "cpu", "torch": torch.__version__,
                "shape": self.shape, "dtype": str(self.dtype),
                "matmul_peak_tflops": round(matmul_peak_tflops(self.device, self.dtype), 1),
                "datasheet_bf16_tflops": DATASHEET_BF16_TFLOPS if self.cuda else None,
                "flops_per_token": 4 * n_params, "flops_note": FLOPS_NOTE}

    def row(self, key: str) -> dict | None:
        return next((r for r in self.results if r.get("key") == key), None)

    @property
    def attn(self) -> str:
        """flex on CUDA, unless the shipped flex row failed there: then the rest runs SDPA instead of
        compiling a failing kernel again for every variant."""
        shipped = self.row("shipped")
        if not self.cuda or (shipped is not None and "error" in shipped):
            return "sdpa"
        return "flex_attention"

    def save(self) -> None:
        if self.json:
            write_json(self.json, {"env": self.env, "results": self.results})

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def record(self, key: str, name: str, run) -> dict:
        """Runs one variant; an error (OOM, a kernel that does not compile here) is a row, not the end."""
        at_start = gb(torch.cuda.memory_allocated()) if self.cuda else None   # left over from earlier variants
        try:
            r = run()
        except torch.OutOfMemoryError:
            r = {"variant": name, "error": "out of memory"}
        except Exception as e:  # noqa: BLE001 - reported in the table, traceback on stderr
            traceback.print_exc(file=sys.stderr)
            r = {"variant": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}
        r.update(key=key, mem_at_start_gb=at_start)
        self.results.append(r)
        self.free()
        self.save()
        print_row(r)
        return r

    def naive(self) -> None:
        def run():
            model = build_model(self.shape, self.device, self.dtype, "sdpa", self.cfg, peft_default=True)

            def step_fn(step):
                ids, labels, pos, branch, time_ids, allowed, n_tok = naive_batch(step)
                t = [x.to(self.device) for x in (ids, labels, pos, branch, time_ids, allowed)]
                return naive_loss(model, *t, self.dtype), int((labels != IGNORE_INDEX).sum()), n_tok, ids.numel()
            return self.timed("(a) naive: padded rows, dense float mask, full logits", model, self.steps, step_fn)
        self.record("naive", "(a) naive", run)

    def timed(self, name: str, model, steps, step_fn) -> dict:
        return run_variant(name, model, steps, self.device, step_fn, self.warmup, self.env["flops_per_token"],
                           self.env["matmul_peak_tflops"])

    def packed(self, key: str, name: str, steps, budget: int, adapter_dtype: str = "float32",
               compile_layers: bool = False) -> dict:
        attn = self.attn

        def run():
            options = {"adapter_dtype": adapter_dtype, "compile": compile_layers}
            model = build_model(self.shape, self.device, self.dtype, attn, self.cfg.model_copy(update=options))
            lm = ParallelBranchLM(model)

            def step_fn(step):
                layouts = [build_sample_layout(None, b) for b in step]
                batch = pack_layouts(layouts, budget, attn != "flex_attention").to(self.device)  # the trainer's rule
                return lm(**vars(batch)), batch.num_label_tokens, batch.num_tokens, batch.input_ids.numel()
            return self.timed(name, model, steps, step_fn)
        return self.record(key, name, run)

    def shipped(self) -> None:
        r = self.packed("shipped", f"(b) trainer_core: packed rows, {self.attn}, chunked CE", self.steps, 32768)
        if "error" in r and self.cuda:   # flex failed on this stack (self.attn is sdpa now): still a number
            self.packed("shipped_sdpa", "(b) trainer_core, SDPA fallback", self.steps, 32768)

    def options(self) -> None:
        """The options a user can turn on: bf16 adapter weights, compiled layers (warm-up steps compile)."""
        for key, (mark, flag, options) in OPTIONS.items():
            self.packed(key, f"(b{mark}) trainer_core, {flag}", self.steps, 32768, **options)

    def sweep(self, budgets: list[int]) -> None:
        key = self.fastest()
        _, flag, options = OPTIONS.get(key, ("", "", {}))
        flags = f", {flag}" if flag else ""
        for budget in budgets:
            per_step = max(1, round(budget / 7300 * self.samples_per_step))
            steps = random_steps(self.warmup + self.n_steps, per_step, self.vocab, seed=budget)
            self.packed(f"sweep_{budget}", f"(b) sweep ~{budget} tokens/step ({per_step} samples){flags}", steps,
                        ONE_ROW, **options)

    def fastest(self) -> str:
        ok = [r for r in self.results if r.get("key") in ("shipped", "shipped_sdpa", *OPTIONS) and "error" not in r]
        return max(ok, key=lambda r: r["valid_tokens_per_s"])["key"] if ok else "shipped"

    def acceptance(self) -> str | None:
        """Issue 5's numbers from the (a) and (b) rows, into the JSON at once."""
        naive, shipped = self.row("naive"), self.row("shipped")
        if shipped is not None and "error" in shipped:
            shipped = self.row("shipped_sdpa")
        if not naive or not shipped or "error" in naive or "error" in shipped:
            return None
        speedup = shipped["valid_tokens_per_s"] / naive["valid_tokens_per_s"]
        dloss = abs(naive["first_step_loss"] - shipped["first_step_loss"])
        self.env.update(speedup=round(speedup, 3), loss_difference=dloss, speedup_of=shipped["key"])
        self.save()
        memory = (f"{shipped['peak_mem_gb']} GiB allocated / {shipped['peak_reserved_gb']} GiB reserved at peak (<= 16)"
                  if self.cuda else "no GPU memory figures")
        fallback = " (SDPA: flex failed on this stack)" if shipped["key"] == "shipped_sdpa" else ""
        return (f"trainer_core{fallback} / naive: {speedup:.2f}x tokens/s; same-batch loss difference {dloss:.2e}"
                f"\nissue 5 (H100 targets): {shipped['valid_tokens_per_s']:,} tokens/s (>= 40,000), {memory}, "
                f"{speedup:.2f}x naive (>= 2), {shipped['tokens_per_step']:,} tokens/step (~7,300 in the reference)")


# (b)'s options, by row key: (mark in the row's name, the trainer flag, Bench.packed's arguments)
OPTIONS = {"adapter_model": ("'", "--adapter_dtype model", {"adapter_dtype": "model"}),
           "compile": ("''", "--compile", {"compile_layers": True})}
HEADER = f"{'variant':<62} {'tokens/s':>9} {'MFU':>6} {'peak GiB':>8} {'pad':>6} {'tok/step':>8} {'loss@1':>8}"


def print_row(r: dict) -> None:
    if "error" in r:
        print(f"{r['variant']:<62} {r['error']}", flush=True)
        return
    mem = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}"
    print(f"{r['variant']:<62} {r['valid_tokens_per_s']:>9,} {r['mfu']:>6.1%} {mem:>8} "
          f"{r['padding_share']:>6.1%} {r['tokens_per_step']:>8,} {r['first_step_loss']:>8.4f}", flush=True)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: qwen2.5-0.5b on CUDA, tiny on CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on CUDA, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--samples-per-step", type=int, default=4)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"which of {', '.join(VARIANTS)} to run, in that order (options: (b') and (b''))")
    ap.add_argument("--sweep", default="8192,16384,32768", help="token budgets per step for the sweep")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--json", default=None, help="also write the results here (rewritten after every variant)")
    ap.add_argument("--append", action="store_true", help="add the rows to --json's earlier run instead")
    args = ap.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS) - {""}
    if unknown:
        ap.error(f"--variants: unknown {', '.join(sorted(unknown))} (choose from {', '.join(VARIANTS)})")
    return args


def main() -> None:
    args = parse_args()
    wanted = set(args.variants.split(","))
    bench = Bench(args)
    print(HEADER, flush=True)
    if "naive" in wanted:
        bench.naive()
    if "shipped" in wanted:
        bench.shipped()
        print(bench.acceptance() or "no speedup: (a) or (b) has no number", flush=True)
    if "options" in wanted and bench.cuda:
        bench.options()
    if "sweep" in wanted:
        bench.sweep([int(x) for x in args.sweep.split(",") if x])

    print("\n" + HEADER)
    for r in bench.results:
        print_row(r)
    summary = bench.acceptance()
    if summary:
        print(summary)


if __name__ == "__main__":
    main()
