"""The exact sum of the deltas, kept factored: ``ΔW = Σ_t w_t s_t B_t A_t`` as one LoRA of rank ``Σ r_t``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ilora.config import field
from ilora.merge import ops
from ilora.merge.io import LowRankDelta, ModuleDelta
from ilora.merge.method import MergeMethod, input_weights, register


@register("sum")
@dataclass
class FactoredSum(MergeMethod):
    """``B = [w_1 s_1 B_1 … w_T s_T B_T]``, ``A = [A_1; …; A_T]``: task arithmetic without loss.

    The same ΔW as ``task_arithmetic`` with these weights, stored as factors, so an export at
    rank ``>= Σ r_t`` has zero error (PEFT's ``cat`` on the true deltas). A factored merged
    state is one more factor pair: ``sum(sum(a, b), c) = sum(a, b, c)``, still factored. A
    dense input (a merged state of another method) makes that module's sum dense, still exact.
    """

    weights: list[float] | None = field(None, help="one weight per input (default 1.0 each)")

    def merge_module(self, module: str, deltas: list[ModuleDelta | None]) -> tuple[torch.Tensor | LowRankDelta, dict]:
        weights = input_weights(self.weights, len(deltas), self.name)
        present = [(d, w) for d, w in zip(deltas, weights) if d is not None]
        ranks = [d.rank if isinstance(d, LowRankDelta) else None for d, _ in present]
        if None in ranks:
            merged = present[0][0].dense() * present[0][1]  # a new tensor: the input is not changed
            for delta, w in present[1:]:
                merged.add_(delta.dense(), alpha=w)
            return merged, {"ranks": ranks, "factored": False}
        left, right = ops.concat_factors([(d.lora_B * (w * d.scale), d.lora_A) for d, w in present])
        return LowRankDelta(left, right, 1.0), {"ranks": ranks, "factored": True}
