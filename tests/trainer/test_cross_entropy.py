"""The training loss: chunked cross-entropy over labelled positions must equal one full-vocabulary
`F.cross_entropy`, in value and in the gradient that reaches the decoder, whatever the chunking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trainer_core.layout import IGNORE_INDEX
from trainer_core.model import chunked_cross_entropy

VOCAB, HIDDEN = 300, 24


def _reference(hidden, labels, head):
    logits = head(hidden).float()
    return F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def _inputs(seed: int, rows: int, length: int, ignored_share: float, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(HIDDEN, VOCAB, bias=False).to(dtype).requires_grad_(False)
    with torch.no_grad():
        head.weight.normal_(0, 0.5, generator=g)
    hidden = torch.randn(rows, length, HIDDEN, generator=g).to(dtype).requires_grad_(True)
    labels = torch.randint(0, VOCAB, (rows, length), generator=g)
    labels[torch.rand(rows, length, generator=g) < ignored_share] = IGNORE_INDEX
    return hidden, labels, head


def _loss_and_grad(fn, hidden, labels, head, **kw):
    hidden.grad = None
    loss = fn(hidden, labels, head, **kw)
    (loss / 7).backward()   # a scale after the loss, as the trainer divides by the label count
    return loss.detach(), hidden.grad.clone()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 3), length=st.integers(1, 40),
       chunk=st.integers(1, 50), ignored_share=st.sampled_from([0.0, 0.3, 1.0]))
def test_chunked_loss_and_gradient_equal_full_cross_entropy(seed, rows, length, chunk, ignored_share):
    hidden, labels, head = _inputs(seed, rows, length, ignored_share)
    loss, grad = _loss_and_grad(chunked_cross_entropy, hidden, labels, head, chunk=chunk)
    ref_loss, ref_grad = _loss_and_grad(_reference, hidden, labels, head)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert not grad[labels == IGNORE_INDEX].any()   # unlabelled positions get no gradient


def test_bf16_head_matches_autograd_through_float32_logits():
    """On a bf16 model: float32 logits, the loss as exact as autograd's, the gradient within bf16 rounding."""
    hidden, labels, head = _inputs(0, 2, 64, 0.2, torch.bfloat16)
    loss, grad = _loss_and_grad(chunked_cross_entropy, hidden, labels, head, chunk=16)
    ref_loss, ref_grad = _loss_and_grad(_reference, hidden, labels, head)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-3)
    assert (grad.float() - ref_grad.float()).norm() / ref_grad.float().norm() < 1e-2


def test_trainable_head_still_gets_its_gradient():
    """A head that trains (e.g. LoRA on lm_head) takes the checkpointed path, so its weight gets a gradient."""
    hidden, labels, head = _inputs(1, 2, 30, 0.2)
    head.weight.requires_grad_(True)
    chunked_cross_entropy(hidden, labels, head, chunk=8).backward()
    fused_grad = head.weight.grad.clone()
    head.weight.grad = None
    _reference(hidden, labels, head).backward()
    torch.testing.assert_close(fused_grad, head.weight.grad, rtol=1e-4, atol=1e-5)


def test_no_grad_evaluation_keeps_no_gradient_buffer():
    hidden, labels, head = _inputs(2, 1, 20, 0.0)
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, labels, head, chunk=8)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _reference(hidden, labels, head).detach(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("chunk", [4, 1000])
def test_gradient_of_a_sum_of_two_losses(chunk):
    """Gradient accumulation: two calls on the same hidden states add up, as autograd would."""
    hidden, labels, head = _inputs(3, 1, 12, 0.0)
    (chunked_cross_entropy(hidden, labels, head, chunk=chunk) * 2
     + chunked_cross_entropy(hidden, labels, head, chunk=chunk)).backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    (3 * _reference(hidden, labels, head)).backward()
    torch.testing.assert_close(grad, hidden.grad, rtol=1e-4, atol=1e-6)
