"""Mixed precision for the adapters: on a bf16 model, float32 LoRA weights compute in bf16 (no float32 copy
of every adapted layer's input), while their weights, gradients and optimiser state stay float32. On a float16
model the loss is scaled (GradScaler): an overflowing step is skipped, not divergence."""

from __future__ import annotations

import pytest
import torch

from tests.trainer.conftest import tiny_lora_model
from trainer_core.config import TrainConfig
from trainer_core.layout import build_sample_layout, collate_packed
from trainer_core.model import ParallelBranchLM, prepare_for_training




def _batch():
    g = torch.Generator().manual_seed(0)
    branches = [[torch.randint(0, 512, (n,), generator=g) for n in (40, 25, 60)],
                [torch.randint(0, 512, (n,), generator=g) for n in (33, 50)]]
    return collate_packed([build_sample_layout(torch.randint(0, 512, (12,), generator=g), b) for b in branches],
                          tokens_per_row=4096)


def _loss_and_grads(model):
    batch = _batch()
    loss = ParallelBranchLM(model)(**vars(batch)) / batch.num_label_tokens
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def test_float32_adapters_on_a_bf16_model_compute_in_bf16_and_train_in_float32():
    reference_loss, reference_grads = _loss_and_grads(tiny_lora_model(torch.float32))
    model = tiny_lora_model(torch.bfloat16)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert not any(getattr(m, "cast_input_dtype_enabled", False) for m in model.modules())

    loss, grads = _loss_and_grads(model)
    assert abs(loss - reference_loss) / reference_loss < 0.02  # bf16 rounding, not a different computation
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), reference_grads[name].flatten(), dim=0)
        assert cosine > 0.98, (name, float(cosine))

    before = {n: p.detach().clone() for n, p in lora.items()}
    torch.optim.AdamW(lora.values(), lr=1e-5).step()
    assert all(p.dtype == torch.float32 for p in lora.values())
    # an update far below bf16's resolution of these weights still lands in float32
    assert all(not torch.equal(before[n], p) for n, p in lora.items())


def test_bf16_adapters_train_too():
    model = tiny_lora_model(torch.bfloat16, adapter_dtype="model")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)
    loss, grads = _loss_and_grads(model)
    assert torch.isfinite(torch.tensor(loss)) and all(torch.isfinite(g).all() for g in grads.values())


def test_compiled_layers_train_like_eager_ones():
    """--compile: the same loss and gradients, rows of different lengths without a recompile per length, and
    the parameter names (checkpoints, adapter files) unchanged."""
    from dataclasses import replace

    from transformers import Qwen2Config, Qwen2ForCausalLM

    def build(compile_layers: bool):
        config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        return prepare_for_training(Qwen2ForCausalLM(config), TrainConfig(base_model="m", data_path="d",
                                                                          compile=compile_layers))

    eager, compiled = build(False), build(True)
    assert all(layer._compiled_call_impl is not None for layer in compiled.get_base_model().get_decoder().layers)
    assert [n for n, _ in eager.named_parameters()] == [n for n, _ in compiled.named_parameters()]
    long_batch = _batch()
    short_batch = replace(long_batch, **{k: v[:, :100] for k, v in vars(long_batch).items()
                                         if isinstance(v, torch.Tensor) and v.dim() == 2})
    for batch in (long_batch, short_batch):
        losses = []
        for model in (eager, compiled):
            model.zero_grad()
            loss = ParallelBranchLM(model)(**vars(batch))
            loss.backward()
            losses.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
        (eager_loss, eager_grads), (compiled_loss, compiled_grads) = losses
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-4)
        for name, grad in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5)


# --- float16 loss scaling (optimizer_step): the scaler runs on CPU too, so the rules are checked here ---

def _step_setup(enabled: bool, init_scale: float = 2.0 ** 16):
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, enabled=enabled)
    return param, optimizer, scaler


def _backward(param, scaler, overflow: bool) -> None:
    param.grad = None
    scaler.scale(param.sum()).backward()
    if overflow:   # what a float16 backward gives when the scaled gradient exceeds 65504
        param.grad[1] = float("inf")


def test_under_loss_scaling_an_overflowing_step_is_skipped_and_the_scale_halved_then_training_goes_on():
    from trainer_core.train import optimizer_step

    param, optimizer, scaler = _step_setup(enabled=True)
    _backward(param, scaler, overflow=True)
    grad_norm, applied = optimizer_step(optimizer, scaler, [param], 1.0, loss=2.5, step=1)
    assert not applied and grad_norm == float("inf")
    assert torch.equal(param.detach(), torch.ones(4))     # nothing reached the weights
    assert scaler.get_scale() == 2.0 ** 15

    _backward(param, scaler, overflow=False)
    grad_norm, applied = optimizer_step(optimizer, scaler, [param], 1.0, loss=2.5, step=2)
    assert applied and grad_norm == pytest.approx(2.0)   # unscaled: d(sum)/dp = 1 for 4 entries
    assert (param.detach() < 1).all()


def test_under_loss_scaling_a_scale_driven_below_the_floor_or_a_nan_loss_is_divergence():
    from trainer_core.train import MIN_LOSS_SCALE, Diverged, optimizer_step

    param, optimizer, scaler = _step_setup(enabled=True, init_scale=MIN_LOSS_SCALE * 2)
    _backward(param, scaler, overflow=True)
    optimizer_step(optimizer, scaler, [param], 1.0, loss=2.5, step=1)   # scale halves to the floor: still a skip
    _backward(param, scaler, overflow=True)
    with pytest.raises(Diverged, match="step 2: float16 gradients overflow even at loss scale"):
        optimizer_step(optimizer, scaler, [param], 1.0, loss=2.5, step=2)

    param, optimizer, scaler = _step_setup(enabled=True)
    _backward(param, scaler, overflow=False)
    with pytest.raises(Diverged, match="step 7: loss nan"):
        optimizer_step(optimizer, scaler, [param], 1.0, loss=float("nan"), step=7)
    assert torch.equal(param.detach(), torch.ones(4))


def test_without_loss_scaling_an_infinite_gradient_norm_is_divergence_before_the_step():
    from trainer_core.train import Diverged, optimizer_step

    param, optimizer, scaler = _step_setup(enabled=False)
    _backward(param, scaler, overflow=True)
    with pytest.raises(Diverged, match="step 3: loss 2.5, gradient norm inf"):
        optimizer_step(optimizer, scaler, [param], 1.0, loss=2.5, step=3)
    assert torch.equal(param.detach(), torch.ones(4))
    _backward(param, scaler, overflow=False)
    assert optimizer_step(optimizer, scaler, [param], 1.0, loss=2.5, step=4) == (pytest.approx(2.0), True)


def test_float16_with_float16_adapters_is_refused_as_a_config_error():
    """GradScaler unscales float32 gradients only: the run would crash at its first step."""
    with pytest.raises(ValueError, match="dtype float16 needs adapter_dtype float32"):
        TrainConfig(base_model="m", data_path="d", dtype="float16", adapter_dtype="model")
    TrainConfig(base_model="m", data_path="d", dtype="bfloat16", adapter_dtype="model")


def test_a_checkpoint_without_a_loss_scale_resumes_a_float16_run(tmp_path):
    """Checkpoints from before loss scaling (or from a bf16/CPU run) hold none: the scale starts afresh."""
    from trainer_core import checkpoint as ckpt
    from trainer_core.model import lora_state_dict
    from trainer_core.train import restore_checkpoint

    model = tiny_lora_model(torch.float32)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = ckpt.save_checkpoint(tmp_path, step=3, lora_weights=lora_state_dict(model), optimizer=optimizer,
                                scheduler=scheduler, scaler=torch.amp.GradScaler("cpu", enabled=False),
                                state={"epoch": 0, "epoch_step": 3})
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    state = restore_checkpoint(path, model, optimizer, scheduler, scaler)
    assert (state["step"], state["epoch"], state["epoch_step"]) == (3, 0, 3)
    assert scaler.get_scale() == 1024.0


def test_a_checkpoint_keeps_the_loss_scale(tmp_path):
    from trainer_core import checkpoint as ckpt

    param, optimizer, scaler = _step_setup(enabled=True, init_scale=1024.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = ckpt.save_checkpoint(tmp_path, step=1, lora_weights={"w": param.detach()}, optimizer=optimizer,
                                scheduler=scheduler, scaler=scaler, state={})
    _, blob, _ = ckpt.load_checkpoint(path)
    resumed = torch.amp.GradScaler("cpu", enabled=True)
    resumed.load_state_dict(blob["scaler"])
    assert resumed.get_scale() == 1024.0
