"""The contract functions against DESIGN.md §1, checked with a plain per-token reading of the spec."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer_core.layout import (IGNORE_INDEX, build_sample_layout, collate_packed, columnar_mask,
                                 pack_into_rows, row_plan)

token = st.integers(min_value=0, max_value=50_000)
branch = st.lists(token, min_size=1, max_size=12)
sample = st.tuples(st.lists(token, min_size=0, max_size=10), st.lists(branch, min_size=1, max_size=16))


def spec_layout(main, branches, stride):
    """DESIGN.md §1, token by token: list every token with (time, k, j), sort by (time, k, j)."""
    seqs = ([main] if main else []) + branches
    M = len(main) if main else 0
    toks = []
    for k, seq in enumerate(seqs):
        for j, tok in enumerate(seq):
            is_main = bool(main) and k == 0
            time = j if is_main else M + j
            label = seq[j + 1] if j + 1 < len(seq) else IGNORE_INDEX
            toks.append((time, k, j, tok, label))
    toks.sort()
    return {
        "input_ids": [t[3] for t in toks],
        "time_ids": [t[0] for t in toks],
        "branch_pos": [t[1] * stride for t in toks],
        "pos1d": list(range(len(toks))),
        "labels": [t[4] for t in toks],
    }


@settings(max_examples=300, deadline=None)
@given(sample, st.sampled_from([1, 7, 128]))
def test_layout_matches_spec(s, stride):
    main, branches = s
    lay = build_sample_layout(main, branches, branch_stride=stride)
    want = spec_layout(main, branches, stride)
    for name, values in want.items():
        got = getattr(lay, name)
        assert got.dtype == torch.long and got.dim() == 1
        assert got.tolist() == values, name


def test_layout_small_example_by_hand():
    # main "a b", branches "c d e" and "f": times a0 b1 | c2 d3 e4 | f2
    lay = build_sample_layout([1, 2], [[3, 4, 5], [6]], branch_stride=128)
    assert lay.input_ids.tolist() == [1, 2, 3, 6, 4, 5]
    assert lay.time_ids.tolist() == [0, 1, 2, 2, 3, 4]
    assert lay.branch_pos.tolist() == [0, 0, 128, 256, 128, 128]
    assert lay.labels.tolist() == [2, IGNORE_INDEX, 4, IGNORE_INDEX, 5, IGNORE_INDEX]


def test_no_token_predicts_another_branch():
    lay = build_sample_layout([], [[10, 11, 12], [20, 21]], branch_stride=128)
    for tok, label, bp in zip(lay.input_ids.tolist(), lay.labels.tolist(), lay.branch_pos.tolist()):
        if label != IGNORE_INDEX:
            assert (tok // 10) == (label // 10)          # same branch family
    assert lay.time_ids.tolist() == [0, 0, 1, 1, 2]    # no main: branches start at time 0


def spec_mask(time_ids, sample_ids):
    B, T = len(time_ids), len(time_ids[0])
    return [[[[(i == j) or (sample_ids[b][i] == sample_ids[b][j] and sample_ids[b][i] >= 0
                            and time_ids[b][j] < time_ids[b][i]) for j in range(T)] for i in range(T)]]
            for b in range(B)]


@settings(max_examples=150, deadline=None)
@given(st.lists(sample, min_size=1, max_size=4), st.integers(min_value=8, max_value=80))
def test_packed_mask_matches_spec(samples, budget):
    layouts = [build_sample_layout(m, b) for m, b in samples]
    batch = collate_packed(layouts, tokens_per_row=budget)
    mask = columnar_mask(batch.time_ids, batch.sample_ids)
    assert mask.dtype == torch.bool and mask.shape == (batch.time_ids.shape[0], 1) + (batch.time_ids.shape[1],) * 2
    assert mask.tolist() == spec_mask(batch.time_ids.tolist(), batch.sample_ids.tolist())
    # every token of every sample is packed exactly once, padding carries no label
    assert batch.num_tokens == sum(len(lay) for lay in layouts)
    assert (batch.labels[batch.sample_ids < 0] == IGNORE_INDEX).all()
    # each sample's pos1d restarts at 0 inside its row
    for r in range(batch.sample_ids.shape[0]):
        for sid in batch.sample_ids[r].unique().tolist():
            if sid >= 0:
                pos = batch.pos1d[r][batch.sample_ids[r] == sid]
                assert pos.tolist() == list(range(len(pos)))


@given(st.lists(st.integers(min_value=1, max_value=100), min_size=1, max_size=30), st.integers(min_value=1, max_value=150))
def test_packing_respects_budget_and_keeps_every_sample(lengths, budget):
    rows = pack_into_rows(lengths, budget)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for row in rows:
        assert len(row) == 1 or sum(lengths[i] for i in row) <= budget


def test_samples_that_exactly_fill_a_row_share_it():
    assert pack_into_rows([4, 4], 8) == [[0, 1]]
    assert pack_into_rows([5, 3, 8], 8) == [[2], [0, 1]]


@given(st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=30),
       st.integers(min_value=128, max_value=2048))
def test_row_plan_is_each_backends_packing_rule(lengths, budget):
    """Dense attention (SDPA, CPU) costs T^2 per row: rows never grow past the longest sample (padded to 8).
    Block-sparse flex (CUDA) fills rows up to the budget, in whole 128-token blocks."""
    rows, T = row_plan(lengths, budget, dense_attention=True)
    assert T == -(-max(lengths) // 8) * 8   # no wider than padding every sample to the longest
    flex_rows, flex_T = row_plan(lengths, budget, dense_attention=False)
    assert flex_T % 128 == 0 and flex_T >= max(sum(lengths[i] for i in row) for row in flex_rows)
    assert len(flex_rows) <= len(rows)
    for plan in (rows, flex_rows):
        assert sorted(i for row in plan for i in row) == list(range(len(lengths)))


def test_padding_attends_only_itself_and_is_never_attended():
    time_ids = torch.tensor([[0, 1, 1, 0, 0]])
    sample_ids = torch.tensor([[0, 0, 0, -1, -1]])
    m = columnar_mask(time_ids, sample_ids)[0, 0]
    assert m[3].tolist() == [False, False, False, True, False]
    assert not m[:3, 3:].any()
    assert m[2].tolist() == [True, False, True, False, False]   # same column: not its sibling
    # whatever time ids padding carries: it sees itself only (padding of a packed row is not one sample)
    padding = columnar_mask(torch.tensor([[0, 1, 2]]), torch.tensor([[-1, -1, -1]]))[0, 0]
    assert torch.equal(padding, torch.eye(3, dtype=torch.bool))
