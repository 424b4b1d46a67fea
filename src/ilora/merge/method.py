"""The base of every merge method, and ``@register("name", **preset)``, which names a method.

A method is a dataclass whose fields are its user options (with help text); configured
variants (``ties``, ``dare_linear``...) are one class registered several times with
different presets, which the user cannot override. A method's file imports this module;
:mod:`ilora.merge.registry` imports the method files and looks methods up by name.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from ilora.errors import IloraError
from ilora.merge.io import LoraAdapter, MergedState, ModuleDelta

Source = LoraAdapter | MergedState
# Method name -> (class, preset options); filled by @register as the method files are imported.
REGISTERED: dict[str, tuple[type[MergeMethod], dict[str, Any]]] = {}


def register(name: str, **preset: Any):
    """Class decorator: make ``cls`` available as ``--method name`` with ``preset`` options fixed."""

    def decorate(cls: type[MergeMethod]) -> type[MergeMethod]:
        if name in REGISTERED:
            raise ValueError(f"merge method {name!r} registered twice")
        REGISTERED[name] = (cls, preset)
        return cls

    return decorate


def module_generator(seed: int, module: str) -> torch.Generator:
    """A torch RNG seeded by ``seed`` and the module name: the same draws whatever the order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(module.encode()))


@dataclasses.dataclass
class MergeMethod:
    """Base class: merges, module by module, the inputs' weight deltas into one ``ΔW``.

    Subclasses implement ``merge_module``; methods that cannot work one module at a time from
    the inputs alone (PEFT's, which need the base model) override ``run``.
    """

    name: ClassVar[str] = ""
    accepts_merged: ClassVar[bool] = True  # can a merged state be one of the inputs?
    needs_base: ClassVar[bool] = False  # does it need the base model (``--base``)?
    needs_grams: ClassVar[bool] = False  # does it read each adapter's input Grams (``ilora grams``)?
    extras_stem: ClassVar[str] = "extras"  # file stem of the tensors ``run`` yields beside ΔW

    def options(self) -> dict[str, Any]:
        """The method's options, as recorded in the merged state's JSON."""
        return dataclasses.asdict(self)

    def check(self, inputs: list[Source]) -> None:
        """Refuse input combinations the method cannot merge (before any output is written)."""
        if not self.accepts_merged:
            for src in inputs:
                if isinstance(src, MergedState):
                    raise IloraError(f"{src.path or 'merged state'}: --method {self.name} takes LoRA adapters only")

    def merge_module(self, module: str, deltas: list[ModuleDelta | None]) -> tuple[torch.Tensor, dict]:
        """Merge one module.

        Args:
            module: the module name (``<module>.weight`` is the base weight).
            deltas: per input, in input order, its delta for this module or ``None`` if the
                input does not touch the module.

        Returns:
            ``(ΔW, record)``: the float32 merged delta, dense or a ``LowRankDelta`` (stored
            factored), and a JSON-able record of what was kept.
        """
        raise NotImplementedError

    def run(
        self, inputs: list[Source], modules: dict[str, tuple[int, int]], base: str | None = None
    ) -> Iterator[tuple[str, torch.Tensor, dict]]:
        """Yield ``(module, ΔW, record)`` for every module, streaming one module at a time.

        A method may yield ``(module, ΔW, record, extras)`` instead: ``extras``
        (``{key: tensor}``) is stored beside the deltas (``MergedState.extras``; on disk in
        ``{extras_stem}*.safetensors``) for later merges to read.
        """
        present = [src.modules for src in inputs]
        for module in modules:
            deltas = [src.load(module) if module in mods else None for src, mods in zip(inputs, present)]
            yield (module, *self.merge_module(module, deltas))


def input_weights(weights: list[float] | None, n: int, method: str) -> list[float]:
    """Per-input weights: the user's (one per input) or 1.0 each."""
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise IloraError(f"--method {method}: {len(weights)} weights given for {n} inputs")
    return [float(w) for w in weights]
