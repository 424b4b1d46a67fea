"""RegMean restricted to the span of the adapters' ``A`` rows: the merged delta stays low-rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ilora.errors import IloraError
from ilora.merge import ops
from ilora.merge.io import LowRankDelta, MergedState
from ilora.merge.method import Source, register
from ilora.merge.regmean import (
    DELTA_GRAM,
    GENERAL_GRAM,
    ROW_BASIS,
    TASK_GRAM,
    RegMeanMerge,
)


@register("regmean_lowrank")
@dataclass
class RegMeanLowRankMerge(RegMeanMerge):
    """RegMean's least-squares merge over deltas of the form ``ΔW = M Q``.

    ``Q`` (``R x n``, orthonormal rows) spans the stacked ``A`` factors of the inputs
    (``R <= Σ_i r_i``; a merged state contributes its stored basis), and with RegMean's
    sums ``S = Σ_i w_i ΔW_i G̃_i`` and normal matrix ``G`` (see ``regmean``)::

        M = (S Qᵀ)(Q G Qᵀ)⁻¹

    an ``R x R`` solve in float64, so the result has rank at most ``R``; ``G`` is never formed
    (``Q G Qᵀ`` comes from the projected sums), so no ``n x n`` matrix is built beyond
    RegMean's sums and the Gram being added. Orthonormalising first keeps the solve as well
    conditioned as ``G`` restricted to the span. Options and sums file are RegMean's (the
    sums are still ``n x n``: folding in a later adapter widens the span); the state also stores
    ``<module>.row_basis`` (``Q``), and only a ``regmean_lowrank`` state can be folded in.
    The merged delta is stored factored (``lora_B = M``, ``lora_A = Q``, rank ``R``), so a
    PEFT export at rank ``R`` is exact.
    """

    stored: ClassVar[tuple[str, ...]] = (*RegMeanMerge.stored, ROW_BASIS)

    def check(self, inputs: list[Source]) -> None:
        super().check(inputs)
        for src in inputs:
            if not isinstance(src, MergedState):
                continue
            for module, (_, inp) in src.modules.items():
                shape = tuple(src.extras[f"{module}.{ROW_BASIS}"].shape)
                if len(shape) != 2 or shape[1] != inp:
                    where = src.path or "in-memory merged state"
                    raise IloraError(f"{where}: {module}.{ROW_BASIS} has shape {shape}, expected (rank, {inp})")

    def solve(
        self, sums: dict[str, torch.Tensor], row_spaces: list[torch.Tensor]
    ) -> tuple[LowRankDelta, dict, dict[str, torch.Tensor]]:
        basis = ops.row_space_basis(torch.cat(row_spaces))
        core, solver, ridge = ops.subspace_right_solve(
            sums[DELTA_GRAM], sums[TASK_GRAM], sums[GENERAL_GRAM], self.general_weight, self.ridge, basis
        )
        record = {"solver": solver, "rank": basis.shape[0], "ridge": ridge}
        return LowRankDelta(core, basis, 1.0), record, {ROW_BASIS: basis}
