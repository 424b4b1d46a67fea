"""TSV-M (Gargiulo et al., CVPR 2025) on LoRA deltas, from their factors."""

from __future__ import annotations

from dataclasses import dataclass

from ilora.config import field
from ilora.merge import ops
from ilora.merge.io import LowRankDelta, ModuleDelta
from ilora.merge.method import MergeMethod, register


@register("tsv")
@dataclass
class TSVMerge(MergeMethod):
    """Per module: each delta's SVD from its factors, its top ``⌊min(out, in)/T⌋`` triplets
    (at most its rank), the stacked ``U``'s and ``V``'s orthogonalised (``ops.tsv_merge``),
    ``ΔW = α · U⊥ diag(S) V⊥ᵀ``, returned factored (rank ``<= Σr``)."""

    accepts_merged = False

    alpha: float = field(1.0, help="global scale of the merged delta (the paper's α)")

    def merge_module(self, module: str, deltas: list[ModuleDelta | None]) -> tuple[LowRankDelta, dict]:
        present = [d for d in deltas if d is not None]
        triplets = [ops.factorized_svd(d.lora_B, d.lora_A, d.scale) for d in present]
        left, right = ops.tsv_merge(triplets, present[0].shape, self.alpha)
        return LowRankDelta(left, right, 1.0), {"ranks": [d.rank for d in present], "rank": left.shape[1]}
