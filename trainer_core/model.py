"""Model side of training: load the base model, add PEFT LoRA and the 2D RoPE patch, compute the loss.

`ParallelBranchLM` owns the whole forward + loss so DDP can wrap it as one module. Logits are never
materialised for the whole batch: only positions that have a label go through the LM head, a chunk at a
time, and each chunk's gradient is computed while its logits exist (`LinearCrossEntropy`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer_core.config import CE_CHUNK_TOKENS, TrainConfig
from trainer_core.data import DataError, local_model_dir
from trainer_core.layout import IGNORE_INDEX, columnar_block_mask, columnar_mask
from trainer_core.rope2d import patch_rope_2d, stack_position_ids

ROPE_SETTINGS_FILE = "rope2d.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def quiet_libraries() -> None:
    """Keep stderr for our progress lines: no per-load progress bars or library deprecation chatter."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # PEFT's model card update reads the README paratrain writes into an adapter directory, which has no
    # metadata block: "Repo card metadata block was not found" on every save over an earlier one
    logging.getLogger("huggingface_hub.repocard").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def attention_backend(device: torch.device) -> str:
    """FlexAttention (block-sparse, compiled) on CUDA; SDPA with a dense bool mask on CPU, where flex
    has no backward."""
    return "flex_attention" if device.type == "cuda" else "sdpa"


def load_base_model(model_dir: str, device: torch.device, dtype: torch.dtype, attn_implementation: str):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(local_model_dir(model_dir), dtype=dtype,
                                                     attn_implementation=attn_implementation)
    except (OSError, ValueError, SafetensorError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise   # an I/O error of the file system (EIO, ESTALE on NFS...): maybe passing, a crash to retry
        # A weights file cut short by a copy or download, missing, or of a model type this transformers does not
        # know: the user's to fix, so a message naming the directory (exit 2), not a traceback.
        reason = (str(e).strip().splitlines() or [""])[0]
        hint = "" if isinstance(e, ValueError) else "; are its files complete?"
        raise DataError([f"--base_model {model_dir}: the model does not load ({type(e).__name__}: {reason}){hint}"]
                        ) from e
    return model.to(device)


def flex_attention_shared_kv(module: nn.Module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers' FlexAttention, except that K/V heads are shared by flex itself (enable_gqa) instead of
    being copied to every query head first. transformers copies them unless the query head count is a power
    of two (a tensor-parallel aid); for Qwen2.5-0.5B (14 query, 2 K/V heads) backward then keeps 7x the K/V,
    about 0.5 GB at the quick-start step. Anything else (a tensor mask, softcap, sinks, dropout) goes to
    transformers' own function."""
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.integrations import flex_attention as hf_flex

    shared = query.shape[1] != key.shape[1] and query.shape[1] % key.shape[1] == 0
    plain = (isinstance(attention_mask, BlockMask) and not kwargs.get("dropout")
             and all(kwargs.get(k) is None for k in ("softcap", "s_aux", "position_bias")))
    if not (shared and plain):
        return hf_flex.flex_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    out = hf_flex.compile_friendly_flex_attention(query, key, value, block_mask=attention_mask, enable_gqa=True,
                                                  scale=scaling, kernel_options=kwargs.get("kernel_options"),
                                                  training=module.training)
    return out.transpose(1, 2).contiguous(), None


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    target_modules = "all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.resolved_lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=target_modules, bias="none", task_type="CAUSAL_LM")


def training_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The base model's dtype: --dtype on CUDA; float32 on CPU, where half precision is slow and unsupported."""
    return DTYPES[cfg.dtype] if device.type == "cuda" else torch.float32


def build_lora_model(cfg: TrainConfig, device: torch.device):
    """Base model (frozen) + LoRA adapters + 2D RoPE patch, ready to train."""
    return prepare_for_training(load_base_model(cfg.base_model, device, training_dtype(cfg, device),
                                                attention_backend(device)), cfg)


def prepare_for_training(base: nn.Module, cfg: TrainConfig):
    """Patch 2D RoPE into a loaded base model and wrap it with PEFT LoRA (base weights frozen)."""
    from peft import get_peft_model

    patch_rope_2d(base, cfg.rope_2d_ratio)
    if getattr(base.config, "_attn_implementation", None) == "flex_attention":
        from transformers import AttentionInterface

        # process-wide, and only for flex: in this process flex runs only in models prepared here
        AttentionInterface.register("flex_attention", flex_attention_shared_kv)
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    peft_config = lora_config(cfg)
    try:
        model = get_peft_model(base, peft_config, autocast_adapter_dtype=cfg.adapter_dtype == "float32")
    except ValueError as e:  # PEFT's NoMatchingPeftModuleError: a module name this model does not have
        raise _target_modules_error(base, cfg, str(e).splitlines()[0]) from None
    wanted = peft_config.target_modules
    if not isinstance(wanted, str):   # PEFT drops a listed name that matches nothing when another name matches
        targeted = model.targeted_module_names
        unmatched = sorted(t for t in wanted if not any(n == t or n.endswith("." + t) for n in targeted))
        if unmatched:
            raise _target_modules_error(base, cfg, f"no module named {', '.join(unmatched)}")
    compute_adapters_in_model_dtype(model)
    if cfg.compile:
        # In place, layer by layer: parameter names (checkpoints, PEFT's adapter files) do not change, and
        # every layer shares one compiled graph. dynamic: packed rows change length from step to step.
        for layer in base.get_decoder().layers:
            layer.compile(dynamic=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable or any("lora_" not in n for n in trainable):
        raise RuntimeError(f"unexpected trainable parameters: {[n for n in trainable if 'lora_' not in n][:5]}")
    # from_pretrained hands the model over in eval mode, where transformers skips gradient checkpointing
    # and LoRA dropout does nothing: both would be silently off
    return model.train()


def _target_modules_error(base: nn.Module, cfg: TrainConfig, problem: str) -> DataError:
    # Called after PEFT wrapped the modules it matched: a wrapped q_proj is no nn.Linear itself but holds one
    # (q_proj.base_layer) and the adapter's own (q_proj.lora_A.default); the user's name is q_proj.
    linear = sorted({n.removesuffix(".base_layer").rsplit(".", 1)[-1] for n, m in base.named_modules()
                     if isinstance(m, nn.Linear) and ".lora_" not in n})
    return DataError([f"--lora_target_modules {cfg.lora_target_modules}: {problem} "
                      f"(linear layers of this model: {', '.join(linear)}, or 'all-linear')"])


def compute_adapters_in_model_dtype(peft_model: nn.Module, enabled: bool = True) -> None:
    """Mixed precision for float32 adapters: PEFT would upcast every adapted layer's input to float32 and
    keep that copy for backward (about a third more activation memory in bf16, and slower). With the
    upcast off, `hidden_states` runs the decoder under autocast: the adapters compute in the model's dtype,
    their weights, gradients and AdamW state stay float32. `enabled=False` puts PEFT's upcast back (the
    benchmarks' baseline)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in peft_model.modules():
        if isinstance(module, BaseTunerLayer):
            if not hasattr(module, "cast_input_dtype_enabled"):   # setting it would do nothing, silently
                import warnings

                import peft

                warnings.warn(f"peft {peft.__version__} cannot compute float32 adapters in the model's dtype: "
                              "about a third more activation memory (paratrain needs peft>=0.17)", RuntimeWarning)
                return
            module.cast_input_dtype_enabled = not enabled


def chunked_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module,
                          chunk: int = CE_CHUNK_TOKENS) -> torch.Tensor:
    """Sum of token cross-entropies over positions with a label, without holding full-vocab logits."""
    keep = labels != IGNORE_INDEX
    h, y = hidden[keep], labels[keep]
    if isinstance(lm_head, nn.Linear) and lm_head.bias is None and not lm_head.weight.requires_grad:
        return LinearCrossEntropy.apply(h, lm_head.weight, y, chunk, torch.is_grad_enabled() and h.requires_grad)
    return checkpointed_cross_entropy(h, y, lm_head, chunk)   # a head that trains (e.g. LoRA on lm_head)


def checkpointed_cross_entropy(h: torch.Tensor, y: torch.Tensor, lm_head: nn.Module,
                               chunk: int = CE_CHUNK_TOKENS) -> torch.Tensor:
    """Sum of CE(lm_head(h), y) over [N,H] states and [N] labels for any head: chunks whose logits are
    recomputed in backward, so autograd reaches the head's own parameters."""
    def chunk_loss(h_chunk: torch.Tensor, y_chunk: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(lm_head(h_chunk).float(), y_chunk, reduction="sum")

    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(chunk_loss, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
        else:
            total = total + chunk_loss(h[i:i + chunk], y[i:i + chunk])
    return total


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ weight.T, y_i) for a frozen head, chunk by chunk, with d loss / d h computed in forward.

    While a chunk's logits exist anyway, softmax - onehot times the weight is its whole gradient, so
    backward is one multiply: no logits are kept for backward, and none are recomputed (a checkpointed
    chunk computes its logits twice, and the head is about a quarter of a 0.5B model's matmuls).
    Logits are float32, as in `F.cross_entropy(lm_head(h).float(), y)`."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int, need_grad: bool):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        for i in range(0, h.shape[0], chunk):
            logits = (h[i:i + chunk] @ weight.T).float()
            y_chunk = y[i:i + chunk]
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y_chunk[:, None]).squeeze(1)).sum()
            if need_grad:
                probs = logits.sub_(lse[:, None]).exp_()                     # softmax, in place
                probs[torch.arange(y_chunk.numel(), device=y.device), y_chunk] -= 1
                grad_h[i:i + chunk] = probs.to(h.dtype) @ weight
        ctx.save_for_backward(grad_h if need_grad else None)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return (grad_h.float() * grad_total).to(grad_h.dtype), None, None, None, None


class ParallelBranchLM(nn.Module):
    """forward(batch tensors) -> summed token loss. The attention rule and 2D coordinates come in with
    the batch, so nothing is stored between calls."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, pos1d: torch.Tensor,
                branch_pos: torch.Tensor, time_ids: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        hidden = hidden_states(self.peft_model, input_ids, pos1d, branch_pos, time_ids, sample_ids)
        return chunked_cross_entropy(hidden, labels, output_layer(self.peft_model))


def attention_mask_for(model: nn.Module, time_ids: torch.Tensor, sample_ids: torch.Tensor):
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl == "flex_attention":
        return columnar_block_mask(time_ids, sample_ids)
    mask = columnar_mask(time_ids, sample_ids)
    if impl == "sdpa":
        return mask
    # eager (and other kernels) *add* the mask to the scores: a bool mask would mask nothing
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def hidden_states(peft_model: nn.Module, input_ids, pos1d, branch_pos, time_ids, sample_ids) -> torch.Tensor:
    """Final hidden states of the (LoRA-adapted) decoder under the columnar rule and 2D coordinates."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    mask = attention_mask_for(base, time_ids, sample_ids)
    model_dtype = base.get_input_embeddings().weight.dtype
    # float32 adapters on a bf16/fp16 model compute in the model's dtype (compute_adapters_in_model_dtype)
    with torch.autocast(input_ids.device.type, dtype=model_dtype, enabled=model_dtype != torch.float32):
        out = base.get_decoder()(input_ids=input_ids, attention_mask=mask,
                                 position_ids=stack_position_ids(pos1d, branch_pos, time_ids), use_cache=False)
    return out.last_hidden_state


@contextmanager
def eager_inference(peft_model: nn.Module) -> Iterator[None]:
    """The training model, for a few forwards after training (probe logits, samples): in eval mode, with SDPA,
    as load_adapter_dir loads it, and not compiled. FlexAttention run eagerly (not worth compiling for a few
    forwards of new shapes) would hold every head's full score matrix, tens of GB for a long sample."""
    config = peft_model.get_base_model().config
    was_training, attn = peft_model.training, config._attn_implementation
    peft_model.eval()
    config._attn_implementation = "sdpa"
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            yield
    finally:
        config._attn_implementation = attn
        peft_model.train(was_training)


def output_layer(model: nn.Module) -> nn.Module:
    """Hidden states -> logits: the LM head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings()


def parallel_logits(model: nn.Module, input_ids, pos1d, branch_pos, time_ids, sample_ids) -> torch.Tensor:
    """Full logits [B,T,V] for evaluation and tests (training never builds these)."""
    return output_layer(model)(hidden_states(model, input_ids, pos1d, branch_pos, time_ids, sample_ids))


# --- saving and loading adapters --------------------------------------------------------------------

def lora_state_dict(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def save_adapter_dir(peft_model: nn.Module, out_dir: Path, cfg: TrainConfig) -> None:
    """PEFT adapter directory plus the 2D RoPE settings needed to use it, and a README that says how.
    The base model is recorded by absolute path (a relative one only resolves from the training's cwd), or
    by hub id when it was named by one: the cache's snapshot path exists on this machine only."""
    base_model = cfg.base_model if local_model_dir(cfg.base_model) != cfg.base_model \
        else str(Path(cfg.base_model).resolve())
    for adapter_config in peft_model.peft_config.values():
        adapter_config.base_model_name_or_path = base_model
    peft_model.save_pretrained(out_dir)
    (out_dir / ROPE_SETTINGS_FILE).write_text(json.dumps(
        {"rope_2d_ratio": cfg.rope_2d_ratio, "branch_stride": cfg.branch_stride, "base_model": base_model},
        indent=2))
    (out_dir / "README.md").write_text(ADAPTER_README.format(base_model=base_model, ratio=cfg.rope_2d_ratio,
                                                             rank=cfg.lora_rank))


# replaces PEFT's empty model card: the one thing a user of this directory must know is the RoPE patch
ADAPTER_README = """# paratrain LoRA adapter

Trained by paratrain on `{base_model}` (LoRA rank {rank}) with 2D rotary positions, `rope_2d_ratio` {ratio}
(`rope2d.json`). The adapter only reproduces its training with the same patch applied, so load it with

```python
from trainer_core.model import load_adapter_dir
model = load_adapter_dir("{base_model}", "path/to/this/adapter")   # generate() works on plain text
```

and generate branches with `paratrain generate --adapter path/to/this/adapter --main "..." --branch "First,"
--branch "Second,"` (or `trainer_core.generate.generate_branches`).

Plain `PeftModel.from_pretrained` / `AutoPeftModelForCausalLM` load the weights without the patch: with a
`rope_2d_ratio` above 0 that model computes something else than the one that was trained.
"""


def read_adapter_settings(adapter_dir: str | Path) -> dict:
    """rope2d.json of a paratrain adapter: rope_2d_ratio, branch_stride and the base model (path or hub id)."""
    path = Path(adapter_dir)
    try:
        is_file, exists = path.is_file(), path.exists()
    except OSError as e:   # a name too long for the file system, a symlink loop
        raise DataError([f"{adapter_dir}: not a usable path ({e.strerror or e})"]) from None
    if is_file:
        raise DataError([f"{adapter_dir}: a file; an adapter is a directory (<output_dir>/adapter after training)"])
    if not exists:
        raise DataError([f"{adapter_dir}: no such directory (a run writes <output_dir>/adapter when it ends, and "
                         "adapter_best/ as it validates)"])
    try:
        settings = json.loads((path / ROPE_SETTINGS_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):   # a directory of something else, or a file such as *_final.pth
        if (path / "adapter").is_dir():
            raise DataError([f"{adapter_dir}: a run's output directory; its adapter is {path / 'adapter'}"]) from None
        raise DataError([f"{adapter_dir}: not a paratrain adapter directory (no {ROPE_SETTINGS_FILE}; it is "
                         "<output_dir>/adapter after training)"]) from None
    except OSError as e:   # not readable by this user
        raise DataError([f"{path / ROPE_SETTINGS_FILE}: cannot be read ({e.strerror or e})"]) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError([f"{path / ROPE_SETTINGS_FILE}: not readable as JSON ({e})"]) from None
    if not isinstance(settings, dict):
        raise DataError([f"{path / ROPE_SETTINGS_FILE}: not a JSON object"])
    return settings


def check_init_adapter(cfg: TrainConfig) -> dict:
    """DataError unless --init_adapter holds a paratrain adapter this run can start from: its 2D positions
    (rope_2d_ratio, branch_stride) and its scale (lora_rank, lora_alpha) must be this run's, or its weights
    compute something else than what was trained. Cheap: checked before the model loads (the target modules
    are checked as the weights load). Returns its rope2d.json."""
    settings = read_adapter_settings(cfg.init_adapter)
    try:
        peft_settings = json.loads((Path(cfg.init_adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError([f"{cfg.init_adapter}: its adapter_config.json is not readable ({e})"]) from None
    if not isinstance(peft_settings, dict):
        raise DataError([f"{cfg.init_adapter}: its adapter_config.json is not a JSON object"])
    theirs = {"rope_2d_ratio": settings.get("rope_2d_ratio"), "branch_stride": settings.get("branch_stride"),
              "lora_rank": peft_settings.get("r"), "lora_alpha": peft_settings.get("lora_alpha")}
    ours = {"rope_2d_ratio": cfg.rope_2d_ratio, "branch_stride": cfg.branch_stride, "lora_rank": cfg.lora_rank,
            "lora_alpha": cfg.resolved_lora_alpha}
    differ = [f"{k} {theirs[k]:g} (this run: {ours[k]:g})" if isinstance(theirs[k], (int, float)) else
              f"{k} {theirs[k]} (this run: {ours[k]:g})" for k in ours if theirs[k] != ours[k]]
    targets = peft_settings.get("target_modules")
    if cfg.lora_target_modules != "all-linear" and isinstance(targets, (list, str)):   # all-linear: as they load
        ours_targets = {t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()}
        # all-linear is saved as every module's full name (model.layers.0.self_attn.q_proj): compared by the last part
        theirs_targets = {t.rsplit(".", 1)[-1] for t in ([targets] if isinstance(targets, str) else targets)}
        if ours_targets != theirs_targets:
            differ.append(f"lora_target_modules {','.join(sorted(theirs_targets))} (this run: {cfg.lora_target_modules})")
    if differ:
        raise DataError([f"{cfg.init_adapter}: an adapter trained with {', '.join(differ)}; give its values"])
    return settings


def load_init_adapter(peft_model: nn.Module, adapter_dir: str | Path) -> None:
    """The LoRA weights of a saved adapter (check_init_adapter) into a freshly built model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"   # read here: PEFT's loader would try the hub for it
    try:
        weights = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:   # cut short, or not there
        raise DataError([f"{path}: not readable ({e})"]) from None
    load_lora_weights(peft_model, weights, adapter_dir)


def load_adapter_dir(base_model: str, adapter_dir: str | Path, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32):
    """Base model + saved adapter + the same 2D RoPE patch, for inference (`generate()` works on it for plain
    text; branches: trainer_core.generate)."""
    from peft import PeftModel

    settings = read_adapter_settings(adapter_dir)
    base = load_base_model(base_model, torch.device(device), dtype, "sdpa")
    patch_rope_2d(base, settings["rope_2d_ratio"])
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def load_lora_weights(peft_model: nn.Module, weights: dict[str, torch.Tensor], source: str | Path) -> None:
    """Put saved LoRA weights into `peft_model`, or raise DataError naming `source` when they were trained
    with another rank, other target modules or another model: PEFT alone would load a partial match
    silently (missing keys keep their fresh init) or fail with a bare size-mismatch traceback."""
    from peft import set_peft_model_state_dict

    try:
        result = set_peft_model_state_dict(peft_model, weights)
    except RuntimeError as e:   # size mismatch: another lora_rank or another model
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise DataError([f"{source}: LoRA weights of another shape than this config's "
                         f"(lora_rank, base_model?): {detail}"]) from None
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if unexpected or missing:
        raise DataError([f"{source}: LoRA weights for other modules than this config's lora_target_modules "
                         f"(not in the model: {unexpected[:3]}; not in the file: {missing[:3]})"])


def load_pth(base_model: str, pth_path: str | Path, cfg: TrainConfig, device: str | torch.device = "cpu"):
    """Base model + LoRA weights from a `.pth` state dict (the guide's output format)."""
    from peft import get_peft_model

    base = load_base_model(base_model, torch.device(device), torch.float32, "sdpa")
    patch_rope_2d(base, cfg.rope_2d_ratio)
    model = get_peft_model(base, lora_config(cfg), autocast_adapter_dtype=cfg.adapter_dtype == "float32")
    load_lora_weights(model, torch.load(pth_path, map_location=device, weights_only=True), pth_path)
    return model.eval()
