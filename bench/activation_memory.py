"""Activation memory per token and layer, counted on any device (CPU included): the bytes autograd keeps
for backward in one training forward of the quick-start shape, for each way of running the adapters.

Every tensor saved for backward passes through `torch.autograd.graph.saved_tensors_hooks`; distinct
storages that are not parameters are summed. Running the model with 1 and then 2 decoder layers and taking
the difference gives the cost of one layer, which is what grows with depth. This is what a GPU's peak
memory is made of, apart from weights, the cross-entropy chunk and allocator slack, so it shows on a
laptop what an option saves on an H100.

    python bench/activation_memory.py                 # Qwen2.5-0.5B shape, bf16, one quick-start step
    python bench/activation_memory.py --json bench/results/activation_memory_cpu.json

On CPU the attention is SDPA with a dense mask (FlexAttention has no backward there); the dense mask is
shared by all layers, so the per-layer number is the same as for the CUDA path up to the K/V head
expansion SDPA does for grouped-query attention (about 3 KB per token and layer for this shape).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_gpu import SHAPES, random_steps  # noqa: E402  (the same shapes and random steps as the speed bench)

from trainer_core.config import TrainConfig  # noqa: E402
from trainer_core.layout import build_sample_layout, collate_packed  # noqa: E402
from trainer_core.model import (attention_mask_for, compute_adapters_in_model_dtype, hidden_states,  # noqa: E402
                                prepare_for_training)
from trainer_core.rope2d import stack_position_ids  # noqa: E402

MODES = {
    # name: (adapter_dtype, PEFT's float32 input upcast, gradient checkpointing)
    "float32 adapters, PEFT upcast (PEFT's default)": ("float32", True, False),
    "float32 adapters, computed in bf16 (shipped)": ("float32", False, False),
    "bf16 adapters (--adapter_dtype model)": ("model", False, False),
    "shipped + --gradient_checkpointing": ("float32", False, True),
}


def saved_bytes(shape: dict, layers: int, adapter_dtype: str, upcast: bool, ckpt: bool, batch) -> int:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**{**shape, "num_hidden_layers": layers}, max_position_embeddings=32768)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(config).to(torch.bfloat16)
    cfg = TrainConfig(base_model="bench", data_path="random", lora_rank=8, adapter_dtype=adapter_dtype,
                      gradient_checkpointing=ckpt)
    model = prepare_for_training(base, cfg)
    if upcast:
        compute_adapters_in_model_dtype(model, enabled=False)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        if upcast:  # as PEFT runs by default: no autocast, float32 adapter math on upcast inputs
            decoder = model.get_base_model().get_decoder()
            decoder(input_ids=batch.input_ids, attention_mask=attention_mask_for(model.get_base_model(),
                    batch.time_ids, batch.sample_ids), use_cache=False,
                    position_ids=stack_position_ids(batch.pos1d, batch.branch_pos, batch.time_ids))
        else:
            hidden_states(model, batch.input_ids, batch.pos1d, batch.branch_pos, batch.time_ids, batch.sample_ids)
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=7300, help="tokens per step for the extrapolated total")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    step = random_steps(1, 4, shape["vocab_size"])[0]
    batch = collate_packed([build_sample_layout(None, branches) for branches in step], tokens_per_row=32768)
    T = batch.input_ids.numel()
    L = 24 if args.shape == "qwen2.5-0.5b" else 2
    rows = []
    print(f"{args.shape}, bf16, one quick-start step of {T:,} tokens; bytes kept for backward")
    print(f"{'mode':<50} {'KB/token/layer':>15} {f'GiB at {args.tokens} tok x {L} layers':>28}")
    for name, (adapter_dtype, upcast, ckpt) in MODES.items():
        one, two = (saved_bytes(shape, n, adapter_dtype, upcast, ckpt, batch) for n in (1, 2))
        per_token_layer = (two - one) / T
        total_gb = per_token_layer * args.tokens * L / 2**30
        rows.append({"mode": name, "bytes_per_token_per_layer": round(per_token_layer),
                     "activation_gb_extrapolated": round(total_gb, 2)})
        print(f"{name:<50} {per_token_layer / 1e3:>15.1f} {total_gb:>28.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "tokens_in_step": T, "layers": L,
                                               "tokens_for_total": args.tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
