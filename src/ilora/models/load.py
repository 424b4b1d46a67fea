"""Loading any Hugging Face VLM (local folder, ``builtin`` or a cached hub id) and choosing its LoRA targets.

The tiny default model and llava-interleave-qwen-7b go through the same code: only the
path, dtype and device differ. Every command resolves its model names here
(``resolve_model_path``), so a missing model is one line naming it and nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ilora.errors import IloraError, first_line
from ilora.models.adapter import check_lora_adapter, check_modules_fit

# The model name that means the pretrained tiny base shipped with the package.
BUILTIN_BASE = "builtin"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}

# Submodule names that hold the parts of common VLMs (LLaVA, LLaVA-NeXT/OneVision, Qwen-VL...).
VISION_PARTS = ("vision_tower", "visual", "vision_model")
PROJECTOR_PARTS = ("multi_modal_projector", "mm_projector", "merger")
OUTPUT_HEADS = ("lm_head", "embed_out", "output_layer")


def builtin_base() -> Path:
    """The shipped pretrained tiny base model (see its README for how it was made)."""
    return Path(__file__).resolve().parent.parent / "assets" / "tiny-base"


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """The model to load: ``builtin`` (the shipped base), a local path, or a hub id already in the local cache.

    Nothing is downloaded: a name that is neither here nor cached is refused in one line
    (before, ``models/tiny`` without ``./`` was taken for a hub id and failed in the network code).
    """
    name = str(name_or_path)
    if name == BUILTIN_BASE:
        return str(builtin_base())
    if Path(name).exists() or _in_hub_cache(name):
        return name
    raise IloraError(
        f"{name}: no such model folder, and not a model id in the local Hugging Face cache "
        f"(nothing is downloaded; '{BUILTIN_BASE}' is the shipped tiny base)"
    )


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except HFValidationError:  # not even shaped like a hub id
        return False


def _read_config(path: str) -> dict | None:
    """The ``config.json`` of a resolved model folder; ``None`` for a cached hub id."""
    folder = Path(path)
    if not folder.exists():
        return None
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise IloraError(f"{folder}: no config.json, not a Hugging Face model folder")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as err:
        raise IloraError(f"{cfg}: not valid JSON ({err})") from err


def _model_class(path: str):
    """The config and the Auto class for a resolved model: image-text-to-text when it has a vision part."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
    )

    raw = _read_config(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise IloraError(f"{path}: cannot read the model config ({first_line(err)})") from err
    vlm = is_vlm_config(raw) if raw is not None else hasattr(config, "vision_config")
    return config, AutoModelForImageTextToText if vlm else AutoModelForCausalLM


def model_weight_shapes(name_or_path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a model, built on the meta device from its config (no weights read)."""
    path = resolve_model_path(name_or_path)
    config, cls = _model_class(path)
    with torch.device("meta"):
        model = cls.from_config(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}


def is_vlm_config(config: dict) -> bool:
    return "vision_config" in config or "visual" in config or "vision_tower" in config


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise IloraError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str = "cpu") -> nn.Module:
    """Any HF model: an image-text-to-text VLM when its config has a vision part, else a causal LM."""
    path = resolve_model_path(name_or_path)
    _, cls = _model_class(path)
    try:
        model = cls.from_pretrained(path, dtype=resolve_dtype(dtype))
    except (OSError, ValueError) as err:
        raise IloraError(f"{path}: cannot load model ({first_line(err)})") from err
    return model.to(device).eval()


def load_vlm(name_or_path: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """A VLM and its processor, checked to agree on the image token.

    Returns:
        ``(model, processor)``.
    """
    from transformers import AutoProcessor

    path = resolve_model_path(name_or_path)
    raw = _read_config(path)
    if raw is not None and not is_vlm_config(raw):
        kind = raw.get("model_type", "unknown")
        raise IloraError(f"{path}: model_type {kind!r} has no vision part, not a vision-language model")
    model = load_model(path, dtype, device)
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise IloraError(f"{path}: cannot load the processor ({first_line(err)})") from err
    check_processor(model, processor, path)
    return model, processor


def load_vlm_with_adapter(
    name_or_path: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
):
    """A VLM with a PEFT adapter folded into its weights (``adapter=None``: the VLM alone).

    Folding (``merge_and_unload``) computes the same function without per-layer adapter
    overhead at every forward, which is what playing and scoring want. The adapter is
    checked first (config, finite weights, modules and shapes of this base), as ``ilora merge`` does.
    A merged state is added by :func:`ilora.merge.export.load_vlm_merged`.

    Returns:
        ``(model, processor)``, the model in eval mode.
    """
    if adapter is not None:
        check_modules_fit(check_lora_adapter(adapter), model_weight_shapes(name_or_path), adapter, name_or_path)
    model, processor = load_vlm(name_or_path, dtype, device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.eval(), processor


def image_token_id(config) -> int | None:
    """The image placeholder id of a VLM config (``None`` for text-only models)."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def check_processor(model: nn.Module, processor, where: str | os.PathLike = "model") -> None:
    """Refuse a processor whose image token is not the one the model expects."""
    token = getattr(processor, "image_token", None)
    token_id = image_token_id(model.config)
    if token is None or token_id is None:
        raise IloraError(f"{where}: processor or model has no image token; not a vision-language pair")
    got = processor.tokenizer.convert_tokens_to_ids(token)
    if got != token_id:
        raise IloraError(
            f"{where}: processor image token {token!r} has id {got} but the model expects id {token_id}"
        )


def module_part(name: str) -> str:
    """Which part of a VLM a module belongs to: ``"vision"``, ``"projector"`` or ``"language"``."""
    segments = set(name.split("."))
    if segments & set(VISION_PARTS):
        return "vision"
    if segments & set(PROJECTOR_PARTS):
        return "projector"
    return "language"


def lora_target_modules(model: nn.Module, parts: tuple[str, ...] = ("vision", "projector", "language")) -> list[str]:
    """Names of every ``nn.Linear`` in the chosen parts (the SPEC default: all three), never the LM head.

    Args:
        model: a VLM (or causal LM: then only ``"language"`` matches anything).
        parts: any of ``"vision"``, ``"projector"``, ``"language"``.

    Returns:
        Full module names, usable as PEFT ``target_modules`` (exact-name matching).
    """
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.split(".")[-1] in OUTPUT_HEADS:
            continue
        if module_part(name) in parts:
            names.append(name)
    if not names:
        raise IloraError(f"{type(model).__name__}: no nn.Linear found in parts {parts}")
    return names
