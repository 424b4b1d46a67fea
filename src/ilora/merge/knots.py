"""KnOTS (Stoica et al., ICLR 2025): align the LoRA deltas in one shared basis, then TIES/DARE-TIES there."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ilora.config import field
from ilora.errors import IloraError
from ilora.merge import ops
from ilora.merge.baselines import apply_rule, check_rule_options
from ilora.merge.io import LowRankDelta, ModuleDelta
from ilora.merge.method import MergeMethod, input_weights, module_generator, register


def knots_alignment(
    lora_Bs: list[torch.Tensor], lora_As: list[torch.Tensor], scales: list[float], rtol: float
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The SVD ``[ΔW_1 … ΔW_T] = U S [V_1ᵀ … V_Tᵀ]`` (concatenated along the input dim), from the factors.

    ``[s_1 B_1 A_1 … s_T B_T A_T] = B_s · blockdiag(s_t A_t)`` with ``B_s = [B_1 … B_T] = Q R``
    and ``A_tᵀ = Q_t R_t`` (thin QR), so it equals ``Q · C · blockdiag(Q_tᵀ)`` with the small
    core ``C = R · blockdiag(s_t R_tᵀ)`` (at most ``Σr x Σr``); ``C = U_c S V_cᵀ`` gives
    ``U = Q U_c`` and ``S V_tᵀ = S (V_cᵀ)_t Q_tᵀ``. No ``out x T·in`` matrix is formed.

    Args:
        lora_Bs: per task ``out x r_t``.
        lora_As: per task ``r_t x in``.
        scales: per task LoRA scaling (times the task's weight, if any).
        rtol: singular values ``<= rtol · σ_1`` are dropped (numerically zero: the
            concatenation has rank ``<= Σr``).

    Returns:
        ``(U, blocks)``: ``U`` ``out x k`` with orthonormal columns, ``blocks[t] = S V_tᵀ``
        (``k x in``), so ``ΔW_t = U blocks[t]`` up to the dropped values.
    """
    q, r = ops.thin_qr(torch.cat(lora_Bs, dim=1).float())
    per_task = [ops.thin_qr(a.float().T) for a in lora_As]
    core = r.double() @ torch.block_diag(*(scale * r_t.double().T for (_, r_t), scale in zip(per_task, scales)))
    core_u, s, core_vh = torch.linalg.svd(core, full_matrices=False)
    kept = int((s > rtol * s[0]).sum()) if len(s) and s[0] > 0 else 0
    sv_h = (s[:kept, None] * core_vh[:kept]).float()  # S V_cᵀ, k x Σ(block widths)
    widths = [q_t.shape[1] for q_t, _ in per_task]
    blocks = [part @ q_t.T for part, (q_t, _) in zip(sv_h.split(widths, dim=1), per_task)]
    return q @ core_u[:, :kept].float(), blocks


@register("knots_ties", rule="ties")
@register("knots_dare_ties", rule="dare_ties")
@dataclass
class KnOTSMerge(MergeMethod):
    """Per module: the shared basis ``U`` of all tasks' deltas (``knots_alignment``), the
    per-task ``S V_tᵀ`` merged by PEFT's TIES or DARE-TIES, ``ΔW = U · merged`` (factored,
    rank ``<= Σr``). Singular values at or below ``rtol`` times the largest are dropped: the
    paper's cut-off is 1e-5; here it is relative, so it does not depend on the deltas' scale.
    """

    accepts_merged = False

    rule: str = field("ties", help="ties or dare_ties (fixed by the method name)")
    weights: list[float] | None = field(None, help="one weight per adapter (default 1.0 each)")
    density: float = field(0.5, help="fraction of each task's S·Vᵀ entries kept by pruning")
    majority_sign_method: str = field("total", help="TIES sign election: 'total' or 'frequency'")
    rtol: float = field(1e-5, help="drop singular values <= rtol · σ₁ of the concatenated deltas")
    seed: int = field(0, help="seed of DARE's random drop masks (per module)")

    def __post_init__(self) -> None:
        if self.rule not in ("ties", "dare_ties"):
            raise IloraError(f"rule {self.rule!r}: expected 'ties' or 'dare_ties'")
        check_rule_options(self.density, self.majority_sign_method)

    def merge_module(self, module: str, deltas: list[ModuleDelta | None]) -> tuple[LowRankDelta, dict]:
        weights = input_weights(self.weights, len(deltas), self.name)
        present = [(d, w) for d, w in zip(deltas, weights) if d is not None]
        u, blocks = knots_alignment(
            [d.lora_B for d, _ in present], [d.lora_A for d, _ in present], [d.scale for d, _ in present], self.rtol
        )
        seed = int(module_generator(self.seed, module).initial_seed())
        w = torch.tensor([w for _, w in present])
        merged = apply_rule(self.rule, blocks, w, self.density, self.majority_sign_method, seed)
        return LowRankDelta(u, merged, 1.0), {"ranks": [d.rank for d, _ in present], "kept": u.shape[1]}
