"""Loading any Hugging Face VLM (local folder or hub id) and choosing its LoRA targets.

The tiny default model and llava-interleave-qwen-7b go through the same code: only the
path, dtype and device differ.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ilora.errors import IloraError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}

# Submodule names that hold the parts of common VLMs (LLaVA, LLaVA-NeXT/OneVision, Qwen-VL...).
VISION_PARTS = ("vision_tower", "visual", "vision_model")
PROJECTOR_PARTS = ("multi_modal_projector", "mm_projector", "merger")
OUTPUT_HEADS = ("lm_head", "embed_out", "output_layer")


def _read_config(name_or_path: str | os.PathLike) -> dict | None:
    path = Path(name_or_path)
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise IloraError(f"{path}: no config.json, not a Hugging Face model folder")
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as err:
            raise IloraError(f"{cfg}: not valid JSON ({err})") from err
    if path.exists() or str(name_or_path).startswith((".", "/")):
        raise IloraError(f"{name_or_path}: model folder not found")
    return None  # a hub id: transformers resolves it (offline here, online for users)


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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    raw = _read_config(name_or_path)
    config = AutoConfig.from_pretrained(name_or_path)
    vlm = is_vlm_config(raw) if raw is not None else hasattr(config, "vision_config")
    cls = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(name_or_path, dtype=resolve_dtype(dtype))
    except (OSError, ValueError) as err:
        raise IloraError(f"{name_or_path}: cannot load model ({err})") from err
    return model.to(device).eval()


def load_vlm(name_or_path: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """A VLM and its processor, checked to agree on the image token.

    Returns:
        ``(model, processor)``.
    """
    from transformers import AutoProcessor

    raw = _read_config(name_or_path)
    if raw is not None and not is_vlm_config(raw):
        kind = raw.get("model_type", "unknown")
        raise IloraError(f"{name_or_path}: model_type {kind!r} has no vision part, not a vision-language model")
    model = load_model(name_or_path, dtype, device)
    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise IloraError(f"{name_or_path}: cannot load the processor ({err})") from err
    check_processor(model, processor, name_or_path)
    return model, processor


def load_vlm_merged(
    name_or_path: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    merged_state: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
):
    """A VLM with a PEFT adapter folded into its weights and/or a merged ΔW state added.

    Folding (``merge_and_unload``) computes the same function without per-layer adapter
    overhead at every forward, which is what playing and scoring want.

    Returns:
        ``(model, processor)``, the model in eval mode.
    """
    model, processor = load_vlm(name_or_path, dtype, device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    if merged_state is not None:
        from ilora.merge.export import apply_merged_state
        from ilora.merge.io import load_merged_state

        apply_merged_state(model, load_merged_state(merged_state))
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
