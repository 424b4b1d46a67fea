"""Routing tuning as a ``transformers.Trainer``: task rows learn, general rows keep the adapter silent.

Per optimiser step (SPEC §1):

- task rows: ``L_lm``, next-token cross-entropy on their labels;
- general rows: ``L_kl = KL(p_base ‖ p_lora)`` at their target tokens, ``p_base`` from the same
  PEFT model under ``disable_adapter()`` without gradient, and ``L_norm``, the per-layer mean
  of ``‖lora_B output‖²`` over their positions (image patches included), summed over layers;
- ``loss = eps_lm·L_lm + eps_kl·L_kl + eps_norm·L_norm``.

Each term is a mean over the whole accumulated batch: a micro-batch adds its sum divided by
that term's count over every micro-batch of the step on every process (``TermCounts``, as the
Trainer does with ``num_items_in_batch``), so batch size × accumulation steps × processes
never changes the update, even where a micro-batch lacks a route.

A step is one forward of the adapted model over all rows (as plain LoRA does), with the
forward hook on every ``lora_B`` recording under a per-row mask that covers the general
rows' tokens and their own images, plus one no-grad forward of the base (adapter disabled)
on the general rows only. When rows differ enough in length (Atari prompts beside short
general questions), the rows run instead in groups of one route and one prompt text before
their images, each trimmed to its own length, and each task group runs that shared prefix
(a game's rules and actions) once (``routing.prefix``); the loss and its gradients are the
same. Logits are only computed at target positions (``logits_to_keep``); the KL runs in
float32 chunks, the norm in low-rank Gram form.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass

import torch
from transformers import Trainer, TrainingArguments

from ilora.config import field
from ilora.errors import IloraError
from ilora.models.cache import cache_argument
from ilora.models.inputs import IGNORE_INDEX
from ilora.models.load import image_token_id
from ilora.routing.collator import RoutingCollator, route_counts, select_rows
from ilora.routing.hooks import LoraOutputRecorder
from ilora.routing.lora import AdapterSwitch, apply_lora
from ilora.routing.losses import causal_lm_loss, kl_base_lora, target_counts, target_positions
from ilora.routing.prefix import forward_with_shared_prefix, plan_forwards, shared_prefix_length

logger = logging.getLogger(__name__)

TERMS = ("lm", "kl", "norm")


@dataclass
class TermCounts:
    """What each loss term of one optimiser step is divided by: its items in every micro-batch
    of the step, on every process the counts were summed over.

    Attributes:
        lm: task rows' target tokens (``L_lm``).
        kl: general rows' target tokens (``L_kl``).
        norm_units: float ``[2]``, general rows' tokens and images, each >= 1 (``L_norm``:
            language layers count tokens, vision and projector layers the patches of images).
        processes: the processes summed over; DDP averages gradients over them, so each
            process's loss is multiplied by it.

    A count that is ``None`` leaves its term a mean over the micro-batch's own items.
    """

    lm: torch.Tensor | None
    kl: torch.Tensor | None
    norm_units: torch.Tensor | None
    processes: int = 1


@dataclass
class RoutingConfig(TrainingArguments):
    """``TrainingArguments`` plus the routing-loss weights and the LoRA settings."""

    eps_lm: float = field(1.0, help="weight of the LM loss on task rows (SPEC ε1)")
    eps_kl: float = field(0.01, help="weight of KL(p_base || p_lora) on general rows' target tokens (SPEC ε2)")
    eps_norm: float = field(2.0, help="weight of the summed per-layer mean squared LoRA-B output norm on general rows (SPEC ε3)")
    share_prompt_prefix: bool = field(
        True, help="run task rows' shared prompt prefix (a game's rules) once, and, where it saves padding, a "
        "micro-batch's rows in groups of one route and one prompt text; same loss, checked against the full "
        "forward on the first batch"
    )
    kl_chunk_size: int = field(1024, help="target positions per float32 KL chunk (bounds memory with large vocabularies)")
    lora_r: int = field(128, help="LoRA rank")
    lora_alpha: float = field(256.0, help="LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = field(0.05, help="dropout on the LoRA branch input")
    lora_target_modules: list[str] | None = field(
        None, help="module names (exact or dotted suffix); default: every nn.Linear of lora_parts except the LM head"
    )
    lora_parts: list[str] = field(
        default_factory=lambda: ["vision", "projector", "language"], help="VLM parts LoRA goes on by default"
    )
    # Defaults that differ from TrainingArguments: rows carry images and routes, not model kwargs.
    num_train_epochs: float = field(5.0, help="training epochs (SPEC default for real models: 5)")
    remove_unused_columns: bool = field(False, help="keep the row columns; the routing collator encodes them")
    report_to: str | list[str] = field("none", help="integrations to report to (none by default)")
    logging_steps: float = field(10, help="log the loss terms every N optimiser steps")
    # Buffers are never trained here, so DDP's per-forward broadcast of them is wasted work.
    ddp_broadcast_buffers: bool | None = field(False, help="DDP buffer broadcast per forward (off: forwards per rank vary)")
    ddp_find_unused_parameters: bool | None = field(False, help="every LoRA parameter is used in every step")

    def __post_init__(self):
        super().__post_init__()
        for name in ("eps_lm", "eps_kl", "eps_norm"):
            if getattr(self, name) < 0:
                raise IloraError(f"{name} = {getattr(self, name)}: loss weights must be >= 0")
        if self.kl_chunk_size < 1:
            raise IloraError(f"kl_chunk_size = {self.kl_chunk_size}: must be >= 1")
        if self.activation_checkpointing and self.eps_norm > 0:
            # L_norm's gradient runs through the LoRA outputs recorded in the first forward; a
            # reentrant checkpoint runs that forward without a graph, so most of it would be lost.
            kwargs = dict(self.activation_checkpointing_kwargs or {})
            if kwargs.setdefault("use_reentrant", False):
                raise IloraError(
                    "activation_checkpointing_kwargs use_reentrant=True drops L_norm's gradient (eps_norm > 0); "
                    "use use_reentrant=False"
                )
            self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs = kwargs

    @property
    def routes_general(self) -> bool:
        """Whether general rows get any loss (plain LoRA when not)."""
        return self.eps_kl > 0 or self.eps_norm > 0


def check_routes(dataset, args: RoutingConfig) -> None:
    """Refuse data that cannot be trained with these weights.

    Raises:
        IloraError: no task rows; no general rows while ``eps_kl``/``eps_norm`` > 0 (never
            silently plain LoRA); general rows that would get no loss at all.
    """
    counts = route_counts(dataset)
    if counts["task"] == 0:
        raise IloraError("the training data has no task rows (route 'task')")
    if args.routes_general and counts["general"] == 0:
        raise IloraError(
            f"eps_kl = {args.eps_kl}, eps_norm = {args.eps_norm} but the training data has no general rows; "
            "add general data, or set eps_kl = eps_norm = 0 for plain LoRA"
        )
    if not args.routes_general and counts["general"] > 0:
        raise IloraError(
            f"{counts['general']} general rows would get no loss with eps_kl = eps_norm = 0; "
            "drop them (plain LoRA) or give them a weight"
        )


class RoutingTrainer(Trainer):
    """A ``Trainer`` whose loss routes task rows to ``L_lm`` and general rows to ``L_kl`` + ``L_norm``.

    Args:
        model: a PEFT model with a LoRA adapter ``"default"``, or a plain model (wrapped here
            with ``args``' LoRA settings).
        args: ``RoutingConfig``.
        train_dataset: rows with a ``route`` (see ``collator.mix_sources``).
        processing_class: the processor (VLM) or tokenizer; used by the default collator.
        **kwargs: passed to ``Trainer``.
    """

    def __init__(self, model=None, args: RoutingConfig | None = None, train_dataset=None, processing_class=None, **kwargs):
        from peft import PeftModel

        if not isinstance(args, RoutingConfig):
            raise IloraError(f"RoutingTrainer needs a RoutingConfig, got {type(args).__name__}")
        if train_dataset is not None:
            check_routes(train_dataset, args)
        if not isinstance(model, PeftModel):
            model = apply_lora(
                model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules, args.lora_parts, args.seed
            )
        if kwargs.get("data_collator") is None:
            if processing_class is None:
                raise IloraError("RoutingTrainer needs processing_class (processor or tokenizer) or a data_collator")
            kwargs["data_collator"] = RoutingCollator(processing_class)
        super().__init__(model=model, args=args, train_dataset=train_dataset, processing_class=processing_class, **kwargs)
        # The model computes no loss; compute_loss divides each term by its count over the whole
        # optimiser step (get_batch_samples), so the Trainer must not divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = True
        # Hooks only where the norm term needs them (plain LoRA runs without).
        self.recorder = LoraOutputRecorder(model) if args.eps_norm > 0 else None
        self._adapter_switch = AdapterSwitch(model)
        base = model.get_base_model()
        self._keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        self._image_token = image_token_id(base.config)
        self._cache_arg = cache_argument(base)
        self._share_prefix: bool | None = None  # None: not checked on this model yet
        # Per term, since the last log: the sum of its values and the micro-batches that had it.
        self._term_sums = torch.zeros(len(TERMS), 2, device=args.device)
        self._steps_since_log = 0
        self._weight_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _logit_request(self, batch: dict[str, torch.Tensor], positions: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Model kwargs for ``batch`` and the logit columns of ``positions`` in its output
        (only the needed columns reach the LM head when the model takes ``logits_to_keep``)."""
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
        columns = positions
        if self._keeps_logits:
            kept = torch.unique(positions) if positions.numel() else positions.new_zeros(1)
            kwargs["logits_to_keep"] = kept
            columns = torch.searchsorted(kept, positions)
        return kwargs, columns

    def _target_logits(
        self, model, batch: dict[str, torch.Tensor], rows: torch.Tensor, positions: torch.Tensor, share_prefix: bool = False
    ) -> torch.Tensor:
        """Logits ``[N, V]`` at the N ``(rows, positions)`` of ``batch``; with ``share_prefix``, the
        prefix all rows share runs once (``routing.prefix``)."""
        kwargs, columns = self._logit_request(batch, positions)
        length = 0
        # Without a known image placeholder a shared prefix could reach into the images.
        knows_images = self._image_token is not None or "pixel_values" not in batch
        if share_prefix and self.args.share_prompt_prefix and self._share_prefix is not False and knows_images:
            length = shared_prefix_length(batch["input_ids"], batch["attention_mask"], positions, self._image_token)
        if length and self._share_prefix is None:
            self._share_prefix = self._prefix_sharing_agrees(model, kwargs, length)
        if length and self._share_prefix:
            if "logits_to_keep" not in kwargs:
                columns = positions - length
            return forward_with_shared_prefix(model, kwargs, length, self._cache_arg).logits[rows, columns]
        return model(**kwargs, use_cache=False).logits[rows, columns]

    def _prefix_sharing_agrees(self, model, kwargs: dict, length: int) -> bool:
        """Whether running the shared prefix once gives this model's logits (checked once, in
        eval mode, on the first batch that has such a prefix); logs why not when it does not."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                full = model(**kwargs, use_cache=False).logits.float()
                shared = forward_with_shared_prefix(model, kwargs, length, self._cache_arg).logits.float()
        except (ValueError, TypeError, RuntimeError) as err:
            logger.warning("prompt-prefix sharing is off: the shared forward failed (%s)", err)
            return False
        finally:
            model.train(was_training)
        if "logits_to_keep" not in kwargs:
            full = full[:, length:]
        tolerance = (1e-4 if full.dtype == torch.float32 and shared.dtype == torch.float32 else 3e-2) * full.abs().max()
        error = (full - shared).abs().max() if full.shape == shared.shape else torch.tensor(float("inf"))
        if not bool(error <= tolerance):
            logger.warning("prompt-prefix sharing is off: it changes this model's logits (max error %.3g)", float(error))
            return False
        return True

    def _forward_units(
        self, inputs: dict[str, torch.Tensor], is_task: torch.Tensor, n_images: torch.Tensor, kind: str
    ) -> list[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, str]]:
        """The forwards of a micro-batch: ``(rows, their is_task, their n_images, kind)`` with kind
        ``task``, ``general`` or ``mixed``; one unit for all rows unless ``prefix.plan_forwards``
        finds that groups of alike rows, each trimmed to its own length, cost enough less."""
        plan = None
        if self.args.share_prompt_prefix and len(is_task) > 1:
            plan = plan_forwards(inputs["input_ids"], inputs["attention_mask"], is_task, self._image_token)
        if plan is None:
            return [(inputs, is_task, n_images, kind)]
        units = []
        for rows in plan:
            keep = torch.zeros(len(is_task), dtype=torch.bool, device=is_task.device)
            keep[rows] = True
            units.append((select_rows(inputs, keep, n_images), is_task[keep], n_images[keep],
                          "task" if bool(is_task[rows[0]]) else "general"))
        return units

    def routing_terms(
        self, model, inputs: dict[str, torch.Tensor], counts: TermCounts | None = None
    ) -> dict[str, torch.Tensor]:
        """The loss terms present in this micro-batch (``lm`` when it has task rows; ``kl``
        and/or ``norm`` when it has general rows and their weight is non-zero): each term's sum
        over this micro-batch divided by its ``counts`` (``None``: by its own items, a mean).

        One forward of the adapted model over all rows, the LoRA-B recorder masked to the
        general rows (their tokens and their images), or, when it saves enough padding
        (``prefix.plan_forwards``), one forward per group of alike rows, task groups running
        their shared prompt prefix once; then, for ``kl``, no-grad forwards of the same network
        with its adapter disabled on the general rows.
        """
        args = self.args
        is_task, n_images = inputs["is_task"], inputs["n_images"]
        has_task, has_general = (bool(x) for x in torch.stack([is_task.any(), (~is_task).any()]).tolist())
        if has_general and not args.routes_general:
            # Plain LoRA: general rows get no loss, so they need no forward either.
            if not has_task:
                return {}
            inputs, n_images = select_rows(inputs, is_task, n_images), n_images[is_task]
            is_task, has_general = is_task[is_task], False
        kind = "mixed" if has_task and has_general else "task" if has_task else "general"
        lm_logits, lm_targets, lora_logits, base_logits = [], [], [], []
        recorded = False
        for batch, rows_task, rows_images, unit in self._forward_units(inputs, is_task, n_images, kind):
            rows, positions, targets = target_positions(batch["labels"])
            record = contextlib.nullcontext()
            if unit != "task" and args.eps_norm > 0:  # one L_norm over every unit's general positions
                # With the rows' images known, each layer's positions per token or image are too.
                record = self.recorder.record(batch["attention_mask"], ~rows_task, rows_images, keep_previous=recorded)
                recorded = True
            with record:
                logits = self._target_logits(model, batch, rows, positions, share_prefix=unit == "task")
            if unit == "mixed":
                on_task = rows_task[rows]
                lm_logits.append(logits)
                lm_targets.append(targets.masked_fill(~on_task, IGNORE_INDEX))  # the mean is over task targets only
                lora_logits.append(logits[~on_task])
            elif unit == "task":
                lm_logits.append(logits)
                lm_targets.append(targets)
            else:
                lora_logits.append(logits)
            if unit != "task" and args.eps_kl > 0:
                general = select_rows(batch, ~rows_task, rows_images) if unit == "mixed" else batch
                g_rows, g_positions, _ = target_positions(general["labels"])
                switch = self._adapter_switch
                with torch.inference_mode(), switch.disabled():
                    base_logits.append(self._target_logits(switch.peft_model, general, g_rows, g_positions, share_prefix=True))
        counts = counts or TermCounts(None, None, None)
        terms: dict[str, torch.Tensor] = {}
        if has_task:
            terms["lm"] = causal_lm_loss(_joined(lm_logits), _joined(lm_targets), counts.lm)
        if has_general and args.eps_norm > 0:
            terms["norm"] = self.recorder.norm_loss(counts.norm_units).to(lora_logits[0].device)
        if has_general and args.eps_kl > 0:
            terms["kl"] = kl_base_lora(_joined(base_logits), _joined(lora_logits), args.kl_chunk_size, counts.kl)
        return terms

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device) -> tuple[list, TermCounts]:
        """The micro-batches of one optimiser step and, in place of the Trainer's label count, their
        ``TermCounts``, summed over processes when the Trainer would sum its count
        (``average_tokens_across_devices``)."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._steps_since_log += bool(batch_samples)  # an exhausted iterator makes no step
        counts = torch.zeros(4, dtype=torch.long, device=device)  # lm, kl, norm tokens, norm images
        for batch in batch_samples:
            task = batch["is_task"].to(device, torch.long)
            general = 1 - task
            targets, tokens = target_counts(batch["labels"]).to(device), batch["attention_mask"].to(device).sum(1)
            n_images = batch["n_images"].to(device)
            counts += torch.stack([(targets * task).sum(), (targets * general).sum(), (tokens * general).sum(),
                                   (n_images * general).sum()])
        processes = 1
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts, processes = self.accelerator.reduce(counts, "sum"), self.accelerator.num_processes
        counts = counts.clamp_min(1)  # an absent term's sum is 0 whatever it is divided by
        return batch_samples, TermCounts(counts[0], counts[1], counts[2:].float(), processes)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch: TermCounts | None = None):
        """``Σ eps·term`` of this micro-batch, each term normalised over the optimiser step by the
        ``TermCounts`` from ``get_batch_samples`` (outside training: this micro-batch's means)."""
        terms = self.routing_terms(model, inputs, num_items_in_batch)
        names = tuple(name for name in TERMS if name in terms)
        if not names:
            raise IloraError("a micro-batch produced no loss term (no task rows, and general rows get no weight)")
        values = torch.stack([terms[name].float() for name in names])
        weights, index = self._term_weights(names, values.device)
        loss = (values * weights).sum()
        if model.training:
            self._term_sums.index_add_(0, index, torch.stack([values.detach(), torch.ones_like(values)], 1))
        if num_items_in_batch is not None:
            loss = loss * num_items_in_batch.processes
        return (loss, {"terms": terms}) if return_outputs else loss

    def _term_weights(self, names: tuple[str, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights of these terms and their rows in ``_term_sums`` (cached per term set)."""
        key = (names, device)
        if key not in self._weight_cache:
            eps = {"lm": self.args.eps_lm, "kl": self.args.eps_kl, "norm": self.args.eps_norm}
            self._weight_cache[key] = (
                torch.tensor([eps[n] for n in names], dtype=torch.float32, device=device),
                torch.tensor([TERMS.index(n) for n in names], device=self._term_sums.device),
            )
        return self._weight_cache[key]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add each loss term's mean per optimiser step since the last log (over all processes) to
        training logs, for the terms some micro-batch had: a step without a term adds 0 to it, as
        to the loss, so ``loss = Σ eps·loss_<term>``."""
        if "loss" in logs:
            sums = self.accelerator.reduce(self._term_sums.clone(), "sum").cpu()
            steps = max(self._steps_since_log, 1)
            for (total, count), name in zip(sums.tolist(), TERMS):
                if count > 0:
                    logs[f"loss_{name}"] = round(total / steps, 8)
            self._term_sums.zero_()
            self._steps_since_log = 0
        super().log(logs, start_time)


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated along their first dimension (the one tensor itself, uncopied)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
