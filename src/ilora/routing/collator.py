"""Mixing task and general data with route tags, and batching them for the routing trainer.

Rows follow the project's example contract ``{"images": [PIL, ...], "prompt": str,
"answer": str, ...}`` (or, for text-only causal LMs, pre-tokenised ``{"input_ids",
"labels"}``); the mixer adds ``route`` (``"task"`` or ``"general"``) and the collator turns
it into an ``is_task`` tensor plus the per-row image count needed to split ``pixel_values``.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ilora.errors import IloraError
from ilora.models.inputs import encode_row, pad_batch

ROUTES = ("task", "general")


@dataclass
class Source:
    """One data source in the training mix.

    Attributes:
        rows: any indexable of example rows (a list, a ``datasets.Dataset``...).
        route: ``"task"`` (LM loss) or ``"general"`` (KL + LoRA-norm).
        size: rows drawn from it (``None``: all of them); more than ``len(rows)`` repeats rows.
        name: for error messages and logs.
    """

    rows: Sequence[dict[str, Any]]
    route: str
    size: int | None = None
    name: str = "data"


class RoutedDataset(torch.utils.data.Dataset):
    """Rows of several sources, each tagged with its route, in one seeded shuffled order.

    Rows are fetched lazily from their source (nothing is copied up front) and returned as a
    new dict with a ``route`` key; the source rows are never modified.
    """

    def __init__(self, sources: Sequence[Source], seed: int = 0):
        rng = random.Random(seed)
        self.sources = list(sources)
        index: list[tuple[int, int]] = []
        for s, source in enumerate(self.sources):
            if source.route not in ROUTES:
                raise IloraError(f"{source.name}: route {source.route!r}, expected one of {ROUTES}")
            n = len(source.rows)
            if n == 0:
                raise IloraError(f"{source.name}: no rows")
            size = n if source.size is None else source.size
            if size < 0:
                raise IloraError(f"{source.name}: size {size} is negative")
            picks = [i for _ in range(size // n) for i in range(n)] + rng.sample(range(n), size % n)
            index += [(s, i) for i in picks]
        rng.shuffle(index)
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s, j = self.index[i]
        source = self.sources[s]
        return {**source.rows[j], "route": source.route}

    def route_counts(self) -> Counter:
        """How many rows take each route."""
        return Counter(self.sources[s].route for s, _ in self.index)


def mix_sources(task: Sequence[Source | Sequence[dict]], general: Sequence[Source | Sequence[dict]] = (), seed: int = 0):
    """A ``RoutedDataset`` from task sources and general sources (plain row lists or ``Source``s).

    The paper's mix is one task source of 100k rows plus general sources of 30k (general
    vision-language data) and 30k (other games): ``Source(rows, "general", 30_000)``.
    """

    def as_source(x, route: str, i: int) -> Source:
        if isinstance(x, Source):
            if x.route != route:
                raise IloraError(f"{x.name}: given as {route} data but its route is {x.route!r}")
            return x
        return Source(x, route, name=f"{route}[{i}]")

    return RoutedDataset([as_source(x, "task", i) for i, x in enumerate(task)]
                         + [as_source(x, "general", i) for i, x in enumerate(general)], seed=seed)


def route_counts(dataset) -> Counter:
    """Route counts of any dataset: a ``RoutedDataset``, a ``datasets.Dataset`` with a ``route``
    column, or a list of rows.

    Raises:
        IloraError: when rows have no ``route`` or an unknown one.
    """
    if isinstance(dataset, RoutedDataset):
        return dataset.route_counts()
    names = getattr(dataset, "column_names", None)
    if names is not None:
        if "route" not in names:
            raise IloraError(f"dataset has no 'route' column (columns: {names}); build it with mix_sources")
        routes = dataset["route"]
    else:
        routes = []
        for i, row in enumerate(dataset):
            if "route" not in row:
                raise IloraError(f"row {i} has no 'route' key (keys: {sorted(row)}); build the data with mix_sources")
            routes.append(row["route"])
    counts = Counter(routes)
    bad = sorted(set(counts) - set(ROUTES))
    if bad:
        raise IloraError(f"unknown route value(s) {bad}; expected {ROUTES}")
    return counts


class RoutingCollator:
    """Encode and pad routed rows; labels only on the answer tokens.

    Returns batches with ``input_ids``, ``attention_mask``, ``labels``, ``pixel_values`` (all
    images of the batch, concatenated in row order; absent when no row has images),
    ``is_task`` (bool ``[B]``) and ``n_images`` (long ``[B]``).

    Args:
        processor: the VLM processor (rows with ``images``/``prompt``/``answer``); any
            tokenizer works for pre-tokenised rows (``input_ids``/``labels``).
        padding_side: ``"right"`` for training.
    """

    def __init__(self, processor, padding_side: str = "right"):
        self.processor = processor
        self.padding_side = padding_side
        tokenizer = getattr(processor, "tokenizer", processor)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, row: dict[str, Any], i: int) -> dict[str, Any]:
        if "route" not in row:
            raise IloraError(f"row {i} has no 'route' key (keys: {sorted(row)}); build the data with mix_sources")
        if row["route"] not in ROUTES:
            raise IloraError(f"row {i}: route {row['route']!r}, expected one of {ROUTES}")
        if "input_ids" in row and "labels" in row:
            return {"input_ids": list(row["input_ids"]), "labels": list(row["labels"]), "pixel_values": None}
        if "answer" not in row or "prompt" not in row:
            raise IloraError(
                f"row {i} has no labels: expected 'prompt' + 'answer' (or pre-tokenised 'input_ids' + 'labels'), "
                f"got keys {sorted(row)}"
            )
        return encode_row(self.processor, row)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        features = [self.encode(row, i) for i, row in enumerate(rows)]
        batch = pad_batch(features, self.pad_id, self.padding_side)
        batch["is_task"] = torch.tensor([row["route"] == "task" for row in rows])
        batch["n_images"] = torch.tensor(
            [0 if f["pixel_values"] is None else len(f["pixel_values"]) for f in features], dtype=torch.long
        )
        return batch


def select_rows(batch: dict[str, torch.Tensor], keep: torch.Tensor, n_images: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The sub-batch of rows where ``keep`` is true, trimmed to its own non-padding columns.

    ``pixel_values`` (concatenated over the batch's images in row order) is split by each
    row's image count, so rows with several images (or none) stay aligned.

    Args:
        batch: model inputs (``input_ids``, ``attention_mask``, ``labels``, maybe ``pixel_values``).
        keep: bool ``[B]``.
        n_images: long ``[B]``, images per row.

    Returns:
        The sub-batch, or ``None`` when no row is kept.
    """
    rows = keep.nonzero(as_tuple=True)[0]
    if rows.numel() == 0:
        return None
    mask = batch["attention_mask"].index_select(0, rows)
    columns = mask.any(0).nonzero(as_tuple=True)[0]
    stats = [columns.min(), columns.max()]
    if "pixel_values" in batch:
        stats.append(n_images.to(rows.device).index_select(0, rows).sum())
    first, last, *kept_images = torch.stack(stats).tolist()  # one sync
    span = slice(first, last + 1)
    sub = {k: batch[k].index_select(0, rows)[:, span] for k in ("input_ids", "labels") if k in batch}
    sub["attention_mask"] = mask[:, span]
    if kept_images and kept_images[0] > 0:
        image_keep = torch.repeat_interleave(keep.to(n_images.device), n_images)
        sub["pixel_values"] = batch["pixel_values"][image_keep.to(batch["pixel_values"].device)]
    return sub
