"""I-LoRA iterative merging, exactly SPEC §2: truncated SVDs, then a sign-keeping max-magnitude merge.

Its two parts are registered apart, for ablations: ``ilora_truncate`` (the truncations,
summed) and ``ilora_maxmag`` (max-magnitude on untruncated deltas).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ilora.config import field
from ilora.errors import IloraError
from ilora.merge import ops
from ilora.merge.io import DenseDelta, LowRankDelta, MergedState, ModuleDelta
from ilora.merge.method import MergeMethod, Source, module_generator, register

COMBINES = ("max_magnitude", "sum")


@register("ilora")
@register("ilora_truncate", combine="sum")
@register("ilora_maxmag", keep=1.0)
@dataclass
class ILoRAMerge(MergeMethod):
    """Each adapter keeps its top ``ceil(keep·r)`` singular values (τ = the smallest kept); a
    merged state keeps its singular values above the new adapters' τ; the truncated
    candidates are merged element-wise by max magnitude, sign kept, ties to the later input.

    With several new adapters beside a merged state, the merged state is cut at the smallest
    of their τ (it keeps every value that any of them would keep). A module that no new
    adapter touches passes through unchanged.

    ``ilora_truncate`` sums the truncated candidates instead of the max-magnitude merge; the
    sum stays factored (rank: the kept values in all) unless a dense input passes through.
    ``ilora_maxmag`` is ``keep = 1``, max-magnitude on the untruncated deltas. On adapters
    alone that is ``magmax``'s ΔW (the same rule on the same deltas; here rebuilt from their
    SVDs, so equal up to float rounding, not bit for bit); it is registered anyway so that
    reports name the part. Beside a merged state it differs from ``magmax``: the merged state
    is still cut at the new adapters' τ, their smallest singular value.
    """

    keep: float = field(0.8, help="fraction of each adapter's rank kept (SPEC §2.2; the paper's Eq. 5)")
    svd_tol: float = field(
        1e-5, help="certified accuracy of the merged state's truncated SVD: Frobenius error vs the exact one, relative"
    )
    seed: int = field(0, help="seed of the truncated SVD's random start block")
    combine: str = field("max_magnitude", help="max_magnitude (I-LoRA) or sum of the truncations (fixed by the method name)")

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise IloraError(f"--keep {self.keep}: must be in (0, 1]")
        if self.combine not in COMBINES:
            raise IloraError(f"combine {self.combine!r}: expected one of {COMBINES}")

    def check(self, inputs: list[Source]) -> None:
        merged = [str(src.path or "in-memory state") for src in inputs if isinstance(src, MergedState)]
        if len(merged) > 1:
            raise IloraError(f"{merged[1]}: ilora folds adapters into one merged state at a time; got {len(merged)}")

    def merge_module(self, module: str, deltas: list[ModuleDelta | None]) -> tuple[torch.Tensor | LowRankDelta, dict]:
        candidates: list[ops.Candidate | None] = []  # truncations stay factored until the merge
        records: list[dict | None] = []
        taus = []
        for delta in deltas:
            if isinstance(delta, LowRankDelta) and not delta.merged:
                pair, tau = ops.truncated_lora(delta.lora_B, delta.lora_A, delta.scale, self.keep)
                taus.append(tau)
                candidates.append(pair)
                records.append({"kind": "lora", "rank": delta.rank, "kept": pair[1].shape[0], "tau": tau})
            else:
                candidates.append(None)  # truncated below, once the new adapters' τ is known
                records.append(None if delta is None else {"kind": "merged"})
        threshold = min(taus) if taus else None
        for i, delta in enumerate(deltas):
            if isinstance(delta, DenseDelta):
                if threshold is None:
                    candidates[i] = delta.delta
                    records[i]["kept"] = None
                    continue
                u, s, vh, width = ops.leading_singular_triplets(
                    delta.delta, threshold, tol=self.svd_tol, generator=module_generator(self.seed, module)
                )
                candidates[i] = (u * s, vh)
                records[i].update(kept=len(s), threshold=threshold, svd_block=width)
            elif isinstance(delta, LowRankDelta) and delta.merged:  # a factored merged state: exact SVD
                if threshold is None:
                    candidates[i] = delta.candidate()
                    records[i]["kept"] = None
                    continue
                u, s, vh = ops.factorized_svd(delta.lora_B, delta.lora_A, delta.scale)
                kept = int((s > threshold).sum())
                candidates[i] = (u[:, :kept] * s[:kept], vh[:kept])
                records[i].update(kept=kept, threshold=threshold, svd="factored")
        present = [c for c in candidates if c is not None]
        if self.combine == "sum":
            if all(isinstance(c, tuple) for c in present):
                return LowRankDelta(*ops.concat_factors(present), 1.0), {"inputs": records}
            return sum(c[0] @ c[1] if isinstance(c, tuple) else c for c in present), {"inputs": records}
        return ops.max_magnitude(present), {"inputs": records}
