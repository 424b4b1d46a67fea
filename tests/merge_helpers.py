"""Tiny models and PEFT adapters for the merge tests, built from configs (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_tiny_lm(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Qwen2ForCausalLM (hidden 32) saved with ``save_pretrained``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    Qwen2ForCausalLM(config).save_pretrained(out_dir)
    return out_dir


def make_adapter(
    base_dir: Path,
    out_dir: Path,
    seed: int,
    r: int = 8,
    alpha: int = 16,
    targets: list[str] | None = None,
    dtype: torch.dtype | None = None,
    **lora_kwargs,
) -> Path:
    """A PEFT LoRA adapter on ``base_dir`` with random A and B (so ΔW is non-zero)."""
    from peft import LoraConfig, get_peft_model

    from ilora.models.load import load_model

    model = load_model(base_dir)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or TARGETS, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    if dtype is not None:
        peft_model.to(dtype)
    peft_model.save_pretrained(out_dir)
    return out_dir
