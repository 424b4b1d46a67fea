"""Composing a library's skills for a new task in parameter space (PSEC's composition).

PSEC keeps skills as LoRA modules and programs a new skill by combining them in parameter
space. Here the composition is one weight per skill, fitted on the new task's rows by gradient
descent on the answer tokens' loss, optionally with a new small LoRA adapter trained beside the
weights::

    W = W₀ + Σ_i w_i ΔW_i (+ B_new A_new)

The skills stay frozen; each ``ΔW_i x`` is computed from the skill's factors
(``s_i B_i (A_i x)``, never the dense ``ΔW_i``). The result is written as one PEFT LoRA adapter
(the exact factored weighted sum, ``ilora.merge``'s ``sum``), so ``ilora play --adapter A``
and ``ilora eval general --adapter A`` use it as they are.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ilora.config import field, to_dict
from ilora.errors import IloraError
from ilora.fileio import atomic_dir, folder_sha256, to_json
from ilora.library.store import SkillLibrary

COMPOSE_RECORD = "compose_record.json"
NEW_ADAPTER = "new_adapter"


@dataclass
class ComposeConfig:
    """How ``compose`` fits the skills' weights (and a new adapter) on a task's rows."""

    skills: list[str] | None = field(None, help="the skills composed (default: every skill of the library)")
    rows: int = field(256, help="first rows of the task data fitted on")
    steps: int = field(100, help="optimiser steps")
    batch_size: int = field(8, help="rows per step")
    lr: float = field(0.05, help="Adam learning rate of the skills' weights")
    init_weight: float | None = field(None, help="every skill's starting weight (default 1/skills: their mean)")
    new_rank: int = field(0, help="rank of a new LoRA adapter trained with the weights (0: weights only)")
    new_alpha: float | None = field(None, help="lora_alpha of the new adapter (default 2 x new_rank)")
    new_lr: float = field(1e-3, help="Adam learning rate of the new adapter")
    seed: int = field(0, help="seed of the row order and the new adapter's initialisation")
    device: str = field("cpu", help="torch device")

    def __post_init__(self) -> None:
        for name in ("rows", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise IloraError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        for name in ("lr", "new_lr"):
            if not getattr(self, name) > 0:
                raise IloraError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be positive")
        if self.new_rank < 0:
            raise IloraError(f"--new-rank {self.new_rank}: must be 0 (no new adapter) or more")


class SkillMixture:
    """Adds ``Σ_i w_i s_i B_i A_i x`` to the output of every base linear layer a skill adapts.

    Forward hooks on the base ``nn.Linear`` modules (PEFT keeps them as ``base_layer`` when it
    wraps a module, so a new LoRA adapter can be added afterwards). Per module, the skills'
    factors are stacked: ``A`` (``R x in``), ``B`` (``out x R``, scales folded in), and each of
    the ``R`` rank columns knows its skill, so one pass gives every skill's term.

    Args:
        model: the base model (not wrapped by PEFT yet).
        adapters: the skills' ``LoraAdapter``s, in weight order.
        init: every weight's starting value.
        device: where the factors live.
    """

    def __init__(self, model: nn.Module, adapters: list, init: float, device: str):
        self.weights = nn.Parameter(torch.full((len(adapters),), float(init), device=device))
        self.handles = []
        modules = sorted({m for a in adapters for m in a.modules})
        for module in modules:
            owners, lefts, rights = [], [], []
            for i, adapter in enumerate(adapters):
                if module in adapter.modules:
                    delta = adapter.load(module)
                    lefts.append(delta.lora_B * delta.scale)
                    rights.append(delta.lora_A)
                    owners += [i] * delta.rank
            stacked = (
                torch.cat(lefts, 1).to(device),
                torch.cat(rights, 0).to(device),
                torch.tensor(owners, device=device),
            )
            self.handles.append(model.get_submodule(module).register_forward_hook(self._hook(*stacked)))
        self.modules = modules

    def _hook(self, lora_B: torch.Tensor, lora_A: torch.Tensor, owners: torch.Tensor):
        def hook(module, args, output):
            mixed = (args[0].to(lora_A.dtype) @ lora_A.T) * self.weights[owners]
            return output + (mixed @ lora_B.T).to(output.dtype)

        return hook

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self.handles:
            handle.remove()


def _model_inputs(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "pixel_values", "labels")
    return {k: batch[k].to(device) for k in keys if k in batch}


@torch.no_grad()
def mean_answer_loss(model: nn.Module, collate, rows, batch_size: int, device: str) -> float:
    """Cross-entropy per answer token over ``rows`` (every answer token counts once)."""
    from ilora.routing.losses import target_counts

    total = count = 0.0
    for start in range(0, len(rows), batch_size):
        batch = collate([{**rows[i], "route": "task"} for i in range(start, min(start + batch_size, len(rows)))])
        tokens = float(target_counts(batch["labels"]).sum())
        total += float(model(**_model_inputs(batch, device)).loss) * tokens
        count += tokens
    return total / max(count, 1.0)


def compose_skills(
    library: str | os.PathLike | SkillLibrary,
    task_data: str | os.PathLike,
    out: str | os.PathLike,
    config: ComposeConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit one weight per skill (and optionally a new LoRA adapter) on a task's rows; write the composed adapter.

    Args:
        library: the skill library (folder or open).
        task_data: the new task's rows (``datasets.save_to_disk`` folder of example rows).
        out: the PEFT adapter folder to write: ``Σ w_i ΔW_i`` (+ the new adapter) exactly, with
            ``compose_record.json`` (the weights, the losses, the inputs' hashes) and, with a new
            adapter, that adapter alone in ``new_adapter/`` (it can be added to the library).
        config: the fit's settings.
        overwrite: replace an existing ``out``.
        progress: show a progress bar over steps.

    Returns:
        The record also written to ``out/compose_record.json``; ``loss`` holds the mean
        answer-token loss on the fitted rows for the base model, the starting weights and the
        fitted composition.
    """
    from tqdm.auto import tqdm

    from ilora.merge.engine import merge_adapters
    from ilora.merge.export import export_lora
    from ilora.merge.io import LoraAdapter
    from ilora.models.load import resolve_model_path
    from ilora.routing.cli import saved_rows
    from ilora.routing.collator import RoutingCollator
    from ilora.routing.lora import apply_lora
    from ilora.routing.train import load_model_and_processor

    started = time.monotonic()
    config = config or ComposeConfig()
    library = library if isinstance(library, SkillLibrary) else SkillLibrary(library)
    out = Path(out)
    if out.exists() and not overwrite:
        raise IloraError(f"--out {out}: already exists (pass --overwrite to replace it)")
    skills = library.skills() if config.skills is None else [library.skill(name) for name in config.skills]
    if not skills:
        raise IloraError(f"{library.root}: has no skill to compose (add some with `ilora library add`)")
    if len({s.name for s in skills}) != len(skills):
        raise IloraError(f"--skills {','.join(config.skills)}: a skill is named twice")
    rows = saved_rows("--task-data", str(task_data), config.rows)
    init = 1.0 / len(skills) if config.init_weight is None else config.init_weight

    with library.reading():
        adapters = [LoraAdapter(s.adapter) for s in skills]
        model, processor = load_model_and_processor(resolve_model_path(library.base), "float32", config.device)
        model.requires_grad_(False)
        mixture = SkillMixture(model, adapters, init, config.device)
        groups = [{"params": [mixture.weights], "lr": config.lr}]
        if config.new_rank:
            alpha = 2 * config.new_rank if config.new_alpha is None else config.new_alpha
            model = apply_lora(model, config.new_rank, alpha, target_modules=mixture.modules, seed=config.seed)
            groups.append({"params": [p for p in model.parameters() if p.requires_grad], "lr": config.new_lr})
        collate = RoutingCollator(processor)
        losses = {}
        with torch.no_grad():  # the base model's loss: every weight 0, the new adapter's B is still 0
            mixture.weights.zero_()
            losses["base"] = mean_answer_loss(model, collate, rows, config.batch_size, config.device)
            mixture.weights.fill_(init)
        losses["start"] = mean_answer_loss(model, collate, rows, config.batch_size, config.device)
        optimizer = torch.optim.Adam(groups)
        generator = torch.Generator().manual_seed(config.seed)
        order: list[int] = []
        model.train()
        for _ in tqdm(range(config.steps), desc="compose", unit="step", disable=not progress):
            if len(order) < config.batch_size:
                order += torch.randperm(len(rows), generator=generator).tolist() * -(-config.batch_size // len(rows))
            picked, order = order[: config.batch_size], order[config.batch_size :]
            batch = collate([{**rows[i], "route": "task"} for i in picked])
            loss = model(**_model_inputs(batch, config.device)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        losses["fitted"] = mean_answer_loss(model, collate, rows, config.batch_size, config.device)
        mixture.remove()
        weights = [float(w) for w in mixture.weights.detach().cpu()]

        with tempfile.TemporaryDirectory() as scratch:
            inputs, input_weights = list(adapters), list(weights)
            if config.new_rank:
                model.save_pretrained(Path(scratch) / NEW_ADAPTER)
                inputs.append(LoraAdapter(Path(scratch) / NEW_ADAPTER))
                input_weights.append(1.0)
            state = merge_adapters(inputs, "sum", weights=input_weights, progress=False)
            record = {
                "library": str(library.root.resolve()),
                "base": library.base,
                "skills": [
                    {"name": s.name, "adapter_sha256": s.adapter_sha256, "weight": w} for s, w in zip(skills, weights)
                ],
                "new_adapter": NEW_ADAPTER if config.new_rank else None,
                "task_data": {"path": str(Path(task_data).resolve()), "sha256": folder_sha256(Path(task_data))},
                "rows": len(rows),
                "config": to_dict(config),
                "loss": losses,
                "seconds": round(time.monotonic() - started, 3),
            }
            with atomic_dir(out, overwrite) as tmp:
                tmp.rmdir()  # export_lora makes the adapter folder itself
                export_lora(state, tmp)
                if config.new_rank:
                    shutil.copytree(Path(scratch) / NEW_ADAPTER, tmp / NEW_ADAPTER)
                (tmp / COMPOSE_RECORD).write_text(to_json(record) + "\n")
    return record
