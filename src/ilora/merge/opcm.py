"""OPCM (arXiv 2501.09522): continual merging by orthogonal projection, one task at a time, on factors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ilora.config import field
from ilora.errors import IloraError
from ilora.merge import ops
from ilora.merge.io import LowRankDelta, MergedState, ModuleDelta
from ilora.merge.method import MergeMethod, Source, register


def opcm_step(
    merged: tuple[torch.Tensor, torch.Tensor],
    previous_lambda: float,
    new: tuple[torch.Tensor, torch.Tensor],
    alpha: float,
    rtol: float,
) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """Fold a new task vector ``τ_new`` into the merged ``τ_m`` (both as factor pairs).

    With ``τ_m = U Σ Vᵀ``: ``P = Uᵀ τ_new V``; P's diagonal and top-left ``k x k`` block are
    zeroed (``k`` the first index where ``cumsum(σ)/Σσ > alpha``), ``τ̃ = U P Vᵀ``, and
    ``τ_t = (λ_{t-1} τ_m + τ̃) / λ_t`` with ``λ_t = ‖λ_{t-1} τ_m + τ̃‖ / ‖τ_m‖`` (Frobenius).
    The zeroed diagonal covers τ_m's numerical rank ``ρ`` (``σ > rtol · σ_1``): past it U and
    V are an arbitrary completion and P's diagonal means nothing. Then
    ``τ̃ = τ_new - U_ρ R V_ρᵀ`` (``R`` the zeroed entries) and
    ``λ τ_m + τ̃ = [U_ρ (λΣ - R), left_new] [V_ρᵀ; right_new]``: rank ``ρ + r_new``, exact.

    Args:
        merged: ``τ_m`` as ``(out x q, q x in)``.
        previous_lambda: ``λ_{t-1}``.
        new: ``τ_new`` as ``(out x r, r x in)``.
        alpha: the cumulative-spectrum fraction that sets ``k`` (the paper's 0.5).
        rtol: relative cut-off of τ_m's numerical rank.

    Returns:
        ``((left, right), λ_t)`` with ``τ_t = left @ right``; a zero ``τ_m`` gives ``(new, 1.0)``.
    """
    u, s, vh = ops.factorized_svd(merged[0], merged[1], 1.0)
    rank = int((s > rtol * s[0]).sum()) if len(s) and s[0] > 0 else 0
    if rank == 0:
        return new, 1.0
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    k = int((s.cumsum(0) / s.sum() > alpha).int().argmax())  # the first index past alpha (argmax: first max)
    projected = (u.T @ new[0]) @ (new[1] @ vh.T)  # P on τ_m's directions, ρ x ρ
    removed = torch.diag(projected.diagonal())
    removed[:k, :k] = projected[:k, :k]
    left = torch.cat([u @ (previous_lambda * torch.diag(s) - removed), new[0]], dim=1)
    right = torch.cat([vh, new[1]], dim=0)
    # ‖left @ right‖² = Σ (leftᵀ left) ∘ (right rightᵀ), from the factors.
    norm = math.sqrt(max(0.0, float(((left.double().T @ left.double()) * (right.double() @ right.double().T)).sum())))
    lam = norm / float(s.double().norm())
    return (left / lam, right), lam


@register("opcm")
@dataclass
class OPCMMerge(MergeMethod):
    """OPCM's continual rule (``opcm_step``) over the inputs in order: the first task vector
    starts the merge (λ = 1), each next one is folded in. Norms and λ are per module (the
    merge streams module by module). The result is factored, rank ``Σ r_t``, and each
    module's record carries its λ, so an OPCM merged state given first continues the merge;
    merged states of other methods (no λ) are refused.
    """

    alpha: float = field(0.5, help="cumulative-spectrum fraction that sets the zeroed top-left block of P")
    rtol: float = field(1e-5, help="singular values of the merged delta <= rtol · σ₁ count as zero")

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise IloraError(f"--alpha {self.alpha}: must be in (0, 1)")

    def check(self, inputs: list[Source]) -> None:
        self.previous: dict[str, dict] = {}
        for i, src in enumerate(inputs):
            if not isinstance(src, MergedState):
                continue
            where = src.path or "in-memory merged state"
            if i != 0:
                raise IloraError(f"{where}: opcm continues one merged state, given first; it is input {i + 1}")
            if src.meta.get("method") != "opcm":
                raise IloraError(
                    f"{where}: merged by {src.meta.get('method')!r}; opcm continues only its own merged states (they carry λ)"
                )
            self.previous = src.records

    def merge_module(self, module: str, deltas: list[ModuleDelta | None]) -> tuple[LowRankDelta, dict]:
        present = [d for d in deltas if d is not None]
        first = present[0]
        lam, tasks = 1.0, 1
        if first.merged:
            record = self.previous.get(module, {})
            if "lambda" not in record:
                raise IloraError(f"--method opcm: the merged state's record of {module!r} has no λ")
            lam, tasks = float(record["lambda"]), int(record["tasks"])
        merged = first.candidate()
        for delta in present[1:]:
            merged, lam = opcm_step(merged, lam, delta.candidate(), self.alpha, self.rtol)
            tasks += 1
        return LowRankDelta(*merged, 1.0), {"lambda": lam, "tasks": tasks}
