"""Reading and checking PEFT LoRA adapter folders without loading a model.

``ilora merge`` (through ``ilora.merge.io.LoraAdapter``) and every command that applies an
adapter to a model (play, eval) check adapters with these functions, so a bad adapter gets
the same one-line ``IloraError`` naming the file everywhere. Only plain ``nn.Linear`` LoRA
(``ΔW = s·B@A``) is accepted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ilora.errors import IloraError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_ADAPTER_WEIGHTS = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# LoraConfig keys that make a module something other than plain ``s·B@A`` on ``W``
# (or that train extra full weights). Any truthy value is refused.
UNSUPPORTED_LORA_OPTIONS = (
    "use_dora",
    "lora_bias",
    "use_qalora",
    "use_bdlora",
    "fan_in_fan_out",
    "layer_replication",
    "target_parameters",
    "alora_invocation_tokens",
    "arrow_config",
    "modules_to_save",
    "trainable_token_indices",
    "kasa_config",
    "monteclora_config",
    "velora_config",
)
# Initialisations that also rewrite the base weights, so the adapter is not a delta on W.
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq")


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IloraError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise IloraError(f"{path}: expected a JSON object")
    return data


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the file's header (no tensor is read)."""
    if not path.is_file():
        raise IloraError(f"{path}: missing safetensors file")
    try:
        with safe_open(path, "pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise IloraError(f"{path}: corrupt safetensors file ({err})") from err


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor as float32, refused unless floating point and finite."""
    try:
        with safe_open(path, "pt") as fh:
            tensor = fh.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise IloraError(f"{path}: cannot read tensor {key!r} ({err})") from err
    if not tensor.is_floating_point():
        raise IloraError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, expected floating point")
    tensor = tensor.float()  # bf16/fp16 adapters: the maths is float32
    if not bool(torch.isfinite(tensor).all()):
        raise IloraError(f"{path}: tensor {key!r} contains NaN or Inf")
    return tensor


def read_lora_config(folder: Path) -> dict:
    """``adapter_config.json`` of a plain LoRA adapter; other PEFT types and LoRA variants are refused."""
    where = folder / ADAPTER_CONFIG
    config = read_json_object(where)
    if config.get("peft_type", "LORA") != "LORA":
        raise IloraError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA")
    for key in UNSUPPORTED_LORA_OPTIONS:
        if config.get(key):
            raise IloraError(f"{where}: {key}={config[key]!r} is not a plain s·B@A LoRA; refusing it")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
        raise IloraError(f"{where}: init_lora_weights={init!r} rewrites the base weights; convert it to plain LoRA first")
    return config


def lora_weights_file(folder: Path) -> Path:
    """The adapter's safetensors file; a folder with only PEFT's pickled ``.bin`` is told so."""
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file() and (folder / PICKLED_ADAPTER_WEIGHTS).is_file():
        raise IloraError(
            f"{folder / PICKLED_ADAPTER_WEIGHTS}: pickled .bin adapter weights are not read (unpickling can run code); "
            f"re-save the adapter with save_pretrained(..., safe_serialization=True) to get {ADAPTER_WEIGHTS}"
        )
    return weights


def lora_module_shapes(weights_file: Path) -> dict[str, tuple[int, int, int]]:
    """Module name -> ``(out, in, rank)`` from the tensor names and shapes of an adapter's weights."""
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in safetensors_shapes(weights_file).items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.endswith(suffix):
                module = key[: -len(suffix)].removeprefix(PEFT_PREFIX)
                pairs.setdefault(module, {})[part] = shape
                break
        else:
            raise IloraError(f"{weights_file}: tensor {key!r} is not a plain LoRA A/B weight; refusing it")
    shapes = {}
    for module, parts in sorted(pairs.items()):
        a, b = parts.get("lora_A"), parts.get("lora_B")
        if a is None or b is None:
            raise IloraError(f"{weights_file}: module {module!r} lacks lora_{'A' if a is None else 'B'}")
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise IloraError(f"{weights_file}: module {module!r} has A {a} and B {b}, not a linear LoRA pair")
        shapes[module] = (b[0], a[1], a[0])
    if not shapes:
        raise IloraError(f"{weights_file}: no LoRA modules found")
    return shapes


def check_lora_adapter(folder: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Check what can be checked of an adapter folder without a model: config, tensor names, shapes, finite values.

    Returns:
        Module name -> ``(out, in)`` of the base weight it changes (see ``check_modules_fit``).
    """
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise IloraError(f"{folder}: no {ADAPTER_CONFIG}, not a PEFT adapter folder")
    read_lora_config(folder)
    weights = lora_weights_file(folder)
    shapes = lora_module_shapes(weights)
    for key in safetensors_shapes(weights):
        read_tensor(weights, key)
    return {module: (out, inp) for module, (out, inp, _) in shapes.items()}


def check_modules_fit(
    modules: Mapping[str, tuple[int, int]], weight_shapes: Mapping[str, tuple[int, ...]], where: str | os.PathLike,
    base: str | os.PathLike,
) -> None:
    """Refuse modules whose ``<module>.weight`` is missing from the base model or has another shape.

    Args:
        modules: module name -> ``(out, in)``, from an adapter or merged state at ``where``.
        weight_shapes: the base model's parameter name -> shape (``ilora.models.load.model_weight_shapes``).
        where: the adapter or merged state, named in the error.
        base: the base model, named in the error.
    """
    for module, shape in modules.items():
        found = weight_shapes.get(f"{module}.weight")
        if found is None:
            raise IloraError(f"{where}: module {module!r} is not in the base model {base} (an adapter of another model?)")
        if tuple(found) != tuple(shape):
            raise IloraError(f"{where}: module {module!r} has shape {tuple(shape)} but {tuple(found)} in the base model {base}")
