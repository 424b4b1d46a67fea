"""The merge-method registry: ``@register("name", **preset)`` on a dataclass of options.

A method is a dataclass whose fields are its user options (with help text); configured
variants (``ties``, ``dare_linear``...) are one class registered several times with
different presets, which the user cannot override.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from ilora.config import from_dict
from ilora.errors import IloraError
from ilora.merge.io import LoraAdapter, MergedState, ModuleDelta

Source = LoraAdapter | MergedState
_REGISTRY: dict[str, tuple[type[MergeMethod], dict[str, Any]]] = {}


def register(name: str, **preset: Any):
    """Class decorator: make ``cls`` available as ``--method name`` with ``preset`` options fixed."""

    def decorate(cls: type[MergeMethod]) -> type[MergeMethod]:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        _REGISTRY[name] = (cls, preset)
        return cls

    return decorate


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    _load_builtin_methods()
    return sorted(_REGISTRY)


def get_method(name: str, **options: Any) -> MergeMethod:
    """Instantiate a registered method with user options, each converted to its field's type.

    Raises:
        IloraError: unknown method or option, or a value that is not of the option's type
            (``svd_tol="1e-7"`` is a float, ``seed="x"`` is refused).
    """
    _load_builtin_methods()
    if name not in _REGISTRY:
        raise IloraError(f"--method {name!r}: unknown merge method; known: {', '.join(sorted(_REGISTRY))}")
    cls, preset = _REGISTRY[name]
    allowed = {f.name for f in dataclasses.fields(cls)} - set(preset)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise IloraError(f"--method {name}: unknown option(s) {unknown}; it takes {sorted(allowed) or 'none'}")
    method = from_dict(cls, {**preset, **options}, f"--method {name}")
    method.name = name
    return method


def method_class(name: str) -> type[MergeMethod]:
    """The class behind a registered method name (its ClassVars say what the method needs)."""
    _load_builtin_methods()
    if name not in _REGISTRY:
        raise IloraError(f"--method {name!r}: unknown merge method; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name][0]


def _load_builtin_methods() -> None:
    # Importing the method modules runs their @register decorators.
    from ilora.merge import (  # noqa: F401
        baselines,
        core_space,
        factored_sum,
        ilora,
        knots,
        magmax,
        opcm,
        pcb,
        peft_types,
        regmean,
        regmean_lowrank,
        tsv,
    )


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
