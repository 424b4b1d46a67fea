"""A vision-language model playing an Atari game: prompt in, action out, for many environments at once.

:class:`VLMAgent` turns a batch of :class:`~ilora.atari.envs.Observation` s (one per running
environment) into one batch of model inputs and answers them all with one model call:

- ``mode="score"`` ranks the game's actions by the log-likelihood of the direct answer
  ``Action: NAME`` (end-of-turn token included), scored by
  :class:`~ilora.models.scoring.AnswerScorer`. The chosen action is the most likely complete
  answer among the valid ones; when greedy decoding's answer is valid and has probability above
  1/2 it is necessarily that answer, so both pick the same action whenever the model is
  confident (and score mode can never produce an invalid answer). The prompt starts with the
  game's constant text (chat-template start, rules, actions: the row's ``context``, before the
  frames); its KV cache is computed once per agent (:class:`~ilora.models.scoring.PromptPrefix`)
  and shared by every step and every environment of the batch, so each step runs the model only
  over the frames, the per-step text and the answers.
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
from ilora.models.inputs import encode_rows
from ilora.models.scoring import AnswerScorer, PromptPrefix

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
            self._answers = AnswerScorer(model, processor.tokenizer, [build_answer(None, name) for name in self.action_names])

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

    def score_actions(self, batch: dict[str, torch.Tensor], past=None) -> torch.Tensor:
        """``[batch, n_actions]`` log-likelihoods of each action's direct answer ``Action: NAME``
        given each prompt of a left-padded batch (see :class:`~ilora.models.scoring.AnswerScorer`)."""
        return self._answers(batch, past)


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
    from ilora.models.load import load_vlm_with_adapter

    game = get_game(game)  # fail on bad input before loading anything (the loader checks the adapter)
    vlm, processor = load_vlm_with_adapter(model, adapter, dtype=dtype, device=device)
    agent = VLMAgent(vlm, processor, game, **agent_options)
    agent.source = {"model": str(model), "adapter": None if adapter is None else str(adapter), "dtype": str(dtype)}
    return agent
