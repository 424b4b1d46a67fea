"""How loud an adapter is on each kind of data: the paper's Table 6 and Figure 5.

Table 6: per data type (task, general, other games...), the mean squared LoRA-B output norm
per LoRA layer and averaged over layers. Figure 5: a heatmap of one layer's LoRA-B outputs
(positions × output channels) on each data type, on one shared colour scale.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ilora.fileio import atomic_dir
from ilora.routing.collator import RoutingCollator
from ilora.routing.hooks import LoraOutputRecorder


@torch.no_grad()
def lora_activation_norms(
    peft_model, processor, rows: Sequence[dict[str, Any]], batch_size: int = 8, keep_layer: str | None = None,
    desc: str = "rows",
) -> tuple[dict[str, float], torch.Tensor | None]:
    """Mean over positions of ``‖scaling · lora_B(x)‖²`` for every LoRA layer on ``rows``.

    Positions are the rows' non-padding tokens (language layers) and image patches (vision
    tower, projector), as in ``L_norm``.

    Args:
        peft_model: a model with a LoRA adapter ``"default"``.
        processor: its processor or tokenizer.
        rows: example rows (``route`` not needed).
        batch_size: rows per forward.
        keep_layer: a LoRA layer whose outputs are also returned (``[positions, channels]``).

    Returns:
        ``({layer name: mean squared norm}, kept outputs or None)``.
    """
    recorder = LoraOutputRecorder(peft_model, keep_outputs=(keep_layer,) if keep_layer else ())
    collate = RoutingCollator(processor)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    kept: list[torch.Tensor] = []
    device = next(peft_model.parameters()).device
    peft_model.eval()
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False):
            batch = collate([{**rows[i], "route": "general"} for i in range(start, min(start + batch_size, len(rows)))])
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
            with recorder.record(inputs["attention_mask"]):
                peft_model(**inputs, use_cache=False)
            for name, total in recorder.sums.items():
                sums[name] = sums.get(name, 0.0) + float(total)
                counts[name] = counts.get(name, 0) + recorder.counts[name]
            kept += recorder.outputs.get(keep_layer, [])
    finally:
        recorder.remove()
    norms = {name: sums[name] / counts[name] for name in sums if counts[name] > 0}
    return norms, (torch.cat(kept).cpu() if kept else None)


def activation_table(norms: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Table 6 as data: per data type, per-layer values and their average over layers."""
    return {
        kind: {"average": sum(per_layer.values()) / max(len(per_layer), 1), "layers": dict(per_layer)}
        for kind, per_layer in norms.items()
    }


def format_table(table: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text Table 6: one line per data type with the layer average."""
    width = max(len(k) for k in table)
    lines = [f"{'data':<{width}}  mean ||LoRA-B out||^2 (avg over layers)"]
    lines += [f"{kind:<{width}}  {row['average']:.6g}" for kind, row in table.items()]
    return "\n".join(lines)


def plot_heatmaps(outputs: Mapping[str, torch.Tensor], layer: str, path: Path, max_positions: int = 64) -> None:
    """Figure 5: ``|LoRA-B output|`` of one layer (first positions × channels) per data type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {k: v[:max_positions].abs().numpy() for k, v in outputs.items()}
    vmax = max(float(v.max()) for v in shown.values()) or 1.0
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.6), squeeze=False)
    image = None
    for ax, (kind, values) in zip(axes[0], shown.items()):
        image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(kind)
        ax.set_xlabel("output channel")
        ax.set_ylabel("position")
    fig.colorbar(image, ax=axes[0].tolist(), label="|LoRA-B output|")
    fig.suptitle(f"LoRA-B activations of {layer}", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def analyze_activations(
    model_path: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    data: Mapping[str, Sequence[dict[str, Any]]],
    out_dir: str | os.PathLike,
    layer: str | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "cpu",
) -> dict[str, Any]:
    """Table 6 (``activations.json``, ``activations.txt``) and Figure 5 (``heatmap.png``) for one adapter.

    Args:
        model_path: the base model.
        adapter_dir: the PEFT adapter.
        data: data type name -> rows (e.g. ``{"task": ..., "general": ..., "other games": ...}``).
        out_dir: written atomically.
        layer: LoRA layer for the heatmap (default: the first language-model layer).

    Returns:
        The table (see ``activation_table``) with the heatmap layer under ``"heatmap_layer"``.
    """
    from ilora.errors import IloraError
    from ilora.routing.hooks import find_lora_layers
    from ilora.routing.lora import load_adapter
    from ilora.routing.train import load_model_and_processor

    model, processor = load_model_and_processor(model_path, dtype, device)
    peft_model = load_adapter(model, adapter_dir)
    layers = find_lora_layers(peft_model)
    names = [r.name for r in layers]
    if layer is None:
        layer = next((r.name for r in layers if r.part == "language"), names[0])
    elif layer not in names:
        raise IloraError(f"--layer {layer}: not a LoRA layer of {adapter_dir}; e.g. {names[:4]}")
    norms, outputs = {}, {}
    for kind, rows in data.items():
        norms[kind], outputs[kind] = lora_activation_norms(peft_model, processor, rows, batch_size, layer, desc=kind)
    table = {"heatmap_layer": layer, "data": activation_table(norms)}
    with atomic_dir(out_dir) as tmp:
        (tmp / "activations.json").write_text(json.dumps(table, indent=1))
        (tmp / "activations.txt").write_text(format_table(table["data"]) + "\n")
        plot_heatmaps({k: v for k, v in outputs.items() if v is not None}, layer, tmp / "heatmap.png")
    return table
