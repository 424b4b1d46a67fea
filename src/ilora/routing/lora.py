"""Attaching a LoRA adapter to a model (new or saved), with errors that say what is wrong."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ilora.errors import IloraError
from ilora.models.load import lora_target_modules


def _matches(name: str, target: str) -> bool:
    # PEFT's rule for a list of target modules: exact name or a dotted suffix.
    return name == target or name.endswith("." + target)


def linear_summary(model: nn.Module, limit: int = 12) -> str:
    """The ``nn.Linear`` modules of ``model``, grouped by their last name segment, for messages."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    leaves = sorted({n.split(".")[-1] for n in names})
    shown = ", ".join(leaves[:limit]) + (", ..." if len(leaves) > limit else "")
    return f"{len(names)} nn.Linear modules named {{{shown}}} (e.g. {names[0] if names else 'none'})"


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    parts: Sequence[str] = ("vision", "projector", "language"),
    seed: int = 0,
):
    """Wrap ``model`` in a trainable PEFT LoRA adapter named ``"default"`` (base weights frozen).

    Args:
        model: any Hugging Face model.
        r, alpha, dropout: LoRA rank, ``lora_alpha`` and dropout.
        target_modules: module names (exact or dotted suffix); ``None``: every ``nn.Linear``
            of ``parts`` except the LM head (``ilora.models.load.lora_target_modules``).
        parts: VLM parts used when ``target_modules`` is ``None``.
        seed: seed of the ``lora_A`` initialisation (``lora_B`` starts at zero).

    Raises:
        IloraError: when a target matches no module (the message lists what exists).
    """
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules) if target_modules else lora_target_modules(model, tuple(parts))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    unmatched = [t for t in targets if not any(_matches(n, t) for n in names)]
    if unmatched:
        raise IloraError(
            f"LoRA target module(s) {unmatched[:5]} match no nn.Linear of {type(model).__name__}; "
            f"it has {linear_summary(model)}"
        )
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, trainable: bool = False):
    """Load a saved PEFT adapter onto ``model``.

    Raises:
        IloraError: when the folder is not an adapter or its shapes/modules do not fit the model.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise IloraError(f"{adapter_dir}: no adapter_config.json, not a PEFT adapter folder")
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:300]
        raise IloraError(
            f"{adapter_dir}: adapter does not fit {type(model).__name__} ({first}); it has {linear_summary(model)}"
        ) from err
    _check_all_weights_loaded(peft_model, adapter_dir)
    return peft_model


def _check_all_weights_loaded(peft_model, adapter_dir: Path) -> None:
    # PEFT only warns when saved LoRA weights and the model's LoRA layers differ (suffix
    # matching can attach layers to the wrong modules); that would silently use B = 0.
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise IloraError(f"{adapter_dir}: no adapter_model.safetensors")
    with safe_open(str(weights), "pt") as f:
        saved = set(f.keys())
    expected = {n.replace(".default.", ".") for n, _ in peft_model.named_parameters() if "lora_" in n}
    missing, unused = sorted(expected - saved), sorted(saved - expected)
    if missing or unused:
        example = (missing or unused)[0]
        raise IloraError(
            f"{adapter_dir}: adapter does not fit {type(peft_model.get_base_model()).__name__}: "
            f"{len(missing)} LoRA weights missing, {len(unused)} saved weights unused (e.g. {example})"
        )


class AdapterSwitch:
    """Turns the adapter of a PEFT model off for a no-grad forward, cheaply (the KL's base pass).

    ``PeftModel.disable_adapter()`` scans the whole model for its adapter status and sets
    ``requires_grad`` of every adapter weight off on entry and on again on exit: 3.5 ms per
    use on the tiny VLM and 10 ms on a 15M one, a tenth of a training step. Under
    ``torch.no_grad`` only the per-layer "adapters disabled" flag matters, so this flips that
    flag on the tuner layers found once, and restores it. It falls back to PEFT's own context
    with gradients enabled, with merged weights, with auxiliary wrappers
    (``modules_to_save``) or when the layers lack the flag (another PEFT version).

    Args:
        peft_model: the ``PeftModel`` (not a DDP wrapper of it).
    """

    def __init__(self, peft_model: nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.peft_model = peft_model
        self.layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
        flag = getattr(BaseTunerLayer, "disable_adapters", None)
        auxiliary = [m for m in peft_model.modules() if type(m).__name__.endswith(("ModulesToSaveWrapper", "TrainableTokensWrapper"))]
        self._fast = (
            isinstance(flag, property)
            and not auxiliary
            and all(isinstance(getattr(m, "_disable_adapters", None), bool) for m in self.layers)
        )

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """A block in which every forward of the model is the base model's."""
        if not self._fast or torch.is_grad_enabled() or any(m.merged for m in self.layers):
            with self.peft_model.disable_adapter():
                yield
            return
        previous = [m._disable_adapters for m in self.layers]
        try:
            for m in self.layers:
                m.__dict__["_disable_adapters"] = True  # a plain attribute: skip nn.Module.__setattr__
            yield
        finally:
            for m, was in zip(self.layers, previous):
                m.__dict__["_disable_adapters"] = was
