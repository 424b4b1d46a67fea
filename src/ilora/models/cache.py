"""A key/value cache of one prompt prefix, shared by a batch of rows that continue it."""

from __future__ import annotations

import torch


def cache_layers(past) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per decoder layer ``(keys, values)`` of a ``transformers`` cache; ``None`` for cache types
    that do not expose them (then a prefix cannot be shared)."""
    layers = getattr(past, "layers", None)
    if not layers or not all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]


def expanded_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int):
    """A fresh ``DynamicCache`` holding a batch-1 prefix for ``batch_size`` rows.

    The tensors are expanded, not copied: the stored ones are never modified, and when they
    carry gradient every row's gradient adds up in the one prefix pass.
    """
    from transformers import DynamicCache

    return DynamicCache(
        ddp_cache_data=[(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in layers]
    )


def cache_argument(model) -> str:
    """The forward keyword that takes a cache: ``cache`` (transformers >= 5.2x, where
    ``past_key_values`` is deprecated) or ``past_key_values``; PEFT wrappers are looked through."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def output_cache(output):
    """The cache a forward returned, under either name."""
    cache = output.get("cache")
    return cache if cache is not None else output.get("past_key_values")
