"""Columnar layout of parallel-branch samples, their labels and attention rule, and packing into rows.

Pure tensor functions (DESIGN.md §1). A sample is a main prefix plus parallel branches; branch k of
`[main] + branches` (or just `branches` when there is no main) gets branch coordinate k * stride. Main
tokens take times 0..M-1, every branch starts at time M. Tokens are ordered column-major by
(time, k), so a row reads "column by column" and pos1d is just the index in that order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100
PAD_SAMPLE_ID = -1
FLEX_BLOCK_TOKENS = 128   # FlexAttention's block: rows for the flex kernel are padded to whole blocks


@dataclass
class SampleLayout:
    """One sample in column-major order; all fields are 1-D LongTensors of equal length."""

    input_ids: torch.Tensor
    time_ids: torch.Tensor
    branch_pos: torch.Tensor
    pos1d: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.numel()


def _as_array(ids: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.cpu().numpy()
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def build_sample_layout(main_ids: Sequence[int] | np.ndarray | torch.Tensor | None,
                        branches_ids: Sequence[Sequence[int] | np.ndarray | torch.Tensor],
                        branch_stride: int = 128) -> SampleLayout:
    """Lay one sample out in columns. Vectorised with numpy (no per-token Python loop; numpy's per-call
    overhead is a tenth of torch's on these small arrays), returned as torch tensors."""
    main = _as_array(main_ids if main_ids is not None else [])
    has_main = main.size > 0
    seqs = ([main] if has_main else []) + [_as_array(b) for b in branches_ids]
    if not seqs:
        raise ValueError("a sample needs a main or at least one branch")
    main_len = main.size

    lengths = np.array([s.size for s in seqs], dtype=np.int64)
    flat_ids = np.concatenate(seqs)
    n = flat_ids.size
    branch_index = np.repeat(np.arange(len(seqs)), lengths)                  # k per token
    starts = np.cumsum(lengths) - lengths
    offset_in_branch = np.arange(n) - np.repeat(starts, lengths)            # j per token
    time = offset_in_branch + np.where((branch_index == 0) & has_main, 0, main_len)

    # The next token of the same branch; the last token of each branch predicts nothing.
    is_last = offset_in_branch == np.repeat(lengths - 1, lengths)
    flat_labels = np.empty_like(flat_ids)
    flat_labels[:-1] = flat_ids[1:]
    flat_labels[is_last] = IGNORE_INDEX

    # Column-major order: by time, then branch. (time, k) is unique per token, so the key is exact.
    order = np.argsort(time * len(seqs) + branch_index, kind="stable")
    return SampleLayout(
        input_ids=torch.from_numpy(flat_ids[order]),
        time_ids=torch.from_numpy(time[order]),
        branch_pos=torch.from_numpy(branch_index[order] * branch_stride),
        pos1d=torch.arange(n),
        labels=torch.from_numpy(flat_labels[order]),
    )


def columnar_mask(time_ids: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
    """Dense bool attention mask [B,1,T,T] (True = may attend) for SDPA.

    Query i sees key j iff both are in the same (non-padding) sample and time[j] < time[i], or i == j.
    Padding (sample id -1) sees only itself, which keeps its softmax finite, and nobody sees it.
    """
    if time_ids.shape != sample_ids.shape or time_ids.dim() != 2:
        raise ValueError(f"time_ids and sample_ids must both be [B,T], got {tuple(time_ids.shape)} "
                         f"and {tuple(sample_ids.shape)}")
    T = time_ids.shape[1]
    same_sample = (sample_ids[:, :, None] == sample_ids[:, None, :]) & (sample_ids[:, :, None] >= 0)
    earlier = time_ids[:, None, :] < time_ids[:, :, None]
    diagonal = torch.eye(T, dtype=torch.bool, device=time_ids.device)
    return ((same_sample & earlier) | diagonal).unsqueeze(1)


def columnar_block_mask(time_ids: torch.Tensor, sample_ids: torch.Tensor):
    """The same rule as `columnar_mask`, as a FlexAttention BlockMask (never materialises [T,T]).

    Fully masked 128x128 blocks (other samples, padding) are skipped by the kernel, so packing several
    samples into one row costs only their own blocks.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = time_ids.shape

    def mask_mod(b, h, q_idx, kv_idx):
        same = (sample_ids[b, q_idx] == sample_ids[b, kv_idx]) & (sample_ids[b, q_idx] >= 0)
        return (same & (time_ids[b, kv_idx] < time_ids[b, q_idx])) | (q_idx == kv_idx)

    # Compiled on CUDA: eagerly the mask is built as a dense [T, T] tensor first, the very thing to avoid.
    build = _compiled_create_block_mask() if time_ids.is_cuda else create_block_mask
    return build(mask_mod, B, None, T, T, device=time_ids.device)


@functools.cache
def _compiled_create_block_mask():
    """What torch recommends over create_block_mask(_compile=True), deprecated since torch 2.13."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


# --- packing ---------------------------------------------------------------------------------------

def pack_into_rows(lengths: Sequence[int], tokens_per_row: int) -> list[list[int]]:
    """Group sample indices into rows of at most `tokens_per_row` tokens (first-fit decreasing).

    A sample longer than the budget gets a row of its own: samples are never split, since a branch's
    tokens must see their own columns.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(tokens_per_row - lengths[i])
    return rows


@dataclass
class PackedBatch:
    """Rows of packed samples; every field is [R, T]. sample_ids is -1 on padding."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pos1d: torch.Tensor
    branch_pos: torch.Tensor
    time_ids: torch.Tensor
    sample_ids: torch.Tensor

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        return int((self.sample_ids >= 0).sum())

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(**{k: v.to(device, non_blocking=True) for k, v in vars(self).items()})


def row_plan(lengths: Sequence[int], tokens_per_row: int, dense_attention: bool) -> tuple[list[list[int]], int]:
    """(rows of sample indices, padded row length T): the packing rule of each attention backend.

    With a block-sparse kernel (flex, on CUDA) a long row costs only its samples' own blocks, so rows fill up
    to `tokens_per_row`, padded to whole 128-token blocks (which also keeps the number of distinct compiled
    shapes small). A dense mask (SDPA, the CPU path) costs T^2 per row, so there rows stop at the longest
    sample's length: short samples still share rows, but no row grows past what padding would."""
    if dense_attention:
        tokens_per_row, multiple = min(tokens_per_row, max(lengths)), 8
    else:
        multiple = FLEX_BLOCK_TOKENS
    rows = pack_into_rows(lengths, tokens_per_row)
    return rows, round_up(max(sum(lengths[i] for i in row) for row in rows), multiple)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate_packed(layouts: Sequence[SampleLayout], tokens_per_row: int, pad_to_multiple: int = 8) -> PackedBatch:
    """Pack sample layouts into as few rows as fit the budget; pad rows to the longest row only."""
    rows = pack_into_rows([len(lay) for lay in layouts], tokens_per_row)
    return collate_rows(layouts, rows, round_up(max(sum(len(layouts[i]) for i in row) for row in rows),
                                                pad_to_multiple))


def collate_rows(layouts: Sequence[SampleLayout], rows: list[list[int]], T: int) -> PackedBatch:
    """The layouts placed in `rows` (lists of layout indices, as pack_into_rows gives), each row padded to T."""
    R = len(rows)
    fill = {"input_ids": 0, "labels": IGNORE_INDEX, "pos1d": 0, "branch_pos": 0, "time_ids": 0}
    out = {name: np.full((R, T), value, dtype=np.int64) for name, value in fill.items()}
    out["sample_ids"] = np.full((R, T), PAD_SAMPLE_ID, dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for sid, i in enumerate(row):
            lay, n = layouts[i], len(layouts[i])
            for name in fill:   # numpy views of the layout tensors: no copies, no torch op overhead
                out[name][r, at:at + n] = getattr(lay, name).numpy()
            out["sample_ids"][r, at:at + n] = sid
            at += n
    return PackedBatch(**{k: torch.from_numpy(v) for k, v in out.items()})
