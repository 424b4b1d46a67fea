"""PCB-merging (parameter competition balancing) on the true LoRA deltas."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ilora.config import field
from ilora.errors import IloraError
from ilora.merge import ops
from ilora.merge.io import ModuleDelta
from ilora.merge.method import MergeMethod, register


@register("pcb")
@dataclass
class PCBMerge(MergeMethod):
    """PCB-merging (Du et al., 2024) of the deltas ``s·B@A``, then scaled by ``scale`` (the paper's λ)."""

    ratio: float = field(0.1, help="fraction of entries each task keeps after balancing (the paper searches 0.05-0.2)")
    scale: float = field(1.0, help="λ, the factor applied to the merged task vector")

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise IloraError(f"--method pcb: ratio {self.ratio} must be in (0, 1]")

    def merge_module(self, module: str, deltas: list[ModuleDelta | None]) -> tuple[torch.Tensor, dict]:
        present = [d.dense() for d in deltas if d is not None]
        return ops.pcb_merge(present, self.ratio).mul_(self.scale), {"n_inputs": len(present)}
