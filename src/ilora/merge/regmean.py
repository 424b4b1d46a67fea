"""RegMean on LoRA deltas: per linear module, the delta that best reproduces every task's outputs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from ilora.config import field
from ilora.errors import IloraError
from ilora.merge import ops
from ilora.merge.grams import AdapterGrams
from ilora.merge.io import LoraAdapter
from ilora.merge.method import MergeMethod, Source, input_weights, register

# What a RegMean merged state stores per module ("<module>.<name>") so that later adapters
# fold in without the old adapters' data: three running sums, and regmean_lowrank's basis.
DELTA_GRAM, TASK_GRAM, GENERAL_GRAM, ROW_BASIS = "delta_gram", "task_gram", "general_gram", "row_basis"


@register("regmean")
@dataclass
class RegMeanMerge(MergeMethod):
    """RegMean (Jin et al., ICLR 2023) on the LoRA deltas, with the general rows as a zero-delta task.

    Per linear module, with ``G_i`` the mean input Gram of task ``i``'s rows (measured in
    adapter ``i``'s model), ``H_i`` that of its general rows, ``w_i`` the input weights and
    ``G̃`` a Gram whose off-diagonal entries are scaled by ``alpha``::

        ΔW* = (Σ_i w_i ΔW_i G̃_i) (Σ_i w_i G̃_i + general_weight·Σ_i w_i H̃_i + ridge·d̄·I)⁻¹

    (``d̄``: the mean diagonal of the matrix before the ridge). It minimises
    ``Σ_i w_i ‖X_i (ΔW − ΔW_i)ᵀ‖² + general_weight·Σ_i w_i ‖Y_i ΔWᵀ‖²`` over the task rows
    ``X_i`` and general rows ``Y_i`` (at ``alpha = 1``, ``ridge = 0``).

    The merged state stores the three sums per module (``<module>.delta_gram``,
    ``<module>.task_gram``, ``<module>.general_gram``, float32) in ``regmean_sums*.safetensors``;
    a later merge adds new adapters' terms to them (scaled by the state's weight), which equals
    merging everything at once. ``ridge`` and ``general_weight`` act at the solve and may
    change between folds; ``alpha`` is baked into the sums and may not.

    Memory: modules stream one at a time. Per module, each Gram is read, added in place to
    the running sums and dropped before the next one is read; the solve builds one ``n x n``
    system (float64 when ``8·n²`` is at most ``float64_solve_bytes``, else float32) that the
    Cholesky factorisation overwrites. So the peak is the two ``n x n`` float32 sums, plus one
    ``n x n`` matrix (the Gram being added, or the system), plus a few ``out x n`` matrices
    (the delta sum, the solution). A singular system (Cholesky fails) falls back to a
    rank-revealing least-squares solve, which needs a few ``n x n`` matrices more.
    """

    alpha: float = field(0.6, help="off-diagonal factor of each Gram, in [0, 1] (FusionBench's CLIP and GPT-2 default)")
    ridge: float = field(1e-4, help="ridge added to the diagonal, relative to its mean")
    general_weight: float = field(1.0, help="weight of the general rows (a task whose delta is 0); 0 turns them off")
    weights: list[float] | None = field(None, help="one weight per input (default 1.0 each)")
    float64_solve_bytes: int = field(
        1 << 30,
        help="largest n x n system solved in float64 (8·n² bytes), wider in float32; regmean_lowrank ignores it",
    )

    needs_grams: ClassVar[bool] = True
    extras_stem: ClassVar[str] = "regmean_sums"
    stored: ClassVar[tuple[str, ...]] = (DELTA_GRAM, TASK_GRAM, GENERAL_GRAM)

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise IloraError(f"--option alpha={self.alpha}: must be in [0, 1]")
        if self.ridge < 0 or self.general_weight < 0:
            raise IloraError(f"--option ridge={self.ridge}, general_weight={self.general_weight}: must be >= 0")

    def check(self, inputs: list[Source]) -> None:
        for src in inputs:
            if isinstance(src, LoraAdapter):
                src.grams()  # opening checks the file's presence, freshness and every Gram's shape
                continue
            where = src.path or "in-memory merged state"
            missing = [f"{m}.{name}" for m in src.modules for name in self.stored if f"{m}.{name}" not in src.extras]
            if missing:
                raise IloraError(
                    f"{where}: merged state from --method {src.meta.get('method')} lacks the sums --method {self.name} "
                    f"folds into (e.g. {missing[0]!r}); merge its adapters again with --method {self.name}"
                )
            alpha = (src.meta.get("options") or {}).get("alpha")
            if alpha != self.alpha:
                raise IloraError(
                    f"{where}: its sums were taken with alpha={alpha}, not {self.alpha}; pass --option alpha={alpha}"
                )
            for module, (out, inp) in src.modules.items():
                for name, shape in ((DELTA_GRAM, (out, inp)), (TASK_GRAM, (inp, inp)), (GENERAL_GRAM, (inp, inp))):
                    found = tuple(src.extras[f"{module}.{name}"].shape)
                    if found != shape:
                        raise IloraError(f"{where}: {module}.{name} has shape {found}, expected {shape}")

    def run(
        self, inputs: list[Source], modules: dict[str, tuple[int, int]], base: str | None = None
    ) -> Iterator[tuple[str, torch.Tensor, dict, dict[str, torch.Tensor]]]:
        """Yield ``(module, ΔW, record, sums)``; ``sums`` (``"<module>.<name>"``) go to the state's sums file."""
        weights = input_weights(self.weights, len(inputs), self.name)
        grams = [src.grams() if isinstance(src, LoraAdapter) else None for src in inputs]
        for module, (out, inp) in modules.items():
            sums, row_spaces = self._accumulate(module, out, inp, inputs, grams, weights)
            delta, record, solved = self.solve(sums, row_spaces)
            stored = {f"{module}.{name}": tensor for name, tensor in {**sums, **solved}.items()}
            yield module, delta, {"n_inputs": len(row_spaces), **record}, stored

    def _accumulate(
        self, module: str, out: int, inp: int, inputs: list[Source], grams: list[AdapterGrams | None], weights: list[float]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor | None]]:
        """The weighted sums over the inputs touching ``module``, and per such input its row space
        (a LoRA's ``A``; a merged state's stored basis, ``None`` if it has none)."""
        sums = {DELTA_GRAM: torch.zeros(out, inp), TASK_GRAM: torch.zeros(inp, inp), GENERAL_GRAM: torch.zeros(inp, inp)}
        row_spaces = []
        for src, src_grams, weight in zip(inputs, grams, weights):
            if module not in src.modules:
                continue
            if isinstance(src, LoraAdapter):
                delta = src.load(module)
                row_spaces.append(delta.lora_A)
                task = src_grams.task(module)
                low_rank = delta.candidate()
                ops.add_delta_gram_(sums[DELTA_GRAM], low_rank, task, weight, self.alpha)
                ops.add_scaled_gram_(sums[TASK_GRAM], task, weight, self.alpha)
                del task  # before the general Gram is read: one Gram in memory besides the sums
                if src_grams.rows["general"]:  # Grams measured without general rows add no general term
                    ops.add_scaled_gram_(sums[GENERAL_GRAM], src_grams.general(module), weight, self.alpha)
            else:
                for name, total in sums.items():
                    total.add_(src.extras[f"{module}.{name}"], alpha=weight)
                row_spaces.append(src.extras.get(f"{module}.{ROW_BASIS}"))
        return sums, row_spaces

    def solve(
        self, sums: dict[str, torch.Tensor], row_spaces: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict, dict[str, torch.Tensor]]:
        """The merged delta from the sums: Cholesky, or least squares where the system is singular.

        Returns:
            ``(ΔW, record, tensors to store beside the sums)``.
        """
        inp = sums[TASK_GRAM].shape[0]
        dtype = torch.float64 if 8 * inp * inp <= self.float64_solve_bytes else torch.float32

        def system() -> tuple[torch.Tensor, float]:
            return ops.regmean_system(sums[TASK_GRAM], sums[GENERAL_GRAM], self.general_weight, self.ridge, dtype)

        matrix, ridge = system()
        delta, solver = ops.cholesky_right_solve_(sums[DELTA_GRAM], matrix), "cholesky"
        if delta is None:
            del matrix  # the failed factorisation's buffer goes before the fallback builds a new one
            delta, solver = (ops.lstsq_right_solve(sums[DELTA_GRAM], system()[0]), "lstsq")
        return (delta, {"solver": solver, "dtype": str(dtype).removeprefix("torch."), "ridge": ridge}, {})
