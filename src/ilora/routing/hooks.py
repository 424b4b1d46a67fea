"""Capturing LoRA-B outputs with forward hooks (for ``L_norm`` and the activation analysis).

One hook per LoRA layer sits on its ``lora_B`` module; it only records while a
``LoraOutputRecorder.record(...)`` block is open, so other forwards (the adapter-disabled
base pass, activation-checkpoint recomputation) cost nothing. A recorded forward may mix
rows that count with rows that do not: a per-row mask covers their tokens and their images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ilora.errors import IloraError
from ilora.models.load import module_part
from ilora.routing.losses import lora_b_squared_norms


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


@dataclass
class _Selection:
    """The recorded positions of one kind of layer output: language tokens, or image patches.

    ``index`` keeps slices along the output's first dimension (rows, or images; ``None``: all
    of them) and ``mask`` is the 0/1 float ``[K·T, 1]`` over the kept slices' positions
    (``None``: every position). ``count`` is the number of recorded tokens, or of kept images.
    ``full`` builds the 0/1 mask over every position of an output (biased layers, kept outputs).
    """

    index: torch.Tensor | None
    mask: torch.Tensor | None
    count: int
    n_slices: int
    device: torch.device | None = None
    attention_mask: torch.Tensor | None = None
    _full: torch.Tensor | None = None

    def full(self, shape: torch.Size) -> torch.Tensor:
        if self._full is None:
            keep = torch.ones(self.n_slices, device=self.device)
            if self.index is not None:
                keep = torch.zeros_like(keep).index_fill_(0, self.index, 1.0)
            self._full = keep if self.attention_mask is None else self.attention_mask.float() * keep[:, None]
        full = self._full
        return full if full.shape == shape else full.view(-1, *([1] * (len(shape) - 1))).expand(shape)


class LoraOutputRecorder:
    """Per-layer sums of ``‖scaling · lora_B(x)‖²`` over the positions of a recorded forward.

    Language-model layers count the positions where the recorded batch's attention mask is
    1; vision-tower and projector layers count every position of every image (image patches,
    never padded). With ``rows`` given, only those rows count: their tokens in language
    layers and, through ``n_images``, their own images in vision and projector layers (the
    images of a batch are concatenated in row order, so one recorded forward may hold task
    and general rows together).

    The hooks only keep references to each layer's LoRA-A output and lora_B weight; when the
    block ends the squared norms are computed in Gram form (``losses.lora_b_squared_norms``)
    on the recorded rows/images only, one batched computation per group of layers with the
    same shapes. ``sums`` and ``counts`` (per layer name) are complete from then on;
    ``units`` counts the recorded tokens (language layers) or images (vision and projector
    layers) behind each layer's positions.

    Args:
        model: a PEFT-wrapped model.
        adapter: the adapter whose outputs are recorded.
        keep_outputs: names of layers whose raw (scaled, detached) outputs are also kept, for
            plotting.
    """

    max_group_elements = 2**25  # LoRA-A output elements stacked at once when the block ends

    def __init__(self, model: nn.Module, adapter: str = "default", keep_outputs: tuple[str, ...] = ()):
        self.adapter = adapter
        self.layers = find_lora_layers(model, adapter)
        unknown = sorted(set(keep_outputs) - {r.name for r in self.layers})
        if unknown:
            raise IloraError(f"layers {unknown} are not LoRA layers; known: {[r.name for r in self.layers][:8]}...")
        self.keep_outputs = set(keep_outputs)
        self._tokens: _Selection | None = None
        self._images: _Selection | None = None
        self._rows_selected = False
        self._active = False
        self._pending: list[tuple] = []
        self._groups: list[tuple[list[str], torch.Tensor]] = []  # (layer names, their scaled sums)
        self._squared_scalings: dict[tuple, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.units: dict[str, int] = {}
        self._counts_images = {ref.name: ref.part != "language" for ref in self.layers}
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self._handles = [ref.layer.lora_B[adapter].register_forward_hook(self._hook_for(ref)) for ref in self.layers]

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        """Per layer, the recorded sum of ``‖scaling · lora_B(x)‖²`` (float32 scalars)."""
        sums: dict[str, torch.Tensor] = {}
        for names, totals in self._groups:
            for name, total in zip(names, totals.unbind(0)):
                sums[name] = sums[name] + total if name in sums else total
        return sums

    def _positions(self, ref: LoraLayerRef, output: torch.Tensor) -> tuple[_Selection | None, int, int]:
        """The recorded positions of this layer's output (``None``: every position), their count, and
        the tokens or images they belong to (each first-dimension slice of a vision output is one image)."""
        shape = output.shape[:-1]
        if ref.part == "language":
            tokens = self._tokens
            if tokens is not None and shape == tokens.attention_mask.shape:
                return tokens, tokens.count, tokens.count
            if self._rows_selected:
                raise IloraError(
                    f"{ref.name}: LoRA-B output of shape {tuple(output.shape)} does not match the batch's "
                    f"tokens {tuple(tokens.attention_mask.shape)}; cannot tell which rows its positions belong to"
                )
            return None, shape.numel(), shape.numel()
        images = self._images
        if images is None:
            if self._rows_selected:
                raise IloraError(f"{ref.name}: recording selected rows of a batch with images needs n_images")
            return None, shape.numel(), shape[0] if len(shape) else 1
        if len(shape) < 1 or shape[0] != images.n_slices:
            raise IloraError(
                f"{ref.name}: LoRA-B output of shape {tuple(output.shape)} is not one slice per image "
                f"({images.n_slices} images); cannot tell which rows its positions belong to"
            )
        return images, images.count * shape[1:].numel(), images.count

    def _hook_for(self, ref: LoraLayerRef):
        name = ref.name

        def hook(module, args, output):
            if not self._active:
                return
            selection, count, units = self._positions(ref, output)
            self.counts[name] = self.counts.get(name, 0) + count
            self.units[name] = self.units.get(name, 0) + units
            scaling = ref.scaling(self.adapter)
            if module.bias is None:
                # Computed when the block ends, batched with the layers of the same shape.
                self._pending.append((name, args[0], module.weight, selection, scaling))
            else:
                per_position = (output * scaling).pow(2).sum(-1, dtype=torch.float32)
                if selection is not None:
                    per_position = per_position * selection.full(output.shape[:-1])
                self._groups.append(([name], per_position.sum().reshape(1)))
            if name in self.keep_outputs:
                kept = output.detach().float() * scaling
                kept = kept[selection.full(output.shape[:-1]).bool()] if selection is not None else kept.flatten(0, -2)
                self.outputs.setdefault(name, []).append(kept)

        return hook

    def _flush(self) -> None:
        """Squared-norm sums of the pending layers: one Gram-form computation per group of layers
        whose inputs share a shape and a selection, in groups of bounded size."""
        groups: dict[tuple, list] = {}
        for entry in self._pending:
            _, h, _, selection, _ = entry
            key = (h.shape, h.dtype, h.device, id(selection))
            groups.setdefault(key, []).append(entry)
        self._pending = []
        for entries in groups.values():
            entries.sort(key=lambda e: (tuple(e[2].shape), str(e[2].dtype)))  # same-shaped weights batch together
            h, selection = entries[0][1], entries[0][3]
            index, mask = (selection.index, selection.mask) if selection is not None else (None, None)
            step = max(1, self.max_group_elements // max(h.numel(), 1))
            for start in range(0, len(entries), step):
                part = entries[start : start + step]
                norms = lora_b_squared_norms([e[1] for e in part], [e[2] for e in part], mask, index)
                squares = tuple(e[4] ** 2 for e in part)
                if len(set(squares)) == 1:  # the usual case: one alpha / r for every layer
                    scaled = norms * squares[0]
                else:
                    key = (squares, h.device)
                    if key not in self._squared_scalings:
                        self._squared_scalings[key] = torch.tensor(squares, dtype=torch.float32, device=h.device)
                    scaled = norms * self._squared_scalings[key]
                self._groups.append(([e[0] for e in part], scaled))

    @contextlib.contextmanager
    def record(
        self,
        attention_mask: torch.Tensor | None,
        rows: torch.Tensor | None = None,
        n_images: torch.Tensor | None = None,
        keep_previous: bool = False,
    ) -> Iterator[LoraOutputRecorder]:
        """Record the forwards inside the block; previous records are cleared on entry unless
        ``keep_previous`` (then sums, counts and ``norm_loss`` cover this block and the earlier ones:
        one batch run in several forwards).

        Args:
            attention_mask: ``[B, T]`` of the recorded batch (``None``: count every position).
            rows: bool ``[B]``, the rows to record (``None``: all of them).
            n_images: long ``[B]``, images per row; needed with ``rows`` when the batch has images.
            keep_previous: add to the previous blocks' records instead of clearing them.
        """
        if not keep_previous:
            self._groups, self.counts, self.units, self.outputs = [], {}, {}, {}
        self._tokens = self._images = None
        if rows is None:
            if attention_mask is not None:
                count = int(attention_mask.sum())  # one sync per record
                mask = attention_mask.float().reshape(-1, 1)
                self._tokens = _Selection(
                    None, mask, count, attention_mask.shape[0], attention_mask.device, attention_mask=attention_mask
                )
        else:
            if attention_mask is None:
                raise IloraError("recording selected rows needs the batch's attention_mask")
            self._tokens, self._images = self._select(attention_mask, rows, n_images)
        self._rows_selected = rows is not None
        self._pending = []
        self._active = True
        try:
            yield self
            self._active = False
            self._flush()
        finally:
            self._active = False
            self._pending = []
            self._tokens = self._images = None
            self._rows_selected = False

    @staticmethod
    def _select(attention_mask: torch.Tensor, rows: torch.Tensor, n_images: torch.Tensor | None):
        """Selections of the chosen rows' tokens and of their images, from one host sync."""
        device = attention_mask.device
        per_row = [rows.to(device, torch.long), attention_mask.sum(1)]
        if n_images is not None:
            per_row.append(n_images.to(device))
        host = torch.stack(per_row).tolist()
        chosen = [i for i, keep in enumerate(host[0]) if keep]
        everything = len(chosen) == len(host[0])
        index = None if everything else torch.tensor(chosen, dtype=torch.long, device=device)
        kept_mask = attention_mask if everything else attention_mask.index_select(0, index)
        n_tokens = sum(host[1][i] for i in chosen)
        tokens = _Selection(
            index, kept_mask.float().reshape(-1, 1), n_tokens, len(host[0]), device, attention_mask=attention_mask
        )
        if n_images is None:
            return tokens, None
        counts = host[2]
        starts = [0]
        for c in counts[:-1]:
            starts.append(starts[-1] + c)
        kept = [starts[i] + j for i in chosen for j in range(counts[i])]
        total = sum(counts)
        image_index = None if len(kept) == total else torch.tensor(kept, dtype=torch.long, device=device)
        return tokens, _Selection(image_index, None, len(kept), total, device)

    def norm_loss(self, batch_units: torch.Tensor | None = None) -> torch.Tensor:
        """``L_norm`` of the last recorded block: per layer the mean over its recorded positions,
        summed over layers (as ``losses.lora_norm_loss``, one division per group of layers).

        Args:
            batch_units: float ``[2]``, the tokens and the images of a larger batch the recorded
                rows are part of (the general rows of every micro-batch of one optimiser step),
                each >= 1. Each layer's sum is then divided by its positions in that batch instead:
                the tokens for a language layer, the images times its positions per image for a
                vision or projector layer, so that the parts' losses add up to the batch's
                ``L_norm``. The rows must have been recorded with their ``n_images``.
        """
        terms = []
        for names, totals in self._groups:
            # A layer with no position has a zero sum: any divisor >= 1 will do.
            if batch_units is None:
                divisors = [(max(self.counts[n], 1), 0) for n in names]
            else:  # (positions per token or image, index in batch_units)
                divisors = [
                    (max(self.counts[n], 1) / max(self.units[n], 1), int(self._counts_images[n])) for n in names
                ]
            if len(set(divisors)) == 1:  # layers of a group share their positions: no host-to-device copy
                per_unit, unit = divisors[0]
                terms.append(totals.sum() / (per_unit if batch_units is None else per_unit * batch_units[unit]))
            else:
                divisor = torch.tensor([d[0] for d in divisors], dtype=torch.float32, device=totals.device)
                if batch_units is not None:
                    divisor = divisor * batch_units[[d[1] for d in divisors]]
                terms.append((totals / divisor).sum())
        if not terms:
            return torch.zeros(())
        return terms[0] if len(terms) == 1 else torch.stack(terms).sum()

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
