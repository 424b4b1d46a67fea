"""What ``ilora train`` reads (plain dataclasses: importing them loads no ML library)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ilora.config import field


# Training settings by model (RoutingConfig fields); a config's ``training`` mapping updates the
# preset its model gets. The shipped base ('builtin') gets the default experiment's settings
# (configs/default.yaml's train section, as the experiment builds its RoutingConfig from it;
# tests/test_train_presets.py checks that they agree): the paper's settings fail on it (at
# eps_norm 2 its Pong adapter never learns which way to move, README "Loss ablations").
# Any other model gets the paper's 7B settings (SPEC §1; its learning rate is unstated, this
# is TrainingArguments' default).
BUILTIN_PRESET: dict[str, Any] = {
    "max_steps": 250,
    "per_device_train_batch_size": 16,
    "learning_rate": 2e-3,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.05,  # a share of the steps, as the experiment's max(1, steps // 20)
    "lora_r": 16,
    "lora_alpha": 32.0,
    "lora_dropout": 0.0,
    "eps_lm": 1.0,
    "eps_kl": 0.01,
    "eps_norm": 0.01,
    "logging_steps": 0.1,  # a share of the steps, as the experiment's max(1, steps // 10)
}
PAPER_PRESET: dict[str, Any] = {
    "num_train_epochs": 5.0,
    "learning_rate": 5e-5,
    "lora_r": 128,
    "lora_alpha": 256.0,
    "lora_dropout": 0.05,
    "eps_lm": 1.0,
    "eps_kl": 0.01,
    "eps_norm": 2.0,
}
TRAIN_PRESETS: dict[str, dict[str, Any]] = {"builtin": BUILTIN_PRESET, "paper": PAPER_PRESET}


@dataclasses.dataclass
class DataSpec:
    """One dataset and how many rows to draw from it."""

    path: str = field(
        help="a folder written by datasets.save_to_disk (rows following the example contract), the folder "
        "`ilora collect --out` wrote, or a LLaVA-style conversation file (.json / .jsonl)"
    )
    size: int | None = field(None, help="rows drawn from it (default: all; more than its length repeats rows)")
    image_folder: str | None = field(
        None, help="LLaVA-style file only: the folder its image paths are relative to (default: the file's folder)"
    )


@dataclasses.dataclass
class TrainConfig:
    """What ``ilora train`` reads: model, data and training settings."""

    model: str = field(help="HF model folder, 'builtin' (the shipped tiny base) or a cached hub id (VLM or causal LM)")
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
        default_factory=dict,
        help="RoutingConfig fields (eps_lm/eps_kl/eps_norm, lora_r, learning_rate, ...) that update the model's preset "
        "(TRAIN_PRESETS: 'builtin' for the shipped base, 'paper' for any other model); num_train_epochs without "
        "max_steps replaces the preset's max_steps",
    )
