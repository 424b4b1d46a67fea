"""A vision-language model playing an Atari game: prompt in, action out, for many environments at once.

:class:`VLMAgent` turns a batch of :class:`~ilora.atari.envs.Observation` s (one per running
environment) into one batch of model inputs and answers them all with one model call:

- ``mode="score"`` ranks the game's actions by the log-likelihood of the direct answer
  ``Action: NAME`` (end-of-turn token included) in one forward pass over the prompts, then one
  pass over every candidate's remaining tokens that reuses the prompts' KV cache. The chosen
  action is the most likely complete answer among the valid ones; when greedy decoding's answer
  is valid and has probability above 1/2 it is necessarily that answer, so both pick the same
  action whenever the model is confident (and score mode can never produce an invalid answer).
  The prompt starts with the game's constant text (chat-template start, rules, actions: the
  row's ``context``, before the frames); its KV cache is computed once per agent
  (:class:`PromptPrefix`) and shared by every step and every environment of the batch, so each
  step runs the model only over the frames, the per-step text and the answers.
- ``mode="generate"`` decodes greedily (left padding, KV cache, ``max_new_tokens``) and reads
  the action from the text with :func:`ilora.atari.prompts.parse_action`. An empty or invalid
  answer becomes NOOP and is flagged, so the evaluation can count it.

Both modes encode examples exactly as training does (:mod:`ilora.models.inputs`), so an agent
sees the prompt its adapter was trained on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ilora.atari.envs import Observation
from ilora.atari.experts import Decision
from ilora.atari.games import Game, get_game
from ilora.atari.prompts import (
    build_answer,
    build_context,
    build_step_prompt,
    parse_action,
)
from ilora.atari.ram import READERS, has_object_text, object_text
from ilora.errors import IloraError
from ilora.models.cache import cache_argument, cache_layers, expanded_cache, output_cache
from ilora.models.inputs import (
    chat_text,
    check_images,
    encode_row,
    encode_rows,
    image_token,
)

MODES = ("score", "generate")


@dataclass(frozen=True)
class AgentDecision(Decision):
    """A model's decision: the action it acts with, its answer text, and whether the answer parsed.

    ``action`` is NOOP when ``valid`` is false (the answer named no action of the game).
    """

    valid: bool = True


@runtime_checkable
class BatchPolicy(Protocol):
    """A policy that answers many environments in one call (one decision per observation)."""

    def act_batch(self, observations: Sequence[Observation]) -> list[Decision]: ...


def frame_images(observation: Observation) -> list:
    """The observation's two frames (earlier, later) as PIL images, the model's image inputs."""
    from PIL import Image

    return [Image.fromarray(frame) for frame in observation.frames]


def noop_action(action_names: Sequence[str]) -> str:
    """The action an invalid answer falls back to: NOOP (every ALE minimal action set has it)."""
    return "NOOP" if "NOOP" in action_names else action_names[0]


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
        kernel = _attention_kernel(model)
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


class VLMAgent:
    """A VLM (with its processor) acting in one game; answers a batch of observations per call.

    Args:
        model: Any HF image-text-to-text model (the tiny default, a merged model, a PEFT model).
        processor: Its processor (chat template + image processor).
        game: The game (or its name); fixes the prompt's rules and the action names.
        mode: ``"score"`` (rank action names, one forward pass) or ``"generate"`` (greedy decoding).
        reasoning: Ask for the reasoning answer (``generate`` only; default: on in generate mode,
            off in score mode, which scores direct-action answers).
        object_text: Put the RAM object-state text in the prompt (games with a RAM reader only).
        max_new_tokens: Generation budget per step in generate mode.
        generation_options: Further ``generate`` keyword arguments (e.g. ``min_new_tokens`` to time
            answers of a fixed length); decoding stays greedy.
        prefix_cache: Score mode: compute the KV cache of the prompts' constant start once and
            reuse it (same scores as without, within float rounding). It is built on the first
            call from the model as it is then: call :meth:`clear_prefix_cache` after changing the
            model's weights. Turned off (see ``prefix_cache_off``) for a processor whose encoding
            the fast path cannot reproduce exactly.
    """

    def __init__(
        self,
        model,
        processor,
        game: Game | str,
        *,
        mode: str = "score",
        reasoning: bool | None = None,
        object_text: bool = False,
        max_new_tokens: int = 96,
        generation_options: dict | None = None,
        prefix_cache: bool = True,
    ) -> None:
        if mode not in MODES:
            raise IloraError(f"agent mode {mode!r}: expected one of {', '.join(MODES)}")
        reasoning = (mode == "generate") if reasoning is None else reasoning
        if mode == "score" and reasoning:
            raise IloraError("score mode ranks direct answers 'Action: NAME'; reasoning answers need mode 'generate'")
        self.game = get_game(game)
        if object_text and not has_object_text(self.game):
            raise IloraError(
                f"object_text: no RAM reader for {self.game.name}; games with one: {', '.join(sorted(READERS))}"
            )
        if max_new_tokens < 1:
            raise IloraError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model
        self._cache_arg = cache_argument(model)
        self.processor = processor
        self.mode = mode
        self.reasoning = reasoning
        self.object_text = object_text
        self.max_new_tokens = max_new_tokens
        self.generation_options = dict(generation_options or {})
        self.action_names: tuple[str, ...] = self.game.action_names
        self.noop = noop_action(self.action_names)
        self.model_seconds = 0.0  # time spent encoding + in the model, for the benchmark
        self.encode_seconds = 0.0  # the part of it spent building rows and model inputs
        self.source: dict = {}  # where the weights came from (model, adapter), for the result files
        self.context = build_context(self.game, action_names=self.action_names)
        self.prefix_cache = prefix_cache and mode == "score"
        self.prefix_cache_off: str | None = None  # why the prefix cache was turned off, if it was
        self._prefix: PromptPrefix | None = None
        if mode == "score":
            self._prefix_ids, self._suffix_ids, self._suffix_mask = self._candidate_tokens()

    @property
    def settings(self) -> dict:
        """What this agent is, for the result files (which prompt variant a score came from)."""
        return {
            "policy": "vlm",
            **self.source,
            "mode": self.mode,
            "reasoning": self.reasoning,
            "object_text": self.object_text,
            "max_new_tokens": self.max_new_tokens if self.mode == "generate" else None,
        }

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def rows(self, observations: Sequence[Observation]) -> list[dict]:
        """Example rows (context + images + prompt) for the observations, as training encodes them."""
        rows = []
        for obs in observations:
            text = object_text(self.game, *obs.rams) if self.object_text else None
            prompt = build_step_prompt(object_text=text, reasoning=self.reasoning)
            rows.append({"images": frame_images(obs), "context": self.context, "prompt": prompt})
        return rows

    def _to_model(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(self.dtype)
        return out

    def _encode(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        batch = self._to_model(encode_rows(self.processor, rows, with_answer=False, padding_side="left"))
        self.encode_seconds += time.perf_counter() - start
        return batch

    def score_observations(self, observations: Sequence[Observation]) -> torch.Tensor:
        """``[batch, n_actions]`` answer log-likelihoods (score mode), with the prefix cache when on."""
        return self.score_rows(self.rows(observations))

    def score_rows(self, rows: Sequence[dict]) -> torch.Tensor:
        """``[batch, n_actions]`` answer log-likelihoods of prepared rows (``images``, ``context``,
        ``prompt``), with the prefix cache when on."""
        if not self.prefix_cache:
            return self.score_actions(self._encode(rows))
        start = time.perf_counter()
        if self._prefix is None:
            prefix = PromptPrefix.build(self.model, self.processor, rows[0])
            if isinstance(prefix, str):  # the fast encoding is not exact for this processor
                self.prefix_cache, self.prefix_cache_off = False, prefix
                return self.score_rows(rows)
            self._prefix = prefix
            start = time.perf_counter()
        batch = self._to_model(self._prefix.encode(rows))
        self.encode_seconds += time.perf_counter() - start
        return self.score_actions(batch, past=self._prefix.cache(len(rows)))

    def clear_prefix_cache(self) -> None:
        """Forget the prefix KV cache (after the model's weights changed); the next call rebuilds it."""
        self._prefix = None

    def act_batch(self, observations: Sequence[Observation]) -> list[AgentDecision]:
        """One decision per observation, from one batched model call."""
        if not observations:
            return []
        start = time.perf_counter()
        with torch.inference_mode():
            decisions = self._decide(self.rows(observations))
        self.model_seconds += time.perf_counter() - start
        return decisions

    def decide_rows(self, rows: Sequence[dict], batch_size: int = 32) -> list[AgentDecision]:
        """The decision the agent takes on each prepared row (a dataset row, e.g. a held-out
        expert step: ``images``, ``context``, ``prompt``), as in play, ``batch_size`` rows per call."""
        with torch.inference_mode():
            chunks = [self._decide(rows[start : start + batch_size]) for start in range(0, len(rows), batch_size)]
        return [decision for chunk in chunks for decision in chunk]

    def _decide(self, rows: Sequence[dict]) -> list[AgentDecision]:
        if self.mode == "score":
            names = [self.action_names[i] for i in self.score_rows(rows).argmax(-1).tolist()]
            return [AgentDecision(name, build_answer(None, name), True) for name in names]
        return [self._parse(text) for text in self.generate_answers(self._encode(rows))]

    def __call__(self, observation: Observation) -> AgentDecision:
        """The plain :class:`~ilora.atari.experts.Policy` interface (a batch of one)."""
        return self.act_batch([observation])[0]

    def _parse(self, answer: str) -> AgentDecision:
        name = parse_action(answer, self.action_names)
        if name is None:
            return AgentDecision(self.noop, answer, False)
        return AgentDecision(name, answer, True)

    # ----- generate mode -------------------------------------------------------------------------

    def generate_answers(self, batch: dict[str, torch.Tensor]) -> list[str]:
        """Greedy answers for a left-padded batch (special tokens dropped)."""
        tok = self.processor.tokenizer
        out = self.model.generate(
            **batch,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **self.generation_options,
        )
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        return [text.strip() for text in tok.batch_decode(new_tokens, skip_special_tokens=True)]

    # ----- score mode ----------------------------------------------------------------------------

    def _candidate_tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids of every direct answer, split into the shared prefix and per-action suffixes.

        Answers are tokenised on their own with the end-of-turn token, exactly as training labels
        them (:func:`ilora.models.inputs.encode_example`), so their likelihood is the one training
        maximised. The shared prefix (``Action:``) goes with the prompt; suffixes are right-padded.

        Returns:
            ``prefix [P]``, ``suffix_ids [C, S]``, ``suffix_mask [C, S]`` (1 on real tokens).
        """
        tok = self.processor.tokenizer
        answers = [tok(build_answer(None, name) + tok.eos_token, add_special_tokens=False)["input_ids"] for name in self.action_names]
        shared = 0
        while all(len(a) > shared + 1 for a in answers) and len({a[shared] for a in answers}) == 1:
            shared += 1
        suffixes = [a[shared:] for a in answers]
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(suffixes), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(suffixes), width), dtype=torch.long)
        for i, s in enumerate(suffixes):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return torch.tensor(answers[0][:shared], dtype=torch.long), ids, mask

    def score_actions(self, batch: dict[str, torch.Tensor], past=None) -> torch.Tensor:
        """Log-likelihood of each action's direct answer given each prompt of the batch.

        Args:
            batch: Left-padded prompts (``input_ids``, ``attention_mask``, ``pixel_values``). With
                ``past``, ``input_ids`` continue it and ``attention_mask`` covers past + inputs.
            past: A KV cache of the tokens before ``input_ids`` (one row per prompt), or ``None``.

        Returns:
            ``[batch, n_actions]`` float32 sums of answer-token log-probabilities.
        """
        device = self.device
        ids, mask = batch["input_ids"], batch["attention_mask"]
        n_rows, n_cands = ids.shape[0], self._suffix_ids.shape[0]
        prefix = self._prefix_ids.to(device)
        ids = torch.cat([ids, prefix.expand(n_rows, -1)], dim=1)
        mask = torch.cat([mask, torch.ones(n_rows, prefix.numel(), dtype=mask.dtype, device=device)], dim=1)
        positions = left_padded_positions(mask)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions[:, -ids.shape[1] :],
            pixel_values=batch.get("pixel_values"),
            **{self._cache_arg: past},
            use_cache=True,
            logits_to_keep=1,
        )
        suffix_ids, suffix_mask = self._suffix_ids.to(device), self._suffix_mask.to(device)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]
        scores = first[:, suffix_ids[:, 0]]  # [B, C]
        if suffix_ids.shape[1] == 1:
            return scores
        cache = output_cache(out)
        inputs, input_mask = suffix_ids[:, :-1], suffix_mask[:, :-1]  # [C, L]
        targets, target_mask = suffix_ids[:, 1:], suffix_mask[:, 1:]
        steps = torch.arange(1, suffix_ids.shape[1], device=device)
        mask_kind = _custom_mask_kind(self.model)
        if mask_kind is None:
            # Every candidate continues its prompt's cache: rows b*C + c hold prompt b, candidate c.
            cache.batch_repeat_interleave(n_cands)
            rest = self.model(
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
                allowed = torch.zeros(allowed.shape, dtype=self.dtype, device=device).masked_fill(
                    ~allowed, torch.finfo(self.dtype).min
                )
            rest = self.model(
                input_ids=inputs.flatten().expand(n_rows, -1),
                attention_mask=allowed,
                position_ids=positions[:, -1:] + steps.repeat(n_cands),
                **{self._cache_arg: cache},
                use_cache=False,
            )
        logp = torch.log_softmax(rest.logits.float(), dim=-1)
        logp = logp.reshape(n_rows * n_cands, -1, logp.shape[-1]).gather(-1, targets.repeat(n_rows, 1).unsqueeze(-1))
        return scores + (logp.squeeze(-1) * target_mask.repeat(n_rows, 1)).sum(-1).view(n_rows, n_cands)


def _attention_kernel(model) -> str | None:
    """The language model's attention implementation (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``...)."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "_attn_implementation", None)


def _custom_mask_kind(model) -> str | None:
    """How the language model takes a custom 4D attention mask: ``"bool"`` (SDPA), ``"float"``
    (eager, additive), or ``None`` (another attention kernel: do not pass one)."""
    return {"sdpa": "bool", "eager": "float"}.get(_attention_kernel(model))



def load_agent(
    model: str,
    game: Game | str,
    *,
    adapter: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    **agent_options,
) -> VLMAgent:
    """A :class:`VLMAgent` for a model folder (or hub id), optionally with a PEFT adapter.

    The adapter is merged into the weights in memory (``merge_and_unload``): the same function,
    without the per-layer adapter overhead at every step. ``agent_options`` go to :class:`VLMAgent`.
    """
    from ilora.models.load import load_vlm_merged

    game = get_game(game)  # fail on bad input before loading anything (load_vlm_merged checks the adapter)
    vlm, processor = load_vlm_merged(model, adapter, dtype=dtype, device=device)
    agent = VLMAgent(vlm, processor, game, **agent_options)
    agent.source = {"model": str(model), "adapter": None if adapter is None else str(adapter), "dtype": str(dtype)}
    return agent
