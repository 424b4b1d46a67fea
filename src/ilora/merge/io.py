"""Reading merge inputs (PEFT LoRA adapters, merged states) and writing merged states.

Inputs are opened lazily: opening validates the config and the tensor names/shapes
without loading weights, and ``load(module)`` reads one module's tensors when the engine
streams to it. Every problem is an ``IloraError`` naming the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ilora.errors import IloraError
from ilora.fileio import file_sha256
from ilora.merge import ops
from ilora.models.adapter import (
    ADAPTER_CONFIG,
    PEFT_PREFIX,
    lora_module_shapes,
    lora_weights_file,
    read_json_object,
    read_lora_config,
    read_tensor,
    safetensors_shapes,
)

MERGE_RECORD = "merge_record.json"
RECORD_FORMAT = "ilora-merged-state"

@dataclass
class LowRankDelta:
    """One module's ``ΔW = scale · lora_B @ lora_A`` (float32 factors): a LoRA adapter's, or a
    merged state's stored factored (then ``merged`` is true: it is no trained adapter)."""

    lora_B: torch.Tensor
    lora_A: torch.Tensor
    scale: float
    merged: bool = False

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.lora_B.shape[0], self.lora_A.shape[1]

    def dense(self) -> torch.Tensor:
        return ops.lora_delta(self.lora_B, self.lora_A, self.scale)

    def candidate(self) -> ops.Candidate:
        """``(scale·B, A)``: the delta as the factor pair the ``ops`` functions take."""
        return self.lora_B * self.scale, self.lora_A


@dataclass
class DenseDelta:
    """One module of a merged state: the dense float32 ``ΔW``."""

    delta: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.delta

    def candidate(self) -> ops.Candidate:
        """The dense delta, as the ``ops`` functions take it."""
        return self.delta


ModuleDelta = LowRankDelta | DenseDelta


def same_base(a: str | None, b: str | None) -> bool:
    """Whether two recorded base-model names denote the same model (unknown matches anything)."""
    if not a or not b:
        return True
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


class LoraAdapter:
    """A PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Only plain ``nn.Linear`` LoRA is accepted; DoRA and every other variant are refused
    because their weight change is not ``s·B@A``.
    """

    kind = "lora"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = read_lora_config(self.path)
        self.weights_file = lora_weights_file(self.path)
        self.base_model: str | None = self.config.get("base_model_name_or_path")
        self._shapes = lora_module_shapes(self.weights_file)

    @property
    def modules(self) -> dict[str, tuple[int, int]]:
        """Module name -> ``(out, in)`` of its weight."""
        return {m: (o, i) for m, (o, i, _) in self._shapes.items()}

    def rank(self, module: str) -> int:
        return self._shapes[module][2]

    def scale(self, module: str) -> float:
        from peft.utils.other import get_pattern_key

        alpha_pattern = self.config.get("alpha_pattern") or {}
        alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), self.config.get("lora_alpha", 8))
        r = self.rank(module)
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def load(self, module: str) -> LowRankDelta:
        key = f"{PEFT_PREFIX}{module}"
        return LowRankDelta(
            lora_B=read_tensor(self.weights_file, f"{key}.lora_B.weight"),
            lora_A=read_tensor(self.weights_file, f"{key}.lora_A.weight"),
            scale=self.scale(module),
        )

    def describe(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "sha256": file_sha256(self.weights_file)}

    def grams(self):
        """This adapter's input Grams (``grams.safetensors``, see ``ilora.merge.grams``)."""
        from ilora.merge.grams import load_grams

        return load_grams(self.path)


def factor_key(module: str, part: str) -> str:
    """The merged-state tensor of one factor (``part``: ``lora_B`` or ``lora_A``) of a factored module."""
    return f"{module}.{part}.weight"


class DeltaMap(Mapping):
    """``{"<module>.weight": float32 ΔW}`` over stored values: dense tensors as they are,
    ``LowRankDelta`` factors multiplied out on access (``stored`` gives them as stored)."""

    def __init__(self, values: Mapping[str, torch.Tensor | LowRankDelta]):
        self.contents = values  # not `values`: that would hide Mapping.values()

    def stored(self, key: str) -> torch.Tensor | LowRankDelta:
        return self.contents[key]

    def shape(self, key: str) -> tuple[int, int]:
        return tuple(self.contents[key].shape)

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self.stored(key)
        return value.dense() if isinstance(value, LowRankDelta) else value

    def __contains__(self, key: object) -> bool:
        return key in self.contents

    def __iter__(self) -> Iterator[str]:
        return iter(self.contents)

    def __len__(self) -> int:
        return len(self.contents)


class SafetensorsDeltas(DeltaMap):
    """Lazy ``DeltaMap`` over a merged state's shards: reads a module's tensor(s) on access.

    ``shapes`` maps every ``<module>.weight`` to its ΔW shape; ``factored`` maps the modules
    stored as factors (``factor_key``, the scale folded into ``lora_B``) to their rank.
    """

    def __init__(
        self,
        root: Path,
        weight_map: dict[str, str],
        shapes: dict[str, tuple[int, ...]],
        factored: Mapping[str, int] | None = None,
    ):
        self.root, self.weight_map, self.shapes = root, weight_map, shapes
        self.factored = factored or {}
        self.contents = shapes  # iteration and membership

    def stored(self, key: str) -> torch.Tensor | LowRankDelta:
        if key not in self.shapes:
            raise KeyError(key)
        module = key.removesuffix(".weight")
        if module not in self.factored:
            return read_tensor(self.root / self.weight_map[key], key)
        lora_B, lora_A = (
            read_tensor(self.root / self.weight_map[factor_key(module, part)], factor_key(module, part))
            for part in ("lora_B", "lora_A")
        )
        return LowRankDelta(lora_B, lora_A, 1.0)

    def shape(self, key: str) -> tuple[int, int]:
        return self.shapes[key]


@dataclass
class MergedState:
    """A merged weight delta: ``deltas["<module>.weight"]`` is the float32 ``ΔW`` to add to the base.

    A module may be stored factored (``deltas`` a ``DeltaMap`` holding a ``LowRankDelta``):
    ``deltas[...]`` multiplies it out, ``load(module)`` gives the factors. ``records`` holds,
    per module, what the method kept (ranks, thresholds); ``meta`` the method, its options,
    the inputs and the base model. Loaded from disk, ``deltas`` is lazy.
    """

    deltas: Mapping[str, torch.Tensor]
    records: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    # What the method stores beside the deltas for later merges (RegMean's sums); lazy on disk.
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)

    kind = "merged"

    @property
    def base_model(self) -> str | None:
        return self.meta.get("base_model")

    @property
    def modules(self) -> dict[str, tuple[int, int]]:
        if isinstance(self.deltas, DeltaMap):
            return {k.removesuffix(".weight"): self.deltas.shape(k) for k in self.deltas}
        return {k.removesuffix(".weight"): tuple(v.shape) for k, v in self.deltas.items()}

    def load(self, module: str) -> ModuleDelta:
        """The module's ΔW as stored: factors (``merged=True``) or the dense float32 matrix."""
        key = f"{module}.weight"
        stored = self.deltas.stored(key) if isinstance(self.deltas, DeltaMap) else self.deltas[key]
        if isinstance(stored, LowRankDelta):
            return replace(stored, merged=True)
        return DenseDelta(stored.float())

    def describe(self) -> dict:
        if self.path is None:
            return {"path": None, "kind": self.kind, "sha256": None, "method": self.meta.get("method")}
        return {"path": str(self.path), "kind": self.kind, "sha256": file_sha256(self.path / MERGE_RECORD)}


def load_merged_state(path: str | os.PathLike) -> MergedState:
    """Open a merged-state folder written by ``ilora merge`` (lazy: no tensor is read yet)."""
    root = Path(path)
    record = read_json_object(root / MERGE_RECORD)
    if record.get("format") != RECORD_FORMAT:
        raise IloraError(f"{root / MERGE_RECORD}: format {record.get('format')!r} is not {RECORD_FORMAT!r}")
    weight_map = record.get("weight_map") or {}
    if not weight_map:
        raise IloraError(f"{root / MERGE_RECORD}: lists no tensors")
    shapes: dict[str, tuple[int, ...]] = {}
    for name in sorted(set(weight_map.values())):
        in_file = safetensors_shapes(root / name)
        for key, file in weight_map.items():
            if file == name:
                if key not in in_file or len(in_file[key]) != 2:
                    raise IloraError(f"{root / name}: 2-D tensor {key!r} listed in {MERGE_RECORD} is missing")
                shapes[key] = in_file[key]
    factored = record.get("factored") or {}
    for module, rank in factored.items():
        lora_B, lora_A = (shapes.pop(factor_key(module, part), None) for part in ("lora_B", "lora_A"))
        if lora_B is None or lora_A is None or lora_B[1] != rank or lora_A[0] != rank:
            raise IloraError(
                f"{root / MERGE_RECORD}: factored module {module!r} needs tensors {factor_key(module, 'lora_B')} "
                f"(out x {rank}) and {factor_key(module, 'lora_A')} ({rank} x in); found {lora_B} and {lora_A}"
            )
        shapes[f"{module}.weight"] = (lora_B[0], lora_A[1])
    meta = {k: v for k, v in record.items() if k not in ("weight_map", "modules", "files", "factored", "extras_map")}
    deltas = SafetensorsDeltas(root, weight_map, shapes, factored)
    return MergedState(deltas, record.get("modules", {}), meta, root, _stored_extras(root, record.get("extras_map") or {}))


def _stored_extras(root: Path, extras_map: dict[str, str]) -> SafetensorsDeltas:
    """Lazy ``{key: tensor}`` over the files ``extras_map`` names (checked to hold their keys)."""
    shapes = {}
    for name in sorted(set(extras_map.values())):
        in_file = safetensors_shapes(root / name)
        for key in (k for k, file in extras_map.items() if file == name):
            if key not in in_file:
                raise IloraError(f"{root / name}: tensor {key!r} listed in {MERGE_RECORD} is missing")
            shapes[key] = in_file[key]
    return SafetensorsDeltas(root, extras_map, shapes)


def open_input(item: str | os.PathLike | LoraAdapter | MergedState) -> LoraAdapter | MergedState:
    """A merge input from a folder (PEFT adapter or merged state) or an already-open object."""
    if isinstance(item, (LoraAdapter, MergedState)):
        return item
    path = Path(item)
    if not path.exists():
        raise IloraError(f"{path}: no such adapter or merged-state folder")
    if (path / MERGE_RECORD).is_file():
        return load_merged_state(path)
    if (path / ADAPTER_CONFIG).is_file():
        return LoraAdapter(path)
    raise IloraError(f"{path}: neither a PEFT adapter ({ADAPTER_CONFIG}) nor a merged state ({MERGE_RECORD})")


class MergedStateWriter:
    """Streams tensors (``<module>.weight``) into safetensors shards ``{stem}-0000k.safetensors``
    of at most ``shard_bytes`` (one shard: ``{stem}.safetensors``).

    A low-rank ΔW goes in as its two factors (``add_factored``); ``factored`` lists those
    modules with their rank, for the record.
    """

    def __init__(self, root: Path, shard_bytes: int = 1 << 30, stem: str = "delta"):
        self.root, self.shard_bytes, self.stem = root, shard_bytes, stem
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.files: list[str] = []
        self.factored: dict[str, int] = {}

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        if self.pending_bytes >= self.shard_bytes:  # a full shard need not wait in memory
            self._flush()

    def add_factored(self, module: str, delta: LowRankDelta) -> None:
        """Store ``delta`` as ``factor_key(module, "lora_B")`` (scale folded in) and ``"lora_A"``."""
        self.add(factor_key(module, "lora_B"), delta.lora_B * delta.scale)
        self.add(factor_key(module, "lora_A"), delta.lora_A)
        self.factored[module] = delta.rank

    def _flush(self) -> None:
        name = f"{self.stem}-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.root / name))
        self.weight_map.update(dict.fromkeys(self.pending, name))
        self.files.append(name)
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> tuple[dict[str, str], dict[str, str]]:
        """Write the last shard; returns ``(weight_map, {file: sha256})``."""
        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:  # one file is the common case: give it the plain name
            plain = f"{self.stem}.safetensors"
            os.replace(self.root / self.files[0], self.root / plain)
            self.weight_map = dict.fromkeys(self.weight_map, plain)
            self.files = [plain]
        return self.weight_map, {f: file_sha256(self.root / f) for f in self.files}


def write_record(root: Path, record: dict) -> None:
    (root / MERGE_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
