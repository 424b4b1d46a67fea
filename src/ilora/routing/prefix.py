"""Running the prompt prefix that task rows share once per micro-batch, not once per row.

Rows of one task carry the same text before their images (an Atari game's rules and action
meanings: ~190 of Pong's ~370 tokens). With right padding that prefix sits at the same
positions in every row, so its keys and values are the same for all of them: one batch-1
forward of the prefix, expanded along the batch as the cache of the rest, gives every row's
logits and, because the expanded cache carries gradient, the same gradients (each row's
gradient adds up in the one prefix pass). A training step of the tiny model takes about half
the time (``benchmarks/bench_prompt_prefix.py``).

Only forwards whose LoRA outputs are not recorded use it: the L_norm recorder counts
positions per row, and a shared prefix is one row for all of them.
"""

from __future__ import annotations

import torch

from ilora.models.cache import cache_layers, expanded_cache, output_cache

MIN_SHARED_TOKENS = 16  # below this a second forward costs more than it saves
MIN_SPLIT_SAVING = 0.25  # split a micro-batch into forwards of alike rows only when it saves this share of tokens


def plan_forwards(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, is_task: torch.Tensor, image_token: int | None
) -> list[list[int]] | None:
    """Whether a micro-batch runs as one forward or as groups of alike rows, and which groups.

    A group is the rows of one route (task or general) with the same text before their images.
    Splitting pays when the groups' padded tokens, each task group's prefix counted once, come
    to at most ``1 - MIN_SPLIT_SAVING`` of the whole batch's padded tokens (every extra forward
    has a fixed cost): true for Atari rows mixed with short general questions, false for rows
    of one length.

    Args:
        input_ids: ``[B, T]`` right-padded token ids.
        attention_mask: ``[B, T]``.
        is_task: bool ``[B]``.
        image_token: the image placeholder id, or ``None``.

    Returns:
        Row-index lists (each of one route), or ``None`` for one forward over all rows.
    """
    ids, lengths, routes = input_ids.tolist(), attention_mask.sum(1).tolist(), is_task.tolist()
    groups: dict[tuple, list[int]] = {}
    for i, (row, task) in enumerate(zip(ids, routes)):
        head = row[: row.index(image_token)] if image_token is not None and image_token in row else []
        groups.setdefault((task, tuple(head)), []).append(i)
    if len(groups) == 1:
        return None
    split = 0
    for (task, head), rows in groups.items():
        split += len(rows) * max(lengths[i] for i in rows)
        if task and len(head) >= MIN_SHARED_TOKENS:
            split -= (len(rows) - 1) * len(head)
    if split > (1 - MIN_SPLIT_SAVING) * len(ids) * max(lengths):
        return None
    return list(groups.values())


def shared_prefix_length(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, image_token: int | None
) -> int:
    """How many leading tokens all rows share and may run once.

    The prefix stops before the first image placeholder (each row's images differ), before the
    first position whose logits are needed, and where any row has padding.

    Args:
        input_ids: ``[B, T]`` right-padded token ids.
        attention_mask: ``[B, T]``.
        positions: positions whose logits are needed (any rows).
        image_token: the image placeholder id, or ``None``.

    Returns:
        The length, or 0 when fewer than two rows or ``MIN_SHARED_TOKENS`` tokens would share it.
    """
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    if image_token is not None:
        same &= input_ids[0] != image_token
    limit = [same.long().cumprod(0).sum()]
    if positions.numel():
        limit.append(positions.min())
    length = min(torch.stack(limit).tolist())  # one host sync
    return length if length >= MIN_SHARED_TOKENS else 0


def forward_with_shared_prefix(model, kwargs: dict, length: int, cache_arg: str = "past_key_values"):
    """``model(**kwargs)`` with the first ``length`` tokens run once for all rows.

    Args:
        model: a causal (V)LM whose forward takes a cache and returns one with per-layer
            ``keys``/``values``.
        kwargs: ``input_ids``, ``attention_mask`` and optionally ``pixel_values`` of the full rows
            (the images must come after the prefix) and ``logits_to_keep``: positions in the full
            rows, all ``>= length`` (absent: every position after the prefix).
        length: the shared prefix (from :func:`shared_prefix_length`).

    Returns:
        The model output of the rest of the rows; ``logits`` cover ``logits_to_keep`` (or the
        positions after the prefix), in order.

    Raises:
        ValueError: when the model's cache does not expose keys and values.
    """
    ids, mask, logits_to_keep = kwargs["input_ids"], kwargs["attention_mask"], kwargs.get("logits_to_keep")
    prefix_kwargs = {"logits_to_keep": 1} if logits_to_keep is not None else {}
    prefix = model(input_ids=ids[:1, :length], attention_mask=mask[:1, :length], use_cache=True, **prefix_kwargs)
    layers = cache_layers(output_cache(prefix))
    if layers is None:
        raise ValueError(f"cache type {type(output_cache(prefix)).__name__} does not expose keys and values")
    rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "logits_to_keep")}
    if logits_to_keep is not None:
        rest["logits_to_keep"] = logits_to_keep - length
    rest[cache_arg] = expanded_cache(layers, ids.shape[0])
    return model(input_ids=ids[:, length:], use_cache=True, **rest)
