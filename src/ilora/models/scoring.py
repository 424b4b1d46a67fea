"""Scoring a VLM's candidate answers: the log-likelihood of each complete answer after each prompt.

:class:`AnswerScorer` ranks a fixed set of answers (an Atari game's ``Action: NAME``, a
benchmark's choices) in one forward pass over the prompts, then one pass over every candidate's
remaining tokens that reuses the prompts' KV cache: all of a prompt's candidates in one row with a
custom 4-D attention mask where the attention kernel takes one (SDPA, eager), else the cache
copied per candidate. :class:`PromptPrefix` holds the KV cache of the tokens every prompt starts
with (the chat template's start and a constant ``context``), computed once and shared by every
call, and encodes the rest of each prompt exactly as :func:`~ilora.models.inputs.encode_row` would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ilora.errors import IloraError
from ilora.models.cache import (
    cache_argument,
    cache_layers,
    expanded_cache,
    output_cache,
)
from ilora.models.inputs import chat_text, check_images, encode_row, image_token


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (as ``generate`` computes them).

    A left-padded row must see the same positions as the unpadded sequence, otherwise its logits
    depend on how long the other rows in the batch are.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PromptPrefix:
    """The tokens every prompt of an agent starts with, their KV cache, and an exact fast encoder
    for the rest of each prompt.

    The prefix is the chat template's start plus the row's ``context`` (the game's rules and
    actions): every token before the first image placeholder, the same at every step. Its KV cache
    is computed once and expanded along the batch dimension at each call (a new cache object per
    call: the stored tensors are never modified). The rest of each prompt (image tokens, per-step
    text, the template's end) is tokenised on its own, which gives the processor's tokens because
    an image placeholder is a special token that the tokenizer never merges across; each frame's
    pixel values are computed once and reused at the next step, where the later frame becomes the
    earlier one. :meth:`build` checks both against :func:`~ilora.models.inputs.encode_row` on a
    real row and refuses (returns the reason) when they differ.

    Attributes:
        ids: The prefix's token ids.
        head: The rendered chat text they come from (every row's text must start with it).
        tokens_per_image: Image tokens the processor expands each placeholder into.
        layers: Per decoder layer, the prefix's ``(keys, values)``, batch 1.
    """

    def __init__(self, processor, ids: list[int], head: str, tokens_per_image: int, layers: list) -> None:
        self.processor = processor
        self.ids = ids
        self.head = head
        self.tokens_per_image = tokens_per_image
        self.layers = layers
        self._marker = image_token(processor)
        self._pixels: dict[tuple, torch.Tensor] = {}  # the last call's frames -> pixel values

    @classmethod
    def build(cls, model, processor, row: dict) -> PromptPrefix | str:
        """The prefix of ``row`` (``images``, ``context``, ``prompt``) with its KV cache from ``model``.

        Returns:
            The prefix, or a string saying why the fast encoding cannot be used for this processor.
        """
        kernel = attention_kernel(model)
        if kernel not in ("sdpa", "eager"):  # padding between prefix and rest: checked with these only
            return f"attention kernel {kernel!r} (the prefix cache is checked with 'sdpa' and 'eager')"
        marker = image_token(processor)
        marker_id = processor.tokenizer.convert_tokens_to_ids(marker)
        full = encode_row(processor, row, with_answer=False)
        ids, n_images = full["input_ids"], len(row.get("images") or [])
        if n_images == 0 or marker_id not in ids:
            return "the prompt has no image placeholder to cut at"
        if ids.count(marker_id) % n_images:
            return f"{ids.count(marker_id)} image tokens for {n_images} images"
        cut = ids.index(marker_id)
        text = chat_text(processor, n_images, row["prompt"], row.get("context"))
        prefix = cls(processor, ids[:cut], text[: text.index(marker)], ids.count(marker_id) // n_images, [])
        try:
            suffixes, pixels = prefix._encode_parts([row])
        except IloraError as err:
            return str(err)
        if suffixes[0] != ids[cut:]:
            return "the text after the prefix, tokenised on its own, gives other tokens than the processor"
        if full["pixel_values"] is None or not torch.equal(pixels, full["pixel_values"]):
            return "the image processor alone gives other pixel values than the processor"
        device = next(model.parameters()).device
        # Plain (not inference-mode) tensors: the cache may be used outside inference mode later.
        with torch.inference_mode(False), torch.no_grad():
            out = model(input_ids=torch.tensor([prefix.ids], device=device), use_cache=True, logits_to_keep=1)
        layers = cache_layers(output_cache(out))
        if layers is None:
            return f"unsupported cache type {type(output_cache(out)).__name__}"
        prefix.layers = layers
        return prefix

    def __len__(self) -> int:
        return len(self.ids)

    def cache(self, batch_size: int):
        """A fresh cache holding the prefix for ``batch_size`` rows (the stored tensors stay untouched)."""
        return expanded_cache(self.layers, batch_size)

    def _pixel_values(self, images: list) -> torch.Tensor:
        keys = [(img.size, img.mode, img.tobytes()) for img in images]
        missing = {key: img for key, img in zip(keys, images) if key not in self._pixels}
        if missing:
            out = self.processor.image_processor(list(missing.values()), return_tensors="pt")
            if set(out.keys()) != {"pixel_values"}:
                raise IloraError(f"the image processor returns {sorted(out.keys())}, not only pixel values")
            self._pixels.update(zip(missing, out["pixel_values"]))
        pixels = torch.stack([self._pixels[key] for key in keys])
        self._pixels = {key: self._pixels[key] for key in keys}  # later frames are next step's earlier ones
        return pixels

    def _encode_parts(self, rows: Sequence[dict]) -> tuple[list[list[int]], torch.Tensor]:
        texts = []
        for row in rows:
            text = chat_text(self.processor, len(row["images"]), row["prompt"], row.get("context"))
            if not text.startswith(self.head):
                raise IloraError("a row's prompt does not start with the cached prefix (another context?)")
            texts.append(text[len(self.head) :].replace(self._marker, self._marker * self.tokens_per_image))
        suffixes = self.processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return suffixes, self._pixel_values(check_images([img for row in rows for img in row["images"]]))

    def encode(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        """The rows' prompts after the prefix, left-padded: ``input_ids [B, S]``, ``attention_mask
        [B, P + S]`` (the prefix, then the padded rest: what the cached forward attends to) and
        ``pixel_values``. Padding sits between the prefix and each row's rest."""
        suffixes, pixels = self._encode_parts(rows)
        n_prefix, width = len(self.ids), max(len(s) for s in suffixes)
        ids = torch.full((len(rows), width), self.processor.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(rows), n_prefix + width), dtype=torch.long)
        mask[:, :n_prefix] = 1
        for i, suffix in enumerate(suffixes):
            ids[i, width - len(suffix) :] = torch.tensor(suffix)
            mask[i, n_prefix + width - len(suffix) :] = 1
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


class AnswerScorer:
    """Log-likelihood of each of a fixed set of complete answers after each prompt of a batch.

    Answers are tokenised on their own with the end-of-turn token, exactly as training labels
    them (:func:`ilora.models.inputs.encode_example`), so their likelihood is the one training
    maximised. Their shared first tokens go with the prompt; the rest is scored per candidate.

    Args:
        model: The VLM (any HF image-text-to-text model, a PEFT model included).
        tokenizer: Its tokenizer (with ``eos_token`` and ``pad_token_id``).
        answers: The candidate answer texts, in the order of the score columns.
    """

    def __init__(self, model, tokenizer, answers: Sequence[str]) -> None:
        self.model = model
        self._cache_arg = cache_argument(model)
        self.shared_ids, self.suffix_ids, self.suffix_mask = answer_tokens(tokenizer, answers)

    def __call__(self, batch: dict[str, torch.Tensor], past=None) -> torch.Tensor:
        """Log-likelihood of each answer given each prompt of the batch.

        Args:
            batch: Left-padded prompts (``input_ids``, ``attention_mask``, ``pixel_values``). With
                ``past``, ``input_ids`` continue it and ``attention_mask`` covers past + inputs.
            past: A KV cache of the tokens before ``input_ids`` (one row per prompt), or ``None``.

        Returns:
            ``[batch, n_answers]`` float32 sums of answer-token log-probabilities.
        """
        model = self.model
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        ids, mask = batch["input_ids"], batch["attention_mask"]
        n_rows, n_cands = ids.shape[0], self.suffix_ids.shape[0]
        prefix = self.shared_ids.to(device)
        ids = torch.cat([ids, prefix.expand(n_rows, -1)], dim=1)
        mask = torch.cat([mask, torch.ones(n_rows, prefix.numel(), dtype=mask.dtype, device=device)], dim=1)
        positions = left_padded_positions(mask)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions[:, -ids.shape[1] :],
            pixel_values=batch.get("pixel_values"),
            **{self._cache_arg: past},
            use_cache=True,
            logits_to_keep=1,
        )
        suffix_ids, suffix_mask = self.suffix_ids.to(device), self.suffix_mask.to(device)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]
        scores = first[:, suffix_ids[:, 0]]  # [B, C]
        if suffix_ids.shape[1] == 1:
            return scores
        cache = output_cache(out)
        inputs, input_mask = suffix_ids[:, :-1], suffix_mask[:, :-1]  # [C, L]
        targets, target_mask = suffix_ids[:, 1:], suffix_mask[:, 1:]
        steps = torch.arange(1, suffix_ids.shape[1], device=device)
        mask_kind = custom_mask_kind(model)
        if mask_kind is None:
            # Every candidate continues its prompt's cache: rows b*C + c hold prompt b, candidate c.
            cache.batch_repeat_interleave(n_cands)
            rest = model(
                input_ids=inputs.repeat(n_rows, 1),
                attention_mask=torch.cat([mask.repeat_interleave(n_cands, 0), input_mask.repeat(n_rows, 1)], dim=1),
                position_ids=positions[:, -1:].repeat_interleave(n_cands, 0) + steps,
                **{self._cache_arg: cache},
                use_cache=False,
            )
        else:
            # All candidates of a prompt in one row after its cache (no copy of the cache): candidate
            # c's token j attends to the prompt and to c's tokens up to j, at position last + 1 + j.
            n_steps = inputs.shape[1]
            cand = torch.arange(n_cands, device=device).repeat_interleave(n_steps)
            step = torch.arange(n_steps, device=device).repeat(n_cands)
            own = (cand[:, None] == cand[None, :]) & (step[None, :] <= step[:, None]) & input_mask.flatten().bool()
            width = n_cands * n_steps
            allowed = torch.cat(
                [mask.bool()[:, None, :].expand(n_rows, width, -1), own.expand(n_rows, width, width)], dim=-1
            )[:, None]  # [B, 1, C*L, past + C*L]
            if mask_kind == "float":
                allowed = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
                    ~allowed, torch.finfo(dtype).min
                )
            rest = model(
                input_ids=inputs.flatten().expand(n_rows, -1),
                attention_mask=allowed,
                position_ids=positions[:, -1:] + steps.repeat(n_cands),
                **{self._cache_arg: cache},
                use_cache=False,
            )
        logp = torch.log_softmax(rest.logits.float(), dim=-1)
        logp = logp.reshape(n_rows * n_cands, -1, logp.shape[-1]).gather(-1, targets.repeat(n_rows, 1).unsqueeze(-1))
        return scores + (logp.squeeze(-1) * target_mask.repeat(n_rows, 1)).sum(-1).view(n_rows, n_cands)


def answer_tokens(tokenizer, answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids of complete answers (end-of-turn token included), split into their shared first
    tokens and per-answer rest (at least one token each, right-padded).

    Returns:
        ``shared [P]``, ``suffix_ids [C, S]``, ``suffix_mask [C, S]`` (1 on real tokens).
    """
    tokenised = [tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"] for answer in answers]
    shared = 0
    while all(len(a) > shared + 1 for a in tokenised) and len({a[shared] for a in tokenised}) == 1:
        shared += 1
    suffixes = [a[shared:] for a in tokenised]
    width = max(len(s) for s in suffixes)
    ids = torch.full((len(suffixes), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(suffixes), width), dtype=torch.long)
    for i, s in enumerate(suffixes):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return torch.tensor(tokenised[0][:shared], dtype=torch.long), ids, mask


def attention_kernel(model) -> str | None:
    """The language model's attention implementation (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``...)."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "_attn_implementation", None)


def custom_mask_kind(model) -> str | None:
    """How the language model takes a custom 4D attention mask: ``"bool"`` (SDPA), ``"float"``
    (eager, additive), or ``None`` (another attention kernel: do not pass one)."""
    return {"sdpa": "bool", "eager": "float"}.get(attention_kernel(model))
