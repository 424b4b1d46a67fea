"""What ``ilora train`` reads (plain dataclasses: importing them loads no ML library)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ilora.config import field


@dataclasses.dataclass
class DataSpec:
    """One saved dataset (``datasets.load_from_disk`` folder) and how many rows to draw."""

    path: str = field(help="folder written by datasets.save_to_disk, rows following the example contract")
    size: int | None = field(None, help="rows drawn from it (default: all; more than its length repeats rows)")


@dataclasses.dataclass
class TrainConfig:
    """What ``ilora train`` reads: model, data and training settings."""

    model: str = field(help="HF model folder or hub id (VLM or causal LM)")
    out: str = field(help="adapter output folder (checkpoints go to <out>.run)")
    task_data: list[DataSpec] = field(default_factory=list, help="task datasets (route 'task': LM loss)")
    general_data: list[DataSpec] = field(
        default_factory=list, help="general datasets: general VL data and other games (route 'general')"
    )
    fold_adapters: list[str] = field(
        default_factory=list,
        help="LoRA adapters added to the base weights before training (frozen): train an adapter in the model it will "
        "be merged into, e.g. the other tasks' adapters (leak-aware refit)",
    )
    init_adapter: str | None = field(None, help="LoRA adapter to continue from (its rank and targets are used)")
    dtype: str = field("float32", help="model dtype: float32, bfloat16, float16")
    training: dict[str, Any] = field(
        default_factory=dict, help="RoutingConfig fields: eps_lm/eps_kl/eps_norm, lora_r, learning_rate, ..."
    )
