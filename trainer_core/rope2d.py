"""2D rotary position encoding for parallel branches, and the patch that puts it into a HF model.

The rotary module of a HF decoder has F frequency pairs (inv_freq[0..F-1], highest frequency first).
With k = round(F * ratio), the k lowest-frequency pairs become 2D pairs: the m-th of them rotates by
the branch coordinate when m is even and by the time coordinate when m is odd. The other pairs rotate
by pos1d, exactly as in the stock model (so ratio 0 reproduces it bit for bit).

How coordinates reach the rotary module without any global state: the model is called with
`position_ids` stacked as [3, B, T] = (pos1d, branch_pos, time). HF passes position_ids straight to
`rotary_emb(x, position_ids)`; the patched module unstacks them. Plain [B, T] position_ids (e.g. from
`generate()`) mean single-branch text: branch 0, time = pos1d. The 4D attention mask we always pass
stops HF from reading position_ids for packed-sequence detection.
"""

from __future__ import annotations

import torch
from torch import nn


def num_2d_pairs(num_pairs: int, ratio: float) -> int:
    return round(num_pairs * ratio)


def rope_2d_cos_sin(inv_freq: torch.Tensor, pos1d: torch.Tensor, branch_pos: torch.Tensor,
                    time_ids: torch.Tensor, ratio: float,
                    attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates [B,T] -> (cos, sin) [B,T,2F] in float32, laid out like the HF rotary module's output."""
    F = inv_freq.shape[0]
    k = num_2d_pairs(F, ratio)
    # coordinate source per pair: 0 = pos1d, 1 = branch, 2 = time
    source = torch.zeros(F, dtype=torch.long, device=inv_freq.device)
    m = torch.arange(k, device=inv_freq.device)
    source[F - k:] = torch.where(m % 2 == 0, 1, 2)
    coords = torch.stack([pos1d, branch_pos, time_ids], dim=-1).float()      # [B,T,3]
    per_pair = coords[..., source]                                           # [B,T,F]
    freqs = per_pair * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


class Rope2DRotaryEmbedding(nn.Module):
    """Wraps a HF rotary module (keeps its inv_freq buffer and scaling) and adds the 2D pairs."""

    def __init__(self, inner: nn.Module, ratio: float):
        super().__init__()
        self.inner = inner
        self.ratio = float(ratio)

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.inner.inv_freq

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.dim() == 3:
            pos1d, branch_pos, time_ids = position_ids.unbind(0)
        else:  # ordinary text (generate()): one branch, time runs with pos1d
            pos1d, branch_pos, time_ids = position_ids, torch.zeros_like(position_ids), position_ids
        if num_2d_pairs(self.inner.inv_freq.shape[0], self.ratio) == 0:
            return self.inner(x, pos1d)   # no 2D pair: the stock module itself, for every rope type
        if rescales_with_length(self.inner):
            # Dynamic NTK and LongRoPE choose inv_freq (and the scaling) from the sequence length inside the
            # stock forward: run it on pos1d for that update, so the 1D pairs stay the stock model's.
            self.inner(x, pos1d)
        scaling = float(getattr(self.inner, "attention_scaling", 1.0))
        cos, sin = rope_2d_cos_sin(self.inner.inv_freq.to(x.device), pos1d, branch_pos, time_ids,
                                   self.ratio, scaling)
        return cos.to(x.dtype), sin.to(x.dtype)


def rope_2d_pairs(model: nn.Module) -> tuple[int, int]:
    """(2D pairs, all pairs) of a patched model's rotary modules: a small ratio may round to no 2D pair."""
    rotary = next(child for _, _, child in _rotary_parents(model))
    pairs = rotary.inv_freq.shape[0]
    return num_2d_pairs(pairs, getattr(rotary, "ratio", 0.0)), pairs


def rescales_with_length(rotary: nn.Module) -> bool:
    rope_type = str(getattr(rotary, "rope_type", "default"))
    return "dynamic" in rope_type or rope_type == "longrope"


def _rotary_parents(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, Rope2DRotaryEmbedding):
                found.append((parent, name, child))
            elif name.endswith("rotary_emb") and hasattr(child, "inv_freq"):
                found.append((parent, name, child))
    return found


def patch_rope_2d(model: nn.Module, ratio: float) -> nn.Module:
    """Replace every `*rotary_emb` module that has `inv_freq` by the 2D version (idempotent)."""
    found = _rotary_parents(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no rotary_emb module with inv_freq; 2D RoPE cannot be applied")
    for parent, name, child in found:
        if isinstance(child, Rope2DRotaryEmbedding):
            child.ratio = float(ratio)
        else:
            setattr(parent, name, Rope2DRotaryEmbedding(child, ratio))
    return model


def stack_position_ids(pos1d: torch.Tensor, branch_pos: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """The [3,B,T] position_ids the patched model reads its coordinates from."""
    return torch.stack([pos1d, branch_pos, time_ids], dim=0)
