"""Measuring an adapter's input Grams in its own model (the file format: :mod:`ilora.merge.grams`).

Per LoRA layer, ``G = Xᵀ X / count``: the mean over counted positions of ``x xᵀ``, with ``x``
the layer's input, over the positions ``hooks.LoraOutputRecorder`` counts (non-padding tokens
in language-model layers, every image patch in vision-tower and projector layers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ilora.errors import IloraError
from ilora.fileio import file_sha256
from ilora.merge.grams import GRAMS_FORMAT, GRAMS_VERSION, grams_path
from ilora.merge.io import LoraAdapter


@dataclass
class GramStat:
    """One layer's mean input Gram ``XᵀX / count`` (float32, ``n x n``) and its position count."""

    gram: torch.Tensor
    count: int


@torch.no_grad()
def collect_grams(
    model, processor, rows: Sequence[dict[str, Any]], batch_size: int = 8, adapter: str = "default", desc: str = "rows"
) -> dict[str, GramStat]:
    """Mean input Gram of every LoRA layer of ``model`` on ``rows``.

    Rows are batched as ``routing.analyze.lora_activation_norms`` does (``RoutingCollator``,
    prompt and answer tokens); sums are accumulated in float64.

    Args:
        model: a PEFT model holding the LoRA adapter ``adapter``.
        processor: its processor or tokenizer.
        rows: example rows (``route`` not needed).
        batch_size: rows per forward.
        adapter: the adapter whose LoRA layers are measured.
        desc: progress-bar label.

    Returns:
        ``{module name (no "base_model.model." prefix): GramStat}``, every LoRA layer that saw
        at least one position.
    """
    from tqdm.auto import tqdm

    from ilora.routing.collator import RoutingCollator
    from ilora.routing.hooks import find_lora_layers

    layers = find_lora_layers(model, adapter)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    batch_mask: list[torch.Tensor] = []  # the current batch's attention mask, read by the hooks

    def hook_for(ref):
        def hook(module, args):
            x = args[0]
            if ref.part == "language":
                mask = batch_mask[0]
                if x.shape[:-1] != mask.shape:
                    raise IloraError(
                        f"{ref.name}: input of shape {tuple(x.shape)} does not match the batch's tokens "
                        f"{tuple(mask.shape)}; cannot tell its padding positions"
                    )
                x = x[mask.bool()]
            else:  # vision tower, projector: every patch of every image counts
                x = x.reshape(-1, x.shape[-1])
            x = x.double()
            if ref.name in sums:
                sums[ref.name].addmm_(x.T, x)
            else:
                sums[ref.name] = x.T @ x
            counts[ref.name] = counts.get(ref.name, 0) + x.shape[0]

        return hook

    collate = RoutingCollator(processor)
    device = next(model.parameters()).device
    handles = [ref.layer.register_forward_pre_hook(hook_for(ref)) for ref in layers]
    model.eval()
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False):
            batch = collate([{**rows[i], "route": "general"} for i in range(start, min(start + batch_size, len(rows)))])
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
            batch_mask[:] = [inputs["attention_mask"]]
            model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: GramStat((sums[name] / counts[name]).float().cpu(), counts[name]) for name in sums if counts[name]}


def compute_adapter_grams(
    base: str | os.PathLike | None,
    adapter_dir: str | os.PathLike,
    task_rows: Sequence[dict[str, Any]],
    general_rows: Sequence[dict[str, Any]] | None = None,
    out: str | os.PathLike | None = None,
    batch_size: int = 8,
    device: str = "cpu",
) -> Path:
    """Measure an adapter's task and general Grams in its own model and write them atomically.

    Args:
        base: the base model folder or hub id (``None``: the adapter config's
            ``base_model_name_or_path``).
        adapter_dir: the PEFT LoRA adapter folder.
        task_rows: rows of the adapter's task.
        general_rows: general rows (``None`` or empty: no ``.general`` Grams).
        out: the Grams file (default ``<adapter_dir>/grams.safetensors``).
        batch_size: rows per forward.
        device: where the model runs (float32).

    Returns:
        The path written.
    """
    from ilora.models.load import load_vlm
    from ilora.routing.lora import load_adapter

    source = LoraAdapter(adapter_dir)
    if len(task_rows) == 0:
        raise IloraError(f"{adapter_dir}: no task rows to measure Grams on")
    base = base or source.base_model
    if not base:
        raise IloraError(f"{source.path / 'adapter_config.json'}: names no base_model_name_or_path; give the base model")
    out = Path(out) if out is not None else grams_path(adapter_dir)
    sha = file_sha256(source.weights_file)
    model, processor = load_vlm(base, "float32", device)
    peft_model = load_adapter(model, adapter_dir)
    data = {"task": task_rows, "general": general_rows or []}
    stats = {kind: collect_grams(peft_model, processor, rows, batch_size, desc=kind) for kind, rows in data.items() if rows}
    tensors = {}
    for kind, per_module in stats.items():
        missing = sorted(set(source.modules) - set(per_module))
        if missing:
            raise IloraError(f"{adapter_dir}: the {kind} rows never reach LoRA modules {missing[:4]}")
        tensors.update({f"{module}.{kind}": stat.gram for module, stat in per_module.items()})
    metadata = {
        "format": GRAMS_FORMAT,
        "version": GRAMS_VERSION,
        "counts": json.dumps({kind: {m: s.count for m, s in per_module.items()} for kind, per_module in stats.items()}),
        "task_rows": str(len(task_rows)),
        "general_rows": str(len(general_rows or [])),
        "adapter_sha256": sha,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
