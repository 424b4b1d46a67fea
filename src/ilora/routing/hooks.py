"""Capturing LoRA-B outputs with forward hooks (for ``L_norm`` and the activation analysis).

One hook per LoRA layer sits on its ``lora_B`` module; it only records while a
``LoraOutputRecorder.record(...)`` block is open, so other forwards (task rows, the
adapter-disabled base pass, activation-checkpoint recomputation) cost nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ilora.errors import IloraError
from ilora.models.load import module_part
from ilora.routing.losses import lora_b_squared_norm, lora_norm_loss


@dataclass
class LoraLayerRef:
    """One LoRA layer: its module name in the base model, VLM part and the LoRA layer object."""

    name: str
    part: str
    layer: nn.Module

    def scaling(self, adapter: str) -> float:
        return float(self.layer.scaling[adapter])


def find_lora_layers(model: nn.Module, adapter: str = "default") -> list[LoraLayerRef]:
    """Every PEFT LoRA layer of ``model`` that holds ``adapter``, in module order.

    Raises:
        IloraError: when the model has no LoRA layer for ``adapter``.
    """
    from peft.tuners.lora import LoraLayer

    refs = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_B:
            short = name.removeprefix("base_model.model.")
            refs.append(LoraLayerRef(short, module_part(short), module))
    if not refs:
        raise IloraError(f"{type(model).__name__}: no LoRA layers with adapter {adapter!r}")
    return refs


class LoraOutputRecorder:
    """Per-layer sums of ``‖scaling · lora_B(x)‖²`` over the positions of a recorded forward.

    Language-model layers count the positions where the recorded batch's attention mask is
    1; vision-tower and projector layers count every position (image patches, never padded).

    Args:
        model: a PEFT-wrapped model.
        adapter: the adapter whose outputs are recorded.
        keep_outputs: names of layers whose raw (scaled, detached) outputs are also kept, for
            plotting.
    """

    def __init__(self, model: nn.Module, adapter: str = "default", keep_outputs: tuple[str, ...] = ()):
        self.adapter = adapter
        self.layers = find_lora_layers(model, adapter)
        unknown = sorted(set(keep_outputs) - {r.name for r in self.layers})
        if unknown:
            raise IloraError(f"layers {unknown} are not LoRA layers; known: {[r.name for r in self.layers][:8]}...")
        self.keep_outputs = set(keep_outputs)
        self._mask: torch.Tensor | None = None
        self._mask_count = 0
        self._active = False
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self._handles = [ref.layer.lora_B[adapter].register_forward_hook(self._hook_for(ref)) for ref in self.layers]

    def _hook_for(self, ref: LoraLayerRef):
        def hook(module, args, output):
            if not self._active:
                return
            mask, count = None, output.shape[:-1].numel()
            if ref.part == "language" and self._mask is not None and output.shape[:-1] == self._mask.shape:
                mask, count = self._mask, self._mask_count
            scaling = ref.scaling(self.adapter)
            if module.bias is None:
                total = lora_b_squared_norm(args[0], module.weight, scaling, mask)
            else:
                per_position = (output * scaling).pow(2).sum(-1, dtype=torch.float32)
                total = (per_position * mask if mask is not None else per_position).sum()
            self.sums[ref.name] = self.sums[ref.name] + total if ref.name in self.sums else total
            self.counts[ref.name] = self.counts.get(ref.name, 0) + count
            if ref.name in self.keep_outputs:
                kept = output.detach().float() * scaling
                self.outputs.setdefault(ref.name, []).append(kept[mask.bool()] if mask is not None else kept.flatten(0, -2))

        return hook

    @contextlib.contextmanager
    def record(self, attention_mask: torch.Tensor | None) -> Iterator[LoraOutputRecorder]:
        """Record the forwards inside the block; previous records are cleared on entry."""
        self.sums, self.counts, self.outputs = {}, {}, {}
        self._mask = attention_mask.float() if attention_mask is not None else None
        self._mask_count = int(attention_mask.sum()) if attention_mask is not None else 0  # one sync per record
        self._active = True
        try:
            yield self
        finally:
            self._active = False
            self._mask = None

    def norm_loss(self) -> torch.Tensor:
        """``L_norm`` of the last recorded block (see ``losses.lora_norm_loss``)."""
        names = list(self.sums)
        return lora_norm_loss([self.sums[n] for n in names], [self.counts[n] for n in names])

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
