"""Core Space merging (Panariello, Marczak et al., NeurIPS 2025): merge LoRA deltas in the
small space their factors span, then map the result back, still factored.

Registered per rule (``core_ta``, ``core_ties``, ``core_tsv``, ``core_iso``), as ``ties``
and ``dare_ties`` are: each name is one fixed computation in reports and configs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ilora.config import field
from ilora.errors import IloraError
from ilora.merge import ops
from ilora.merge.baselines import apply_rule, check_rule_options
from ilora.merge.io import LowRankDelta, ModuleDelta
from ilora.merge.method import MergeMethod, input_weights, register

CORE_RULES = ("ta", "ties", "tsv", "iso")


def core_bases(lora_Bs: list[torch.Tensor], lora_As: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference bases: left singular vectors of ``[B_1 … B_T]``, right ones of ``[A_1; …; A_T]``.

    Every ``B_t A_t`` lies in ``span(U_ref) x span(V_ref)``, so ``U_ref U_refᵀ ΔW_t V_ref V_refᵀ = ΔW_t``.

    Args:
        lora_Bs: per task ``out x r_t``.
        lora_As: per task ``r_t x in``.

    Returns:
        ``(U_ref, V_ref)``: ``out x k_u`` and ``in x k_v`` with orthonormal columns (float64
        SVDs, returned in float32), ``k_u = min(out, Σr)``, ``k_v = min(in, Σr)``.
    """
    u_ref = torch.linalg.svd(torch.cat(lora_Bs, dim=1).double(), full_matrices=False).U
    v_ref = torch.linalg.svd(torch.cat(lora_As, dim=0).double(), full_matrices=False).Vh.T
    return u_ref.float(), v_ref.float()


def core_matrix(u_ref: torch.Tensor, v_ref: torch.Tensor, lora_B: torch.Tensor, lora_A: torch.Tensor, scale: float) -> torch.Tensor:
    """A task's core ``M_t = U_refᵀ (s B A) V_ref``, from the factors.

    Args:
        u_ref: ``out x k_u``.
        v_ref: ``in x k_v``.
        lora_B: ``out x r``.
        lora_A: ``r x in``.
        scale: the LoRA scaling ``s``.

    Returns:
        ``k_u x k_v``.
    """
    return ((u_ref.T @ lora_B) @ (lora_A @ v_ref)).mul_(scale)


def isotropic(matrix: torch.Tensor) -> torch.Tensor:
    """Iso-C (arXiv 2502.04959): ``matrix`` with every singular value set to their mean.

    Args:
        matrix: ``m x n``.

    Returns:
        ``U · mean(S) · Vh``, ``m x n``.
    """
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u * s.mean()) @ vh


@register("core_ta", rule="ta")
@register("core_ties", rule="ties")
@register("core_tsv", rule="tsv")
@register("core_iso", rule="iso")
@dataclass
class CoreSpaceMerge(MergeMethod):
    """Per module: reference bases from the SVDs of the stacked ``B``'s and ``A``'s
    (``core_bases``), each task's ``Σr x Σr`` core ``M_t = U_refᵀ ΔW_t V_ref``, the cores merged
    by the rule, ``ΔW = α · U_ref M V_refᵀ`` (returned factored, rank ``min(in, Σr)``).

    ``ta`` (``Σ w_t M_t``) is lossless: it equals full-space task arithmetic. ``ties`` is PEFT's
    TIES on the cores; ``tsv`` is TSV-M on the cores (``⌊Σr / T⌋`` triplets each); ``iso`` is
    Iso-C on the summed core (its singular values, zero ones included, set to their mean), so
    the isotropy stays inside the tasks' span. Ranks may differ between adapters.
    """

    accepts_merged = False

    rule: str = field("ta", help="how the cores merge: ta, ties, tsv or iso (fixed by the method name)")
    weights: list[float] | None = field(None, help="one weight per adapter (default 1.0 each)")
    density: float = field(0.5, help="fraction of core entries TIES keeps per task")
    majority_sign_method: str = field("total", help="TIES sign election: 'total' or 'frequency'")
    alpha: float = field(1.0, help="global scale of the merged delta")

    def __post_init__(self) -> None:
        if self.rule not in CORE_RULES:
            raise IloraError(f"rule {self.rule!r}: expected one of {CORE_RULES}")
        check_rule_options(self.density, self.majority_sign_method)

    def merge_module(self, module: str, deltas: list[ModuleDelta | None]) -> tuple[LowRankDelta, dict]:
        weights = input_weights(self.weights, len(deltas), self.name)
        present = [(d, w) for d, w in zip(deltas, weights) if d is not None]
        u_ref, v_ref = core_bases([d.lora_B for d, _ in present], [d.lora_A for d, _ in present])
        cores = [core_matrix(u_ref, v_ref, d.lora_B, d.lora_A, d.scale) for d, _ in present]
        w = torch.tensor([w for _, w in present])
        if self.rule in ("ta", "ties"):
            rule = "task_arithmetic" if self.rule == "ta" else "ties"
            merged = apply_rule(rule, cores, w, self.density, self.majority_sign_method)
        elif self.rule == "tsv":
            triplets = [torch.linalg.svd(core * wt, full_matrices=False) for core, wt in zip(cores, w.tolist())]
            left, right = ops.tsv_merge(triplets, tuple(cores[0].shape))
            merged = left @ right
        else:
            merged = isotropic(sum(core * wt for core, wt in zip(cores, w.tolist())))
        merged = merged * self.alpha
        record = {"ranks": [d.rank for d, _ in present], "core": list(cores[0].shape)}
        return LowRankDelta(u_ref @ merged, v_ref.T.contiguous(), 1.0), record
