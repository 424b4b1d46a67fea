"""``merge_adapters``: open and check the inputs, stream the chosen method module by module."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ilora.errors import IloraError
from ilora.fileio import atomic_dir
from ilora.merge import export
from ilora.merge.io import (
    RECORD_FORMAT,
    DeltaMap,
    LoraAdapter,
    LowRankDelta,
    MergedState,
    MergedStateWriter,
    load_merged_state,
    open_input,
    same_base,
    write_record,
)
from ilora.merge.method import Source
from ilora.merge.registry import get_method
from ilora.models.adapter import check_modules_fit
from ilora.models.load import model_weight_shapes, resolve_model_path

Input = str | os.PathLike | LoraAdapter | MergedState


def _where(src: Source) -> str:
    return str(src.path) if src.path is not None else "in-memory merged state"


def check_compatible(inputs: list[Source]) -> dict[str, tuple[int, int]]:
    """Refuse inputs of different base models or shapes; return the union of their modules.

    Returns:
        ``{module: (out, in)}`` in sorted module order (the streaming order).
    """
    for src in inputs[1:]:
        if not same_base(inputs[0].base_model, src.base_model):
            raise IloraError(
                f"{_where(src)}: base model {src.base_model!r} differs from {inputs[0].base_model!r} of {_where(inputs[0])}"
            )
    shapes: dict[str, tuple[tuple[int, int], Source]] = {}
    for src in inputs:
        for module, shape in src.modules.items():
            if module in shapes and shapes[module][0] != shape:
                first_shape, first = shapes[module]
                raise IloraError(
                    f"{_where(src)}: module {module!r} has shape {shape} but {first_shape} in {_where(first)}"
                )
            shapes.setdefault(module, (shape, src))
    return {m: shapes[m][0] for m in sorted(shapes)}


def check_distinct(described: list[dict]) -> None:
    """Refuse an input given twice (the same folder, or a copy of the same weights): it would silently count double."""
    for i, this in enumerate(described):
        for earlier in described[:i]:
            paths = (this["path"], earlier["path"])
            same_folder = all(paths) and Path(paths[0]).resolve() == Path(paths[1]).resolve()
            if same_folder or (this["sha256"] is not None and this["sha256"] == earlier["sha256"]):
                why = "the same folder" if same_folder else "identical weights (same sha256)"
                raise IloraError(f"{this['path']}: {why} as input {earlier['path']}; give each input once")


def check_base(inputs: list[Source], base: str) -> None:
    """Refuse a base model without the inputs' modules, or with other shapes, before anything is merged."""
    shapes = model_weight_shapes(base)
    for src in inputs:
        check_modules_fit(src.modules, shapes, _where(src), base)


def merge_adapters(
    inputs: list[Input],
    method: str = "ilora",
    *,
    base: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    export_lora_rank: int | None = None,
    save_model: bool = False,
    shard_bytes: int = 1 << 30,
    progress: bool = True,
    **options: Any,
) -> MergedState:
    """Merge LoRA adapters and/or a merged state into one weight delta per module.

    Args:
        inputs: PEFT adapter folders, merged-state folders, or open ``LoraAdapter`` /
            ``MergedState`` objects, in order (order decides max-magnitude ties).
        method: a registered method (``available_methods()``), e.g. ``"ilora"``, ``"ties"``,
            ``"peft:svd"``.
        base: base model folder (or ``builtin``); required by ``peft:*`` and ``save_model``.
        out: write the merged state there (atomically) and return it lazily loaded from
            disk; ``None`` keeps every module in memory.
        overwrite: replace an existing ``out``.
        export_lora_rank: also write ``out/lora_rank{R}``, a PEFT adapter approximating ΔW.
        save_model: also write ``out/model``, the merged full Hugging Face model.
        shard_bytes: largest safetensors shard of the merged state.
        progress: show a progress bar over modules.
        **options: the method's options (e.g. ``keep=0.8``, ``density=0.5``).

    Returns:
        The ``MergedState``.
    """
    if not inputs:
        raise IloraError("merge: give at least one adapter or merged state")
    merger = get_method(method, **options)
    sources = [open_input(x) for x in inputs]
    modules = check_compatible(sources)
    merger.check(sources)
    if (merger.needs_base or save_model) and base is None:
        what = "--save-model" if save_model else f"--method {method}"
        raise IloraError(f"{what} needs --base MODEL_DIR (the base model the adapters were trained on)")
    if (export_lora_rank is not None or save_model) and out is None:
        raise IloraError("--export-lora and --save-model need --out DIR")
    if export_lora_rank is not None and export_lora_rank < 1:
        raise IloraError(f"--export-lora {export_lora_rank}: rank must be >= 1")
    described = [s.describe() for s in sources]
    check_distinct(described)
    if base is not None:
        base = resolve_model_path(base)
        check_base(sources, base)
    meta = {
        "format": RECORD_FORMAT,
        "version": 1,
        "method": method,
        "options": merger.options(),
        "base_model": next((s.base_model for s in sources if s.base_model), None),
        "inputs": described,
    }
    stream = merger.run(sources, modules, base)
    bar = tqdm(stream, total=len(modules), desc=f"merge ({method})", unit="module", disable=not progress)
    if out is None:
        deltas, records, extras = {}, {}, {}
        for module, delta, record, *stored in bar:
            _check_finite(module, delta, method)
            deltas[f"{module}.weight"], records[module] = delta, record
            extras.update(*stored)
        return MergedState(DeltaMap(deltas), records, meta, extras=extras)

    with atomic_dir(out, overwrite) as tmp:
        writer, records = MergedStateWriter(tmp, shard_bytes), {}
        extras = MergedStateWriter(tmp, shard_bytes, stem=merger.extras_stem)
        for module, delta, record, *stored in bar:
            _check_finite(module, delta, method)
            if isinstance(delta, LowRankDelta):
                writer.add_factored(module, delta)
            else:
                writer.add(f"{module}.weight", delta)
            records[module] = record
            for key, tensor in (stored[0] if stored else {}).items():
                extras.add(key, tensor)
        weight_map, files = writer.finish()
        record = {**meta, "modules": records, "weight_map": weight_map, "files": files}
        if extras.pending or extras.files:
            extras_map, extras_files = extras.finish()
            record.update(extras_map=extras_map, files={**files, **extras_files})
        if writer.factored:  # version 2: a version-1 reader would take the factors for deltas
            record.update(version=2, factored=writer.factored)
        write_record(tmp, record)
        state = load_merged_state(tmp)
        if export_lora_rank is not None:
            export.export_lora(state, tmp / f"lora_rank{export_lora_rank}", export_lora_rank)
        if save_model:
            export.save_merged_model(state, base, tmp / "model")
    return load_merged_state(Path(out))


def _check_finite(module: str, delta: torch.Tensor | LowRankDelta, method: str) -> None:
    # A NaN or Inf entry makes the sum non-finite, so one summing pass (no full-size
    # temporaries) clears the usual case; only a non-finite sum needs the element-wise check.
    # A factored ΔW is finite when its factors and scale are.
    parts = (delta.lora_B, delta.lora_A, torch.tensor(delta.scale)) if isinstance(delta, LowRankDelta) else (delta,)
    if any(not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()) for t in parts):
        raise IloraError(f"--method {method}: module {module!r} merged to NaN/Inf values")
