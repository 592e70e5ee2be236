"""Peak GPU memory estimate and VRAM-guided presets for one training job (pure Python, no torch).

The estimate, per GPU (the batch is per device, so DDP does not change it), in GiB — the "GB" of
/work/shared/MEASUREMENTS.md, which come from torch's allocator counters:

    peak = weights + lora_state + activations + logits + overhead

    weights      = n_params(shape) * bytes(dtype)                         frozen base model
    lora_state   = n_lora(shape, rank, targets) * 16                       fp32 adapter + grad + AdamW m, v
                                                                           (4 * bytes(dtype) with --adapter_dtype model)
    activations  = tokens * L * ACT_BYTES_PER_UNIT_MIXED * (hidden + intermediate) * dtype_scale
                   with gradient checkpointing:
                 = tokens * (L * dtype_bytes * hidden
                             + ACT_BYTES_PER_UNIT_MIXED * (hidden + intermediate) * dtype_scale)
                   (each layer keeps its input; one layer is recomputed at a time)
    logits       = (4 + bytes(dtype)) * vocab * min(tokens, CE_CHUNK_TOKENS)   one CE chunk's float32 logits
                   and their gradient (trainer_core.model.LinearCrossEntropy)
                   (LOGITS_FULL_BYTES_PER_VOCAB * vocab * tokens with a full-vocabulary CE)
    overhead     = CUDA_CONTEXT_GB + ALLOCATOR_SLACK * (activations + logits)

    tokens       = tokens in one micro-batch
                 = texts_per_micro_batch * tokens_per_text, texts_per_micro_batch =
                   batch_size * texts_per_sample                     (--batch_by_samples)
                   ceil(batch_size / texts_per_sample) * texts_per_sample
                                                                     (text batches, fixed groups: a sample
                                                                     is never split)
                   batch_size - 1 + max_branches_per_sample          (text batches, random groups)
                   texts_per_sample = max_branches_per_sample or branches_per_sample; tokens_per_text
                   defaults to max_seq_len (the worst case: every branch full). Give the dataset's real
                   p90/max length (the data check reports it) for a tighter number.

Sources: ACT_BYTES_PER_UNIT, LOGITS_*_BYTES_PER_VOCAB are a least-squares fit to the ten rows of
MEASUREMENTS.md table B (H100, bf16, PEFT LoRA all-linear, 0.5B r8 and 1.5B r16, T = 4096/16384,
checkpointing on/off, full/chunked CE); every row is reproduced within 9% (tests/ui/test_vram.py checks
it). The static part (weights + adapters) matches table B's "static GB" within 3%. CUDA_CONTEXT_GB and
ALLOCATOR_SLACK are not measured there (torch's counters exclude them): they are conservative
assumptions. Once jobs have run on a GPU, `measured` (their config and recorded peak) rescales the
dynamic part (activations + logits) by the median ratio measured/estimated — see `correction_factor`.

Table B was measured with PEFT's default of upcasting every adapted layer's input to float32 and with
checkpointed 8k-token CE chunks (LOGITS_CHUNK_BYTES_PER_VOCAB). The trainer computes the adapters in the
model's dtype (trainer_core.model.compute_adapters_in_model_dtype) and the CE gradient while a
CE_CHUNK_TOKENS-token chunk's logits exist (no fit needed: float32 logits + their gradient in the model's
dtype), so the estimate uses ACT_BYTES_PER_UNIT_MIXED: fitted to MEASUREMENTS.md's two bf16-adapter runs (0.5B, T = 8192 and 16384,
chunked CE), within 3%. The ratio to ACT_BYTES_PER_UNIT (0.72) matches the bytes autograd saves per layer
for the two modes, counted on CPU for the 0.5B shape (bench/activation_memory.py: 0.73).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from trainer_core.config import CE_CHUNK_TOKENS, TrainConfig

GIB = 1024**3

# --- calibration (see the module docstring for where each number comes from) -----------------------
ACT_BYTES_PER_UNIT = 14.4            # bytes per token, per layer, per unit of (hidden + intermediate); bf16,
                                     # adapters computed in float32 (PEFT's input upcast), as in table B
ACT_BYTES_PER_UNIT_MIXED = 10.4      # the same with adapters computed in bf16: what the trainer does
LOGITS_FULL_BYTES_PER_VOCAB = 11.6   # bytes per token per vocab entry, full-vocabulary cross-entropy
LOGITS_CHUNK_BYTES_PER_VOCAB = 4.9   # bytes per chunk token per vocab entry, checkpointed CE chunks (table B)
TABLE_B_CE_CHUNK_TOKENS = 8192       # the chunk table B measured with; the trainer's is CE_CHUNK_TOKENS
LORA_BYTES_PER_PARAM = 16            # fp32 weight 4 + grad 4 + AdamW exp_avg 4 + exp_avg_sq 4
CUDA_CONTEXT_GB = 0.6                # assumption: CUDA context + kernels, outside torch's counters
ALLOCATOR_SLACK = 0.08               # assumption: caching-allocator fragmentation on the dynamic part
NEAR_LIMIT_SHARE = 0.9               # warn above this share of the GPU

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# The guide's model sizes and rank ranges ("LoRA rank 如何选择").
RANK_RANGES = {"small": (4, 8), "medium": (8, 16), "large": (16, 32)}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a decoder (the fields of its HF config.json)."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    head_dim: int | None = None
    attention_bias: bool = True  # Qwen2 has q/k/v biases
    source: str = "table"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer, by PEFT module name."""
        h, inter, hd = self.hidden_size, self.intermediate_size, self.resolved_head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}

    @property
    def n_params(self) -> int:
        per_layer = sum(i * o for i, o in self.linear_layers().values()) + 2 * self.hidden_size
        if self.attention_bias:
            layers = self.linear_layers()
            per_layer += layers["q_proj"][1] + layers["k_proj"][1] + layers["v_proj"][1]
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + head + self.num_hidden_layers * per_layer + self.hidden_size

    def n_lora_params(self, rank: int, targets: str = "all-linear") -> int:
        layers = self.linear_layers()
        if targets.strip() != "all-linear":
            wanted = {t.strip() for t in targets.split(",") if t.strip()}
            layers = {k: v for k, v in layers.items() if k in wanted}
        return self.num_hidden_layers * sum(rank * (i + o) for i, o in layers.values())

    @property
    def size_class(self) -> str:
        """The guide's classes: <1B small, 1-3B medium, >3B large ("3B" models reach 3.5B: Qwen2.5-3B has 3.1B)."""
        b = self.n_params / 1e9
        return "small" if b < 1.0 else ("medium" if b <= 3.5 else "large")


# Qwen2.5 shapes (their published config.json values).
SHAPES: dict[str, ModelShape] = {
    "0.5B": ModelShape("Qwen2.5-0.5B", 896, 24, 4864, 14, 2, 151936, True),
    "1.5B": ModelShape("Qwen2.5-1.5B", 1536, 28, 8960, 12, 2, 151936, True),
    "3B": ModelShape("Qwen2.5-3B", 2048, 36, 11008, 16, 2, 151936, True),
    "7B": ModelShape("Qwen2.5-7B", 3584, 28, 18944, 28, 4, 152064, False),
}

# The guide's "不同规模配置" (configs by size), as TrainConfig overrides; gpus = its nproc_per_node.
GUIDE_CONFIGS: dict[str, dict[str, Any]] = {
    "0.5B": {"lora_rank": 8, "batch_size": 8, "epochs": 1},
    "1.5B": {"lora_rank": 16, "batch_size": 4, "accumulation_steps": 2, "ddp": True},
    "7B": {"lora_rank": 32, "batch_size": 1, "accumulation_steps": 8, "dtype": "bfloat16", "ddp": True},
}
GUIDE_GPUS = {"0.5B": 1, "1.5B": 4, "7B": 8}


def model_shape(model: str) -> ModelShape:
    """Shape of `model`: a local HF model dir (its config.json), or a name with a size ("0.5B", "Qwen/Qwen2.5-7B")."""
    config_path = os.path.join(model, "config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                return shape_from_hf_config(json.load(f), name=os.path.basename(model.rstrip("/")) or model)
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:  # not a decoder's config
            raise ValueError(f"{config_path}: not a decoder model's config (missing or bad {e})") from None
    key = size_key(model)
    if key is None:
        raise ValueError(f"cannot tell the shape of model {model!r}: give a local model directory with a "
                         f"config.json, or a name with a size ({', '.join(SHAPES)})")
    return SHAPES[key]


def size_key(model: str) -> str | None:
    """'Qwen/Qwen2.5-1.5B-Instruct' -> '1.5B'; None if no known size is named."""
    match = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", model)
    if not match:
        return None
    key = f"{float(match.group(1)):g}B"
    return key if key in SHAPES else None


def shape_from_hf_config(cfg: Mapping[str, Any], name: str = "model") -> ModelShape:
    text = cfg.get("text_config") or cfg  # multimodal configs nest the decoder
    heads = int(text["num_attention_heads"])
    return ModelShape(
        name=name,
        hidden_size=int(text["hidden_size"]),
        num_hidden_layers=int(text["num_hidden_layers"]),
        intermediate_size=int(text["intermediate_size"]),
        num_attention_heads=heads,
        num_key_value_heads=int(text.get("num_key_value_heads") or heads),
        vocab_size=int(text["vocab_size"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        head_dim=text.get("head_dim"),
        attention_bias=bool(text.get("attention_bias", text.get("model_type", "qwen2") == "qwen2")),
        source="config.json",
    )


# --- the estimate ----------------------------------------------------------------------------------
def texts_per_sample(config: TrainConfig) -> int:
    return config.max_branches_per_sample or config.branches_per_sample


def branch_count_field(max_branches_per_sample: int | None) -> str:
    """The field that sets how many texts a sample holds: the random maximum when one is set, else the fixed
    group size. Both batching modes read it (a text batch never splits a sample either)."""
    return "max_branches_per_sample" if max_branches_per_sample else "branches_per_sample"


def texts_per_micro_batch(config: TrainConfig) -> int:
    """The most texts one micro-batch holds. With batch_by_samples, batch_size samples. Otherwise samples are
    added until there are at least batch_size texts, and a sample is never split: a fixed group size rounds
    batch_size up to whole groups (batch_size 1 is one sample of 8 texts by default), a random one can
    overshoot by its maximum less one."""
    per_sample = texts_per_sample(config)
    if config.batch_by_samples:
        return config.batch_size * per_sample
    if config.max_branches_per_sample is None:
        return -(-config.batch_size // per_sample) * per_sample
    return config.batch_size - 1 + per_sample


def tokens_per_micro_batch(config: TrainConfig, tokens_per_text: int | None = None) -> int:
    return texts_per_micro_batch(config) * min(tokens_per_text or config.max_seq_len, config.max_seq_len)


def _raw_breakdown(config: TrainConfig, shape: ModelShape, tokens: int, *, upcast_adapters: bool = False,
                   checkpointed_ce: bool = False, chunked_ce: bool = True) -> dict[str, float]:
    """GiB per part. The keyword arguments reproduce how MEASUREMENTS.md measured (tests); the trainer
    chunks its cross-entropy (DESIGN.md: never materialise full-vocabulary logits)."""
    dtype_bytes = DTYPE_BYTES[config.dtype]
    dtype_scale = dtype_bytes / 2  # the calibration is bf16
    units = shape.hidden_size + shape.intermediate_size
    per_layer = (ACT_BYTES_PER_UNIT if upcast_adapters else ACT_BYTES_PER_UNIT_MIXED) * units * dtype_scale
    if config.gradient_checkpointing:
        act_per_token = shape.num_hidden_layers * dtype_bytes * shape.hidden_size + per_layer
    else:
        act_per_token = shape.num_hidden_layers * per_layer
    if not chunked_ce:
        logits = LOGITS_FULL_BYTES_PER_VOCAB * shape.vocab_size * tokens
    elif checkpointed_ce:
        logits = LOGITS_CHUNK_BYTES_PER_VOCAB * shape.vocab_size * min(tokens, TABLE_B_CE_CHUNK_TOKENS)
    else:
        logits = (4 + dtype_bytes) * shape.vocab_size * min(tokens, CE_CHUNK_TOKENS)
    return {
        "weights": shape.n_params * dtype_bytes / GIB,
        "lora_state": shape.n_lora_params(config.lora_rank, config.lora_target_modules)
                      * (LORA_BYTES_PER_PARAM if config.adapter_dtype == "float32" else 4 * dtype_bytes) / GIB,
        "activations": tokens * act_per_token / GIB,
        "logits": logits / GIB,
    }


def _coerce(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    return config if isinstance(config, TrainConfig) else TrainConfig(**dict(config))


def correction_factor(measured: Sequence[Mapping[str, Any]] | None, shape: ModelShape | None = None,
                      ) -> dict[str, Any] | None:
    """Median of measured/estimated dynamic memory over jobs that ran on a GPU.

    Each item: {"config": TrainConfig or dict, "peak_mem_gb": float, "tokens_per_text"?: int}. Jobs of the
    same model shape are preferred; other shapes are used only when none match. The factor is clipped to
    [0.25, 4] so one odd run cannot make the estimate absurd.
    """
    same, other = [], []
    for item in measured or []:
        try:
            peak = float(item["peak_mem_gb"])
            cfg = _coerce(item["config"])
            item_shape = model_shape(cfg.base_model)
        except (KeyError, TypeError, ValueError):
            continue
        if peak <= 0:
            continue
        raw = _raw_breakdown(cfg, item_shape, tokens_per_micro_batch(cfg, item.get("tokens_per_text")))
        dynamic = raw["activations"] + raw["logits"]
        static = raw["weights"] + raw["lora_state"]
        if dynamic <= 0:
            continue
        # the measured peak includes our overhead assumption; remove it the same way it is added
        ratio = max(peak - static - CUDA_CONTEXT_GB, 0.0) / (dynamic * (1 + ALLOCATOR_SLACK))
        (same if shape is not None and asdict(item_shape) == asdict(shape) else other).append(ratio)
    ratios, basis = (same, "same model") if same else (other, "other models")
    if not ratios:
        return None
    factor = min(max(statistics.median(ratios), 0.25), 4.0)
    return {"factor": round(factor, 3), "jobs": len(ratios), "basis": basis}


def estimate(config: TrainConfig | Mapping[str, Any], gpu_mem_gb: float,
             measured: list | None = None, *, tokens_per_text: int | None = None,
             shape: ModelShape | None = None) -> dict[str, Any]:
    """Estimated peak memory of one GPU for `config` (GiB), its parts, `fits`, and the guide's advice."""
    config = _coerce(config)
    shape = shape or model_shape(config.base_model)
    tokens = tokens_per_micro_batch(config, tokens_per_text)
    raw = _raw_breakdown(config, shape, tokens)
    correction = correction_factor(measured, shape)
    factor = correction["factor"] if correction else 1.0
    activations, logits = raw["activations"] * factor, raw["logits"] * factor
    overhead = CUDA_CONTEXT_GB + ALLOCATOR_SLACK * (activations + logits)
    breakdown = {"weights": raw["weights"], "lora_state": raw["lora_state"], "activations": activations,
                 "logits": logits, "overhead": overhead}
    peak = sum(breakdown.values())
    raw_peak = sum(raw.values()) + CUDA_CONTEXT_GB + ALLOCATOR_SLACK * (raw["activations"] + raw["logits"])
    fits = peak <= gpu_mem_gb
    return {
        "model": {"name": shape.name, "source": shape.source, "params_b": round(shape.n_params / 1e9, 3),
                  "params": shape.n_params,
                  "hidden_size": shape.hidden_size, "layers": shape.num_hidden_layers,
                  "intermediate_size": shape.intermediate_size, "vocab_size": shape.vocab_size,
                  "size_class": shape.size_class,
                  "lora_params_m": round(shape.n_lora_params(config.lora_rank, config.lora_target_modules) / 1e6, 2)},
        "gpu_mem_gb": gpu_mem_gb,
        "tokens_per_text": min(tokens_per_text or config.max_seq_len, config.max_seq_len),
        "tokens_per_micro_batch": tokens,
        "tokens_per_optimizer_step": tokens * config.accumulation_steps,
        "breakdown_gb": {k: round(v, 2) for k, v in breakdown.items()},
        "peak_gb": round(peak, 2),
        "raw_peak_gb": round(raw_peak, 2),
        "correction": correction,
        "fits": fits,
        "headroom_gb": round(gpu_mem_gb - peak, 2),
        "warnings": advice(config, shape, peak, gpu_mem_gb),
    }


def memory_levers(config: TrainConfig) -> list[str]:
    """What lowers this config's peak memory, in the guide's order ("显存不足"), leaving out the levers already
    pulled: advice to set what is set only confuses. Fields are named as the form and the CLI flags name them;
    the estimate's advice and the trainer's out-of-memory message both list these."""
    levers = []
    branches, field = texts_per_sample(config), branch_count_field(config.max_branches_per_sample)
    texts = texts_per_micro_batch(config)

    def fewer_texts(**update: int) -> bool:   # a text batch never splits a sample: not every lever helps
        return texts_per_micro_batch(config.model_copy(update=update)) < texts

    batch_lever = (f"a smaller batch_size (now {config.batch_size}, e.g. {config.batch_size // 2}) with more "
                   f"accumulation_steps (e.g. {config.accumulation_steps * 2}) to keep the effective batch")
    # the grouping of {"text"} records: a {"main", "branches"} record keeps all its branches whatever the flags
    branch_lever = (f"fewer branches per sample ({field} now {branches}, e.g. {branches // 2}; for \"text\" "
                    "records: a record with \"branches\" keeps all of its own)")
    halves = {"batch_size": config.batch_size // 2, field: branches // 2}
    can_halve_batch, can_halve_branches = config.batch_size > 1, branches > 2
    if can_halve_batch and fewer_texts(batch_size=halves["batch_size"]):
        levers.append(batch_lever)
    if can_halve_branches and fewer_texts(**{field: halves[field]}):
        levers.append(branch_lever)
    if not levers and can_halve_batch and can_halve_branches and fewer_texts(**halves):
        levers.append(f"a smaller batch_size and fewer branches per sample together (batch_size now "
                      f"{config.batch_size}, e.g. {halves['batch_size']}, with accumulation_steps "
                      f"{config.accumulation_steps * 2}; {field} now {branches}, e.g. {halves[field]}): a "
                      "micro-batch of one whole sample shrinks only with both")
    if config.dtype == "float32":
        levers.append("dtype bfloat16")
    if not config.gradient_checkpointing:
        levers.append("gradient_checkpointing (about a third slower)")
    levers.append(f"a smaller max_seq_len (now {config.max_seq_len}; longer texts are cut)")
    return levers


def advice(config: TrainConfig, shape: ModelShape, peak: float, gpu_mem_gb: float) -> list[str]:
    """The guide's advice ("显存不足", "LoRA rank 如何选择", "rope_2d_ratio 如何选择") applied to `config`."""
    out: list[str] = []
    if peak > gpu_mem_gb:
        out.append(f"Estimated peak {peak:.1f} GB exceeds the GPU's {gpu_mem_gb:g} GB: out of memory expected. "
                   f"Try: {'; '.join(memory_levers(config))}.")
    elif peak > NEAR_LIMIT_SHARE * gpu_mem_gb:
        out.append(f"Estimated peak {peak:.1f} GB is within 10% of the GPU's {gpu_mem_gb:g} GB: longer-than-usual "
                   "batches may run out of memory.")
    if config.dtype == "float32":
        out.append("float32 doubles weight and activation memory; the guide recommends bfloat16 on GPUs.")
    low, high = RANK_RANGES[shape.size_class]
    if not low <= config.lora_rank <= high:
        out.append(f"The guide suggests LoRA rank {low}-{high} for a model of {param_count(shape.n_params)} "
                   f"parameters (got {config.lora_rank}).")
    branches = texts_per_sample(config)
    if branches >= 12 and config.max_seq_len <= 512 and config.rope_2d_ratio < 0.6:
        out.append(f"Many short branches ({branches} x <= {config.max_seq_len} tokens): the guide suggests "
                   "rope_2d_ratio 0.6-0.7.")
    if branches <= 4 and config.max_seq_len >= 1024 and config.rope_2d_ratio > 0.4:
        out.append(f"Few long branches ({branches} x {config.max_seq_len} tokens): the guide suggests "
                   "rope_2d_ratio 0.3-0.4.")
    return out


def param_count(n: int | None) -> str:
    """0.49B, 2.4M: a tiny test model is not '0.0B'."""
    if n is None:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


# --- presets ---------------------------------------------------------------------------------------
def _preset_templates(shape: ModelShape, key: str | None) -> list[tuple[str, str, dict[str, Any]]]:
    low, high = RANK_RANGES[shape.size_class]
    guide_key = key if key in GUIDE_CONFIGS else {"small": "0.5B", "medium": "1.5B", "large": "7B"}[shape.size_class]
    guide = {k: v for k, v in GUIDE_CONFIGS[guide_key].items() if k in ("lora_rank", "batch_size",
                                                                          "accumulation_steps")}
    guide["lora_rank"] = min(max(guide["lora_rank"], low), high)
    effective = guide["batch_size"] * guide.get("accumulation_steps", 1)
    # Each preset sets every field its table row shows: applied over another one, it must not keep that
    # one's seq len or branch counts.
    defaults = TrainConfig.model_fields
    return [
        ("guide", f"The guide's {guide_key} configuration (batch counts texts)",
         {**guide, "batch_by_samples": False, "dtype": "bfloat16", "rope_2d_ratio": 0.5,
          "max_seq_len": defaults["max_seq_len"].default, "branches_per_sample": defaults["branches_per_sample"].default,
          "max_branches_per_sample": None, "min_branches_per_sample": 1}),
        ("many short branches", "Samples of up to 16 short branches (<= 256 tokens); 2D RoPE 0.65",
         {"lora_rank": high, "batch_by_samples": True, "max_branches_per_sample": 16,
          "min_branches_per_sample": 1, "max_seq_len": 256, "batch_size": max(1, effective // 2),
          "accumulation_steps": 1, "dtype": "bfloat16", "rope_2d_ratio": 0.65}),
        ("few long branches", "Samples of up to 4 long branches (<= 1024 tokens); 2D RoPE 0.35",
         {"lora_rank": high, "batch_by_samples": True, "max_branches_per_sample": 4,
          "min_branches_per_sample": 1, "max_seq_len": 1024, "batch_size": max(1, effective // 2),
          "accumulation_steps": 1, "dtype": "bfloat16", "rope_2d_ratio": 0.35}),
    ]


def fit_to_memory(overrides: dict[str, Any], base_model: str, gpu_mem_gb: float, shape: ModelShape,
                  measured: list | None = None) -> tuple[dict[str, Any], list[str]]:
    """The first candidate, in the guide's out-of-memory order, whose estimate stays under
    NEAR_LIMIT_SHARE of the GPU: smaller batch_size with more accumulation_steps (same effective batch);
    then the same again with gradient checkpointing (not in the guide: it keeps the data's shape at some
    speed); then fewer branches per sample; last the lowest rank of the guide's range. bfloat16 is
    already every preset's dtype. Returns (config, the changes made); the last candidate if none fits."""
    base = dict(overrides)
    base.setdefault("gradient_checkpointing", False)
    batch0, accum0 = base.get("batch_size", 16), base.get("accumulation_steps", 1)
    # fewer branches per sample (in text batches a sample is never split, so below a group a smaller
    # batch_size saves nothing and this is the lever that does)
    branch_field = branch_count_field(base.get("max_branches_per_sample"))
    branches0 = base.get(branch_field, TrainConfig.model_fields[branch_field].default)
    branch_options = [branches0] if not branches0 else [b for b in (branches0, branches0 // 2, branches0 // 4, 2)
                                                        if b >= 2 or b == branches0]
    rank_options = [base.get("lora_rank", 8), RANK_RANGES[shape.size_class][0]]

    def candidates():
        for rank in dict.fromkeys(rank_options):
            for branches in dict.fromkeys(branch_options):
                for ckpt in (False, True):
                    batch = batch0
                    while batch >= 1:
                        yield {**base, "lora_rank": rank, "gradient_checkpointing": ckpt or base["gradient_checkpointing"],
                               "batch_size": batch, "accumulation_steps": max(1, accum0 * batch0 // batch),
                               **_branch_fields(branch_field, branches, base)}
                        batch //= 2

    cfg = base
    for cfg in candidates():
        est = estimate(TrainConfig(base_model=base_model, data_path="data.jsonl", **cfg), gpu_mem_gb, measured,
                       shape=shape)
        if est["peak_gb"] <= NEAR_LIMIT_SHARE * gpu_mem_gb:
            break
    before = {k: base.get(k, TrainConfig.model_fields[k].default) for k in cfg}   # unset: the schema's default
    changes = [f"{k} {before[k]} -> {v}" for k, v in cfg.items() if before[k] != v]
    return cfg, changes


def _branch_fields(field: str, branches: int | None, base: dict[str, Any]) -> dict[str, Any]:
    if not branches:
        return {}
    if field == "branches_per_sample":
        return {field: branches}
    return {field: branches, "min_branches_per_sample": min(base.get("min_branches_per_sample", 1), branches)}


def presets(gpu_mem_gb: float, model: str, measured: list | None = None) -> list[dict[str, Any]]:
    """Presets that fit `gpu_mem_gb` for `model` (a size like "0.5B", a HF name, or a local model dir).

    Each: {name, description, model, config: TrainConfig overrides (batch_size, accumulation_steps,
    batch_by_samples, max_branches_per_sample, max_seq_len, lora_rank, dtype, rope_2d_ratio,
    gradient_checkpointing), adjustments: the ladder steps taken, estimate, fits}.
    """
    shape = model_shape(model)
    out = []
    for name, description, template in _preset_templates(shape, size_key(model)):
        cfg, steps = fit_to_memory(template, model, gpu_mem_gb, shape, measured)
        cfg.setdefault("gradient_checkpointing", False)
        est = estimate(TrainConfig(base_model=model, data_path="data.jsonl", **cfg), gpu_mem_gb, measured,
                       shape=shape)
        out.append({"name": name, "description": description, "model": shape.name, "config": cfg,
                    "adjustments": steps, "estimate": est, "fits": est["fits"]})
    return out


# --- `paratrain presets` -----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu-mem", type=_gpu_gb, nargs="+", default=[24.0, 80.0], metavar="GIB",
                        help="GPU memory sizes in GiB, as nvidia-smi's MiB / 1024 (80 for an H100; default: 24 80)")
    parser.add_argument("--model", nargs="+", default=None,
                        help="models for the preset table: sizes (0.5B 1.5B 3B 7B), HF names or local dirs "
                             "(default: the guide's 0.5B 1.5B 7B)")
    parser.add_argument("--tokens-per-text", type=int, default=None,
                        help="typical tokens per branch text (default: max_seq_len, the worst case)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def gpu_size_gib(value: Any) -> float | None:
    """`value` (a number or its text) as a GPU memory size in GiB, or None when it is none (0 < size <= 4096)."""
    try:
        gib = float(value)
    except (TypeError, ValueError):
        return None
    return gib if 0 < gib <= 4096 else None   # NaN fails the bound too


def _gpu_gb(text: str) -> float:
    value = gpu_size_gib(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a GPU size in GiB (0 < size <= 4096)")
    return value


def guide_config(key: str) -> TrainConfig:
    return TrainConfig(base_model=SHAPES[key].name, data_path="data.jsonl", **GUIDE_CONFIGS[key])


def run(args: argparse.Namespace) -> int:
    models = args.model or list(GUIDE_CONFIGS)
    guide_rows = []
    for key in GUIDE_CONFIGS:
        cfg = guide_config(key)
        ests = {mem: estimate(cfg, mem, tokens_per_text=args.tokens_per_text, shape=SHAPES[key])
                for mem in args.gpu_mem}
        guide_rows.append((key, cfg, ests))
    try:
        preset_rows = [(mem, m, presets(mem, m)) for mem in args.gpu_mem for m in models]
    except (ValueError, OSError) as e:   # a model whose shape cannot be told
        print(f"paratrain presets: --model: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({
            "guide_configs": [{"model": key, "config": cfg.model_dump(exclude={"base_model", "data_path"}),
                               "estimates": {str(m): e for m, e in ests.items()}} for key, cfg, ests in guide_rows],
            "presets": [{"gpu_mem_gb": mem, "model": m, "presets": p} for mem, m, p in preset_rows],
        }, indent=2))
        return 0
    print(format_guide_table(guide_rows, args.gpu_mem))
    print()
    for mem, m, plist in preset_rows:
        print(format_preset_table(mem, m, plist))
        print()
    print("Memory in GiB per GPU. Formula and sources: docs/VRAM.md (trainer_core/vram.py).")
    return 0


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_guide_table(guide_rows: list, gpu_mems: Sequence[float]) -> str:
    header = ["guide config", "rank", "batch", "accum", "tokens/micro", "weights", "lora+opt", "activ",
              "logits", "overhead", "peak GB"] + [f"fits {m:g}GB" for m in gpu_mems]
    rows = []
    for key, cfg, ests in guide_rows:
        e = next(iter(ests.values()))
        b = e["breakdown_gb"]
        rows.append([f"{key} (x{GUIDE_GPUS[key]} GPU)", cfg.lora_rank, cfg.batch_size, cfg.accumulation_steps,
                     e["tokens_per_micro_batch"], f"{b['weights']:.2f}", f"{b['lora_state']:.2f}",
                     f"{b['activations']:.2f}", f"{b['logits']:.2f}", f"{b['overhead']:.2f}", f"{e['peak_gb']:.2f}"]
                    + ["yes" if ests[m]["fits"] else "NO" for m in gpu_mems])
    return ("Estimated peak memory per GPU of the guide's configurations (max_seq_len 1024, every text full):\n"
            + _table(header, rows))


PRESET_COLUMNS = ["preset", "rank", "batch", "accum", "by samples", "branches", "seq len", "ckpt", "rope2d",
                  "peak GB", "fits"]


def preset_rows(plist: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per preset under PRESET_COLUMNS (the CLI table and the UI's presets table)."""
    rows = []
    for p in plist:
        c = p["config"]
        rows.append([p["name"], c.get("lora_rank"), c.get("batch_size"), c.get("accumulation_steps", 1),
                     "yes" if c.get("batch_by_samples") else "no", branches_text(c),
                     c["max_seq_len"], "on" if c.get("gradient_checkpointing") else "off",
                     c.get("rope_2d_ratio"), round(p["estimate"]["peak_gb"], 2), "yes" if p["fits"] else "NO"])
    return rows


def branches_text(config: dict[str, Any]) -> str:
    """Texts per sample: '1-16' (random, batch_by_samples) or '8' (fixed groups of text records)."""
    if config.get("max_branches_per_sample"):
        return f"{config.get('min_branches_per_sample', 1)}-{config['max_branches_per_sample']}"
    return str(config.get("branches_per_sample", TrainConfig.model_fields["branches_per_sample"].default))


def format_preset_table(gpu_mem: float, model: str, plist: list[dict[str, Any]]) -> str:
    dtypes = ", ".join(sorted({str(p["config"].get("dtype")) for p in plist}))
    return (f"Presets for {model} on a {gpu_mem:g} GB GPU (dtype {dtypes}):\n"
            + _table(PRESET_COLUMNS, preset_rows(plist)))
