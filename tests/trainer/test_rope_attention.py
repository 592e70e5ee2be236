"""2D RoPE against DESIGN.md, the patched model against the stock one, flex against SDPA."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer_core.layout import build_sample_layout, collate_packed
from trainer_core.model import load_base_model, parallel_logits
from trainer_core.rope2d import Rope2DRotaryEmbedding, patch_rope_2d, rope_2d_cos_sin

CPU = torch.device("cpu")


def spec_cos_sin(inv_freq, pos1d, branch_pos, time_ids, ratio, scaling):
    """DESIGN.md: k = round(F*ratio) lowest-frequency pairs are 2D; m-th of them: even -> branch, odd -> time."""
    F = len(inv_freq)
    k = round(F * ratio)
    B, T = pos1d.shape
    cos = torch.zeros(B, T, 2 * F)
    sin = torch.zeros(B, T, 2 * F)
    for p in range(F):
        if p >= F - k:
            m = p - (F - k)
            coord = branch_pos if m % 2 == 0 else time_ids
        else:
            coord = pos1d
        angle = coord.float() * inv_freq[p]
        cos[..., p] = cos[..., p + F] = angle.cos() * scaling
        sin[..., p] = sin[..., p + F] = angle.sin() * scaling
    return cos, sin


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([1, 2, 3, 8, 32, 64]), st.floats(min_value=0, max_value=1), st.integers(1, 3), st.integers(1, 20))
def test_rope_2d_cos_sin_matches_spec(F, ratio, B, T):
    inv_freq = 1.0 / (10000 ** (torch.arange(F, dtype=torch.float) / F))
    g = torch.Generator().manual_seed(F * 100 + T)
    pos1d, branch, time = (torch.randint(0, 3000, (B, T), generator=g) for _ in range(3))
    cos, sin = rope_2d_cos_sin(inv_freq, pos1d, branch, time, ratio, attention_scaling=0.7)
    want_cos, want_sin = spec_cos_sin(inv_freq, pos1d, branch, time, ratio, 0.7)
    assert cos.shape == (B, T, 2 * F)
    torch.testing.assert_close(cos, want_cos)
    torch.testing.assert_close(sin, want_sin)


def test_ratio_one_uses_no_1d_pair_and_ratio_zero_no_2d_pair():
    inv_freq = 1.0 / (10000 ** (torch.arange(8, dtype=torch.float) / 8))
    a, b = torch.arange(6).view(1, 6), torch.arange(6).view(1, 6) * 7
    zeros = torch.zeros(1, 6, dtype=torch.long)
    # ratio 1: pos1d does not matter at all
    assert torch.equal(rope_2d_cos_sin(inv_freq, a, b, a, 1.0)[0], rope_2d_cos_sin(inv_freq, b, b, a, 1.0)[0])
    # ratio 0: branch and time do not matter at all (the reference would still use one 2D pair here)
    assert torch.equal(rope_2d_cos_sin(inv_freq, a, zeros, zeros, 0.0)[0], rope_2d_cos_sin(inv_freq, a, b, b, 0.0)[0])


def test_ratio_zero_reproduces_the_stock_model_exactly(tiny_model_dir):
    torch.manual_seed(0)
    ids = torch.randint(0, 500, (2, 33))
    stock = load_base_model(str(tiny_model_dir), CPU, torch.float32, "sdpa").eval()
    patched = patch_rope_2d(load_base_model(str(tiny_model_dir), CPU, torch.float32, "sdpa"), 0.0).eval()
    assert any(isinstance(m, Rope2DRotaryEmbedding) for m in patched.modules())
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, patched(ids).logits)
        # also the stock rotary output itself
        rot = stock.model.rotary_emb
        pos = torch.arange(33).view(1, 33)
        want = rot(torch.zeros(1, dtype=torch.float32), pos)
        got = patched.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


LENGTH_SCALED_ROPES = [
    {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
    {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0 + i for i in range(8)],
     "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0},
]


@pytest.mark.parametrize("rope", LENGTH_SCALED_ROPES, ids=lambda r: r["rope_type"])
def test_length_scaled_rope_types_keep_their_stock_frequencies(rope):
    """Dynamic NTK and LongRoPE pick their frequencies from the sequence length inside the stock forward:
    past max_position_embeddings, the patch must see the same frequencies (ratio 0: the same logits)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16, rope_parameters=rope)
    torch.manual_seed(0)
    stock = LlamaForCausalLM(cfg).eval()
    ratio0, ratio_half = (patch_rope_2d(copy.deepcopy(stock), r) for r in (0.0, 0.5))  # before any forward
    ids = torch.randint(0, 100, (1, 60))
    pos, branch = torch.arange(60).view(1, 60), torch.full((1, 60), 128)
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, ratio0(ids).logits)
        rotary = stock.model.rotary_emb   # its inv_freq now rescaled for 60 positions
        want = rope_2d_cos_sin(rotary.inv_freq, pos, branch, pos, 0.5, float(rotary.attention_scaling))
        got = ratio_half.model.rotary_emb(torch.zeros(1), torch.stack([pos, branch, pos]))
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_patched_model_generates(tiny_model_dir):
    model = patch_rope_2d(load_base_model(str(tiny_model_dir), CPU, torch.float32, "sdpa"), 0.5).eval()
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


def test_plain_text_through_the_patched_model_is_a_single_branch_sample(tiny_model_dir):
    """generate() and plain forward calls pass [B,T] position_ids: they read as one branch (branch
    coordinate 0, time = position), exactly as that text laid out as a sample of one branch trains."""
    model = patch_rope_2d(load_base_model(str(tiny_model_dir), CPU, torch.float32, "sdpa"), 0.5).eval()
    ids = torch.tensor([5, 6, 7, 8, 9, 10, 11])
    batch = collate_packed([build_sample_layout([], [ids])], tokens_per_row=4096)
    with torch.no_grad():
        plain = model(ids[None]).logits
        as_sample = parallel_logits(model, batch.input_ids, batch.pos1d, batch.branch_pos, batch.time_ids,
                                    batch.sample_ids)
    torch.testing.assert_close(plain[0], as_sample[0, :len(ids)], atol=1e-5, rtol=1e-5)


def _packed(samples):
    return collate_packed([build_sample_layout(m, b) for m, b in samples], tokens_per_row=4096)


SAMPLES = [([5, 6, 7, 8], [[9, 10, 11], [12, 13], [14, 15, 16, 17, 18]]), ([], [[20, 21, 22], [23, 24, 25, 26]])]


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_flex_block_mask_and_eager_match_sdpa_forward(tiny_model_dir, ratio):
    """Eager attention adds its mask to the scores: it needs a float mask where SDPA takes a bool one."""
    batch = _packed(SAMPLES)
    args = (batch.input_ids, batch.pos1d, batch.branch_pos, batch.time_ids, batch.sample_ids)
    outs = {}
    for impl in ("sdpa", "flex_attention", "eager"):
        model = patch_rope_2d(load_base_model(str(tiny_model_dir), CPU, torch.float32, impl), ratio).eval()
        with torch.no_grad():
            outs[impl] = parallel_logits(model, *args)
    valid = batch.sample_ids >= 0
    torch.testing.assert_close(outs["flex_attention"][valid], outs["sdpa"][valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs["eager"][valid], outs["sdpa"][valid], atol=1e-4, rtol=1e-4)


def test_packing_does_not_leak_between_samples(tiny_model_dir):
    model = patch_rope_2d(load_base_model(str(tiny_model_dir), CPU, torch.float32, "sdpa"), 0.5).eval()
    alone = _packed(SAMPLES[:1])
    both = _packed(SAMPLES)
    with torch.no_grad():
        a = parallel_logits(model, alone.input_ids, alone.pos1d, alone.branch_pos, alone.time_ids, alone.sample_ids)
        b = parallel_logits(model, both.input_ids, both.pos1d, both.branch_pos, both.time_ids, both.sample_ids)
    n = int((alone.sample_ids >= 0).sum())
    row = both.sample_ids[0]
    first_sample = (row == row[0]) & (row >= 0)
    torch.testing.assert_close(b[0][first_sample], a[0, :n], atol=1e-5, rtol=1e-5)


def test_siblings_in_the_same_column_do_not_see_each_other(tiny_model_dir):
    """Changing branch 2's tokens must not change branch 1's outputs at the same or earlier columns."""
    model = patch_rope_2d(load_base_model(str(tiny_model_dir), CPU, torch.float32, "sdpa"), 0.5).eval()
    a = _packed([([], [[30, 31, 32], [40, 41, 42]])])
    b = _packed([([], [[30, 31, 32], [50, 41, 42]])])   # branch 2's first token differs
    with torch.no_grad():
        la = parallel_logits(model, a.input_ids, a.pos1d, a.branch_pos, a.time_ids, a.sample_ids)
        lb = parallel_logits(model, b.input_ids, b.pos1d, b.branch_pos, b.time_ids, b.sample_ids)
    # column-major order: [30, 40 | 31, 41 | 32, 42]; token 30 (time 0) must not see 40/50
    torch.testing.assert_close(la[0, 0], lb[0, 0])
    assert not torch.allclose(la[0, 2], lb[0, 2])  # time 1 sees every branch at time 0


def test_cuda_path_and_cpu_path_compute_the_same_loss(tiny_model_dir):
    """Same batch, same weights: flex BlockMask + long packed rows (the CUDA path) vs SDPA + rows cut at the
    longest sample (the CPU path) vs a naive padded dense-float-mask full-logits loss."""
    import torch.nn.functional as F

    from trainer_core.config import TrainConfig
    from trainer_core.layout import IGNORE_INDEX
    from trainer_core.model import ParallelBranchLM, prepare_for_training
    from trainer_core.rope2d import stack_position_ids

    cfg = TrainConfig(base_model=str(tiny_model_dir), data_path="unused", lora_rank=4)
    layouts = [build_sample_layout(m, b) for m, b in SAMPLES + [([1, 2], [[3, 4, 5, 6, 7, 8, 9]])]]
    losses = {}
    for impl, budget in (("flex_attention", 4096), ("sdpa", max(len(lay) for lay in layouts))):
        torch.manual_seed(0)
        model = prepare_for_training(load_base_model(str(tiny_model_dir), CPU, torch.float32, impl), cfg)
        for name, p in model.named_parameters():   # non-zero LoRA so the adapters take part
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
        batch = collate_packed(layouts, tokens_per_row=budget)
        with torch.no_grad():
            losses[impl] = float(ParallelBranchLM(model)(**vars(batch))) / batch.num_label_tokens
        if impl == "sdpa":   # naive reference on the same model: one padded row per sample
            total, n = 0.0, 0
            for lay in layouts:
                mask = (lay.time_ids[None, :] < lay.time_ids[:, None]) | torch.eye(len(lay), dtype=torch.bool)
                pos = stack_position_ids(lay.pos1d[None], lay.branch_pos[None], lay.time_ids[None])
                with torch.no_grad():
                    logits = model(input_ids=lay.input_ids[None], attention_mask=mask[None, None], position_ids=pos).logits
                total += float(F.cross_entropy(logits[0], lay.labels, ignore_index=IGNORE_INDEX, reduction="sum"))
                n += int((lay.labels != IGNORE_INDEX).sum())
            losses["naive"] = total / n
    assert abs(losses["flex_attention"] - losses["sdpa"]) < 1e-4, losses
    assert abs(losses["naive"] - losses["sdpa"]) < 1e-4, losses
