"""Helpers shared by the trainer tests (imported as `tests.trainer.conftest`, as tests/server does)."""

from __future__ import annotations

import torch

from trainer_core.config import TrainConfig
from trainer_core.model import prepare_for_training


def tiny_lora_model(dtype: torch.dtype = torch.float32, adapter_dtype: str = "float32"):
    """A 2-layer random Qwen2 (vocabulary 512) with LoRA r8 on every linear layer and non-zero LoRA B."""
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
