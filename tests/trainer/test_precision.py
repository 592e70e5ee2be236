"""Mixed precision for the adapters: on a bf16 model, float32 LoRA weights compute in bf16 (no float32 copy
of every adapted layer's input), while their weights, gradients and optimiser state stay float32."""

from __future__ import annotations

import torch

from trainer_core.config import TrainConfig
from trainer_core.layout import build_sample_layout, collate_packed
from trainer_core.model import ParallelBranchLM, prepare_for_training


def _model(dtype: torch.dtype, adapter_dtype: str = "float32"):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096, initializer_range=0.1)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(config).to(dtype)
    torch.manual_seed(1)
    model = prepare_for_training(base, TrainConfig(base_model="m", data_path="d", lora_rank=8,
                                                   adapter_dtype=adapter_dtype))
    with torch.no_grad():  # LoRA B starts at zero; give it weight so both LoRA factors get gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


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
    reference_loss, reference_grads = _loss_and_grads(_model(torch.float32))
    model = _model(torch.bfloat16)
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
    model = _model(torch.bfloat16, adapter_dtype="model")
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
