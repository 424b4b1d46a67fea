"""Crafted rows and small helpers for the routing tests (no dependency on other areas' data)."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

WORDS = ["left", "right", "up", "down", "fire", "ball", "paddle", "above", "below", "image"]


def random_image(rng: random.Random, size: int = 32) -> Image.Image:
    pixels = np.array([[rng.randrange(256) for _ in range(3)] for _ in range(size * size)], dtype=np.uint8)
    return Image.fromarray(pixels.reshape(size, size, 3), "RGB")


def make_rows(n: int, seed: int, n_images: int | tuple[int, ...] = 1, answer_len: int = 2, prefix: str = "Action:"):
    """``n`` rows with random images, a short prompt and an answer of ``answer_len`` words."""
    rng = random.Random(seed)
    counts = (n_images,) if isinstance(n_images, int) else n_images
    rows = []
    for i in range(n):
        k = counts[i % len(counts)]
        rows.append(
            {
                "images": [random_image(rng) for _ in range(k)],
                "prompt": f"{prefix} {rng.choice(WORDS)} {rng.choice(WORDS)}",
                "answer": " ".join(rng.choice(WORDS) for _ in range(answer_len)),
            }
        )
    return rows


def tag(rows, route: str):
    return [{**r, "route": route} for r in rows]


def text_rows(n: int, seed: int, vocab: int, length: int = 12, answer: int = 4):
    """Pre-tokenised rows of one fixed length, labels on the last ``answer`` tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length - answer) + ids[-answer:]})
    return rows


def tiny_text_lm(vocab: int, seed: int = 0):
    """A 2-layer Qwen2 causal LM built from config (the text-only case)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128, pad_token_id=0,
    )
    return Qwen2ForCausalLM(config)


def routing_args(tmp_path, **overrides):
    """A small, quiet, CPU ``RoutingConfig`` for tests."""
    from ilora.routing.trainer import RoutingConfig

    kwargs = dict(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, lora_r=4, lora_alpha=8,
        lora_dropout=0.0, save_strategy="no", disable_tqdm=True, logging_steps=1, learning_rate=1e-3,
        use_cpu=True, seed=0,
    )
    kwargs.update(overrides)
    return RoutingConfig(**kwargs)


def random_lora_vlm(model_dir, seed: int):
    """The tiny VLM with a rank-4 LoRA adapter whose B is random (a non-zero delta), and its processor."""
    import torch

    from ilora.models.load import load_vlm
    from ilora.routing.lora import apply_lora

    model, processor = load_vlm(model_dir)
    peft_model = apply_lora(model, r=4, alpha=8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return peft_model, processor
