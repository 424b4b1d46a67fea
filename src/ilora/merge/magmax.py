"""MagMax: the sign-keeping max-magnitude rule on the full, untruncated task vectors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ilora.merge import ops
from ilora.merge.io import ModuleDelta
from ilora.merge.method import MergeMethod, register


@register("magmax")
@dataclass
class MagMaxMerge(MergeMethod):
    """Element-wise value farthest from zero across the true deltas ``s·B@A`` (no SVD truncation)."""

    def merge_module(self, module: str, deltas: list[ModuleDelta | None]) -> tuple[torch.Tensor, dict]:
        # LoRA inputs stay factored: max_magnitude forms their products a row block at a time.
        present = [d.candidate() for d in deltas if d is not None]
        return ops.max_magnitude(present), {"n_inputs": len(present)}
