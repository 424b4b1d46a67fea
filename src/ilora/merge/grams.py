"""Input second moments ("Grams") of every LoRA module, for data-aware merging and interference.

Per LoRA layer, ``G = Xᵀ X / count``: the mean over counted positions of ``x xᵀ``, with ``x``
the layer's input (the input of its base linear). The positions are those of
``routing.hooks.LoraOutputRecorder``: the non-padding tokens in language-model layers and every
image patch in vision-tower and projector layers. ``‖ΔW X‖_F² / count = tr(ΔW G ΔWᵀ)``, so a
Gram measures any delta's output on the rows it came from without running the model again.

An adapter's Grams live beside it in ``grams.safetensors``:

- tensors ``"<module>.task"`` and ``"<module>.general"``: ``n x n`` float32 mean Grams on the
  adapter's task rows and on general rows, both measured in the adapter's own model (base +
  this adapter); ``.general`` tensors are absent when no general rows were given;
- metadata: ``format`` ("ilora-grams"), ``version``, ``counts`` (JSON ``{kind: {module:
  positions}}``), ``task_rows``, ``general_rows`` and ``adapter_sha256``, the SHA-256 of the
  adapter's ``adapter_model.safetensors`` the Grams were measured with (stale Grams are refused).

    ilora grams runs/pong/adapter --data data/pong/train --general data/general/train --rows 256
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ilora.errors import IloraError
from ilora.fileio import file_sha256
from ilora.merge.io import LoraAdapter

GRAMS_FILE = "grams.safetensors"
GRAMS_FORMAT = "ilora-grams"
GRAMS_VERSION = "1"
KINDS = ("task", "general")


def grams_path(adapter_dir: str | os.PathLike) -> Path:
    return Path(adapter_dir) / GRAMS_FILE


class AdapterGrams:
    """An adapter's ``grams.safetensors``, validated on opening; tensors are read on access.

    Attributes:
        path: the Grams file.
        widths: module -> input width ``n`` (every Gram is ``n x n``).
        counts: ``{kind: {module: positions}}``.
        rows: ``{kind: rows measured}``.
    """

    def __init__(self, adapter_dir: str | os.PathLike, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else grams_path(adapter_dir)
        if not self.path.is_file():
            raise IloraError(f"{self.path}: missing Grams file (compute it with `ilora grams {adapter_dir} --data ...`)")
        adapter = LoraAdapter(adapter_dir)
        try:
            with safe_open(self.path, "pt") as fh:
                metadata = fh.metadata() or {}
                shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise IloraError(f"{self.path}: corrupt Grams file ({err})") from err
        if metadata.get("format") != GRAMS_FORMAT:
            raise IloraError(f"{self.path}: format {metadata.get('format')!r} is not {GRAMS_FORMAT!r}")
        if metadata.get("version") != GRAMS_VERSION:
            raise IloraError(f"{self.path}: version {metadata.get('version')!r}; this ilora reads {GRAMS_VERSION!r}")
        if metadata.get("adapter_sha256") != file_sha256(adapter.weights_file):
            raise IloraError(f"{self.path}: stale, measured with other weights than {adapter.weights_file}; recompute it")
        try:
            self.counts: dict[str, dict[str, int]] = json.loads(metadata["counts"])
            self.rows = {kind: int(metadata[f"{kind}_rows"]) for kind in KINDS}
            if not all(isinstance(v, dict) for v in self.counts.values()):
                raise TypeError("counts is not {kind: {module: positions}}")
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise IloraError(f"{self.path}: metadata lacks valid counts and row numbers ({err})") from err
        self.widths = {m: n for m, (_, n) in adapter.modules.items()}
        kinds = [k for k in KINDS if self.rows[k] > 0]
        expected = {f"{m}.{k}": (n, n) for m, n in self.widths.items() for k in kinds}
        for key in sorted(set(shapes) | set(expected)):
            if key not in expected:
                raise IloraError(f"{self.path}: tensor {key!r} is no Gram of a LoRA module of {adapter_dir}")
            if key not in shapes:
                raise IloraError(f"{self.path}: lacks tensor {key!r}")
            if shapes[key] != expected[key]:
                raise IloraError(f"{self.path}: tensor {key!r} has shape {shapes[key]}, expected {expected[key]}")
            module, kind = key.rsplit(".", 1)
            if not isinstance(self.counts.get(kind, {}).get(module), int):
                raise IloraError(f"{self.path}: metadata gives no position count for {key!r}")

    def _read(self, module: str, kind: str) -> torch.Tensor:
        if module not in self.widths:
            raise IloraError(f"{self.path}: {module!r} is not a LoRA module of this adapter")
        if self.rows[kind] == 0:
            raise IloraError(f"{self.path}: holds no {kind} Grams (measured without {kind} rows)")
        key = f"{module}.{kind}"
        try:
            with safe_open(self.path, "pt") as fh:
                gram = fh.get_tensor(key).float()
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise IloraError(f"{self.path}: cannot read tensor {key!r} ({err})") from err
        if not bool(torch.isfinite(gram).all()):
            raise IloraError(f"{self.path}: tensor {key!r} contains NaN or Inf")
        return gram

    def task(self, module: str) -> torch.Tensor:
        """Mean input Gram of ``module`` on the adapter's task rows (float32 ``n x n``)."""
        return self._read(module, "task")

    def general(self, module: str) -> torch.Tensor:
        """Mean input Gram of ``module`` on the general rows (float32 ``n x n``)."""
        return self._read(module, "general")

    def count(self, module: str, kind: str = "task") -> int:
        """Positions behind ``module``'s ``kind`` Gram."""
        if self.rows.get(kind, 0) == 0 or module not in self.widths:
            raise IloraError(f"{self.path}: no {kind} Gram for {module!r}")
        return self.counts[kind][module]


def load_grams(adapter_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> AdapterGrams:
    """Open an adapter's Grams (default ``<adapter_dir>/grams.safetensors``), checked against the adapter.

    Raises:
        IloraError: naming the file when it is missing, corrupt, of another format or version,
            stale (the adapter's weights changed) or has a tensor that is not ``n x n`` for its
            module's input width.
    """
    return AdapterGrams(adapter_dir, path)
