"""Training one routed adapter end to end: load, mix, train, save atomically.

``train_adapter`` is the library entry point (the experiment calls it); ``TrainConfig`` is
what ``ilora train`` reads from YAML.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ilora.config import from_dict
from ilora.errors import IloraError
from ilora.fileio import atomic_dir, file_sha256
from ilora.models.adapter import check_lora_adapter, check_modules_fit, lora_weights_file
from ilora.routing.collator import Source, mix_sources
from ilora.routing.config import TRAIN_PRESETS, DataSpec, TrainConfig
from ilora.routing.lora import load_adapter
from ilora.routing.trainer import TERMS, RoutingConfig, RoutingTrainer

LOSS_LOG = "loss_log.json"
CONFIG_FILE = "routing_config.json"
TRAINED_ON_FILE = "trained_on.json"


def load_model_and_processor(model_path: str | os.PathLike, dtype: str = "float32", device: str = "cpu"):
    """A VLM with its processor, or a causal LM with its tokenizer."""
    from transformers import AutoTokenizer

    from ilora.models.load import check_processor, load_model, resolve_model_path

    model_path = resolve_model_path(model_path)
    model = load_model(model_path, dtype, device)
    if hasattr(model.config, "vision_config"):
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model_path)
        check_processor(model, processor, model_path)
        return model, processor
    return model, AutoTokenizer.from_pretrained(model_path)


def plot_loss_log(log_history: list[dict[str, Any]], path: Path) -> None:
    """One panel per loss term (total, lm, kl, norm) against the optimiser step (nothing if none was logged)."""
    keys = ["loss"] + [f"loss_{t}" for t in TERMS]
    keys = [k for k in keys if any(k in e for e in log_history)]
    if not keys:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(e["step"], e[key]) for e in log_history if key in e]
        ax.plot(*zip(*points), marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_adapter(
    model_path: str | os.PathLike,
    task_rows: Sequence[Source | Sequence[dict]],
    general_rows: Sequence[Source | Sequence[dict]],
    config: RoutingConfig,
    out_dir: str | os.PathLike,
    resume: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
    fold_adapters: Sequence[str | os.PathLike] = (),
    init_adapter: str | os.PathLike | None = None,
    prompt_settings=None,
) -> Path:
    """Train one routed LoRA adapter and save it as a standard PEFT adapter folder.

    With ``fold_adapters`` the adapter is trained on a base that has other adapters' deltas
    added to its weights (PEFT's ``merge_and_unload``): the model it will live in after a
    summed merge. Its LM loss then learns the task through the others' leaks on the task's
    rows, and its KL and norm terms keep it quiet on their rows with them present (the
    KL's reference is the folded base). The saved adapter is still a delta on the plain
    base, with the folded adapters named in ``trained_on.json``.

    Args:
        model_path: HF model folder or hub id (VLM or causal LM).
        task_rows: task sources (row lists or ``Source``s with sizes).
        general_rows: general sources (general VL data, other games); may be empty for plain LoRA.
        config: ``RoutingConfig``; its ``output_dir`` is replaced by ``<out_dir>.run``, where
            the Trainer keeps checkpoints.
        out_dir: the adapter folder, written atomically: ``adapter_config.json``,
            ``adapter_model.safetensors``, ``routing_config.json``, ``loss_log.json``, ``loss.png``.
        resume: continue from the last checkpoint in ``<out_dir>.run`` if there is one; the
            continued run replaces ``out_dir``.
        dtype: model dtype.
        overwrite: replace an existing ``out_dir`` (otherwise refused before training, unless resuming).
        fold_adapters: LoRA adapter folders added to the base weights before training (frozen).
        init_adapter: a LoRA adapter folder to continue from (its rank, alpha and targets
            replace ``config``'s LoRA settings); default: a fresh LoRA from ``config``.
        prompt_settings: the :class:`~ilora.prompt_settings.PromptSettings` of the task rows,
            written to ``prompt_settings.json`` (``ilora play`` plays with them); ``None`` for
            rows that are not a game's.

    Returns:
        ``out_dir``.
    """
    from transformers.trainer_utils import get_last_checkpoint

    out_dir = Path(out_dir)
    if out_dir.exists() and not (overwrite or resume):
        raise IloraError(f"{out_dir}: output already exists (pass --overwrite to replace it, or --resume to continue it)")
    run_dir = out_dir.with_name(out_dir.name + ".run")
    args = copy.deepcopy(config)
    args.output_dir = str(run_dir)
    model, processor = load_model_and_processor(model_path, dtype, "cpu")
    for folder in fold_adapters:
        model = load_adapter(model, folder).merge_and_unload()
    if init_adapter is not None:
        model = load_adapter(model, init_adapter, trainable=True)
    dataset = mix_sources(task_rows, general_rows, seed=args.seed)
    trainer = RoutingTrainer(model, args, train_dataset=dataset, processing_class=processor)
    checkpoint = get_last_checkpoint(str(run_dir)) if resume and run_dir.is_dir() else None
    if resume and checkpoint is None:
        print(f"ilora train: no checkpoint in {run_dir}, starting from scratch")
    trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.is_world_process_zero():
        with atomic_dir(out_dir) as tmp:
            trainer.model.save_pretrained(tmp)
            (tmp / CONFIG_FILE).write_text(args.to_json_string())
            (tmp / LOSS_LOG).write_text(json.dumps(trainer.state.log_history, indent=1))
            (tmp / TRAINED_ON_FILE).write_text(json.dumps(trained_on(model_path, fold_adapters, init_adapter), indent=1))
            plot_loss_log(trainer.state.log_history, tmp / "loss.png")
            if prompt_settings is not None:
                prompt_settings.write(tmp)
    trainer.accelerator.wait_for_everyone()
    return out_dir


def trained_on(
    model_path: str | os.PathLike, fold_adapters: Sequence[str | os.PathLike], init_adapter: str | os.PathLike | None
) -> dict[str, Any]:
    """What an adapter was trained on: the base, the adapters folded into it and the one it
    continued from, each adapter with the sha256 of its weights."""

    def named(folder: str | os.PathLike) -> dict[str, str]:
        return {"path": str(folder), "sha256": file_sha256(lora_weights_file(Path(folder)))}

    return {
        "base": str(model_path),
        "folded": [named(f) for f in fold_adapters],
        "init": None if init_adapter is None else named(init_adapter),
    }


def routing_config(training: dict[str, Any], where: str = "training") -> RoutingConfig:
    """A ``RoutingConfig`` from a mapping, each value converted to its field's type (``"1e-3"``
    is a float learning rate), unknown keys and unconvertible values named in the error."""
    names = {f.name for f in dataclasses.fields(RoutingConfig)}
    unknown = sorted(set(training) - names)
    if unknown:
        raise IloraError(f"{where}: unknown RoutingConfig key(s) {unknown}")
    try:
        return from_dict(RoutingConfig, {"output_dir": "unused", **training}, where)
    except (TypeError, ValueError) as err:  # TrainingArguments' own checks
        if isinstance(err, IloraError):
            raise
        raise IloraError(f"{where}: {err}") from err


LLAVA_SUFFIXES = (".json", ".jsonl")


def training_preset(model: str | os.PathLike, training: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The RoutingConfig settings for ``model``: its preset (``TRAIN_PRESETS``) updated by ``training``.

    The shipped base (``builtin``, or its folder) gets the ``builtin`` preset, any other model
    the paper's. ``num_train_epochs`` given without ``max_steps`` replaces the preset's
    ``max_steps`` (which would otherwise win over it).

    Returns:
        ``(preset name, settings)``.
    """
    from ilora.models.load import BUILTIN_BASE, builtin_base

    shipped = str(model) == BUILTIN_BASE or Path(model).resolve() == builtin_base().resolve()
    name = "builtin" if shipped else "paper"
    settings = {**TRAIN_PRESETS[name], **training}
    if "num_train_epochs" in training and "max_steps" not in training:
        settings.pop("max_steps", None)
    return name, settings


def dataset_path(spec: DataSpec, where: str) -> Path:
    """The folder or LLaVA-style file a data spec names (a collection's ``dataset`` inside it)."""
    from ilora.atari.collect import collected_dataset

    path = Path(spec.path)
    if path.suffix in LLAVA_SUFFIXES:
        if not path.is_file():
            raise IloraError(f"{where}: {path}: no such LLaVA-style conversation file")
        return path
    if spec.image_folder is not None:
        raise IloraError(f"{where}: {path}: image_folder is for LLaVA-style .json/.jsonl files only")
    path = collected_dataset(path)
    if not path.is_dir():
        raise IloraError(f"{where}: {path} is not a folder saved with datasets.save_to_disk")
    return path


def load_sources(specs: Sequence[DataSpec], route: str, where: str) -> list[Source]:
    """``Source``s from saved datasets, collections or LLaVA-style files, checked to follow the row contract."""
    from datasets import load_from_disk

    from ilora.general.llava_json import load_llava_json

    sources = []
    for spec in specs:
        path = dataset_path(spec, where)
        if path.suffix in LLAVA_SUFFIXES:
            rows = load_llava_json(path, spec.image_folder or path.parent)
            if not rows:
                raise IloraError(f"{where}: {path}: no conversation with an image")
            sources.append(Source(rows, route, spec.size, name=str(path)))
            continue
        try:
            ds = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise IloraError(f"{where}: {path}: cannot load dataset ({err})") from err
        if not {"prompt", "answer"} <= set(ds.column_names) and not {"input_ids", "labels"} <= set(ds.column_names):
            raise IloraError(f"{where}: {path} has columns {ds.column_names}; needs prompt + answer (labels)")
        sources.append(Source(ds, route, spec.size, name=str(path)))
    return sources


def task_prompt_settings(specs: Sequence[DataSpec]):
    """The prompt settings the task datasets record (``None`` if none does), their games together.

    Raises:
        IloraError: Two task datasets were prompted differently (one line naming both).
    """
    from ilora.prompt_settings import combine_prompt_settings, read_prompt_settings

    named = []
    for i, spec in enumerate(specs):
        path = dataset_path(spec, f"task_data[{i}]")
        named.append((str(path), None if path.is_file() else read_prompt_settings(path)))
    try:
        return combine_prompt_settings(named)
    except IloraError as err:
        raise IloraError(f"task_data: {err}; an adapter is played with one prompt") from err


def check_adapters_fit(config: TrainConfig) -> None:
    """Refuse a ``fold_adapters`` or ``init_adapter`` folder that is not a LoRA adapter of ``model``'s shapes."""
    from ilora.models.load import model_weight_shapes, resolve_model_path

    named = [(f"fold_adapters[{i}]", f) for i, f in enumerate(config.fold_adapters)]
    named += [("init_adapter", config.init_adapter)] if config.init_adapter is not None else []
    if not named:
        return
    shapes = model_weight_shapes(resolve_model_path(config.model))
    for key, folder in named:
        try:
            check_modules_fit(check_lora_adapter(folder), shapes, folder, config.model)
        except IloraError as err:
            raise IloraError(f"{key}: {err}") from err


def train_from_config(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Run ``ilora train`` for a loaded ``TrainConfig``: the model's preset updated by its
    ``training`` keys; the task datasets' prompt settings are copied into the adapter."""
    if not config.task_data:
        raise IloraError("task_data: at least one task dataset is needed")
    preset, training = training_preset(config.model, config.training)
    args = routing_config(training)
    check_adapters_fit(config)
    prompt = task_prompt_settings(config.task_data)
    task = load_sources(config.task_data, "task", "task_data")
    general = load_sources(config.general_data, "general", "general_data")
    given = ", ".join(sorted(config.training)) or "none"
    print(f"ilora train: {preset} preset for {config.model} (your training keys: {given}); prompt: "
          + (f"{', '.join(prompt.games)}, object_text={prompt.object_text}, reasoning={prompt.reasoning}"
             if prompt is not None else "not recorded by the task data"))
    return train_adapter(
        config.model, task, general, args, config.out, resume=resume, dtype=config.dtype, overwrite=overwrite,
        fold_adapters=config.fold_adapters, init_adapter=config.init_adapter, prompt_settings=prompt,
    )
