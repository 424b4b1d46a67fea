"""A vision-language model playing an Atari game: prompt in, action out, for many environments at once.

:class:`VLMAgent` turns a batch of :class:`~ilora.atari.envs.Observation` s (one per running
environment) into one batch of model inputs and answers them all with one model call:

- ``mode="score"`` ranks the game's actions by the log-likelihood of the direct answer
  ``Action: NAME`` (end-of-turn token included) in one forward pass over the prompts, then one
  pass over every candidate's remaining tokens that reuses the prompts' KV cache. The chosen
  action is the most likely complete answer among the valid ones; when greedy decoding's answer
  is valid and has probability above 1/2 it is necessarily that answer, so both pick the same
  action whenever the model is confident (and score mode can never produce an invalid answer).
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
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ilora.atari.envs import Observation
from ilora.atari.experts import Decision
from ilora.atari.games import Game, get_game
from ilora.atari.prompts import build_answer, build_prompt, parse_action
from ilora.atari.ram import READERS, has_object_text, object_text
from ilora.errors import IloraError
from ilora.models.inputs import encode_rows

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
        self.source: dict = {}  # where the weights came from (model, adapter), for the result files
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
        """Example rows (images + prompt) for the observations, as training encodes them."""
        rows = []
        for obs in observations:
            text = object_text(self.game, *obs.rams) if self.object_text else None
            prompt = build_prompt(self.game, object_text=text, reasoning=self.reasoning, action_names=self.action_names)
            rows.append({"images": frame_images(obs), "prompt": prompt})
        return rows

    def _encode(self, observations: Sequence[Observation]) -> dict[str, torch.Tensor]:
        batch = encode_rows(self.processor, self.rows(observations), with_answer=False, padding_side="left")
        out = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(self.dtype)
        return out

    def act_batch(self, observations: Sequence[Observation]) -> list[AgentDecision]:
        """One decision per observation, from one batched model call."""
        if not observations:
            return []
        start = time.perf_counter()
        batch = self._encode(observations)
        with torch.inference_mode():
            if self.mode == "score":
                best = self.score_actions(batch).argmax(-1).tolist()
                names = [self.action_names[i] for i in best]
                decisions = [AgentDecision(name, build_answer(None, name), True) for name in names]
            else:
                decisions = [self._parse(text) for text in self.generate_answers(batch)]
        self.model_seconds += time.perf_counter() - start
        return decisions

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

    def score_actions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Log-likelihood of each action's direct answer given each prompt of the batch.

        Args:
            batch: Left-padded prompts (``input_ids``, ``attention_mask``, ``pixel_values``).

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
            position_ids=positions,
            pixel_values=batch.get("pixel_values"),
            use_cache=True,
            logits_to_keep=1,
        )
        suffix_ids, suffix_mask = self._suffix_ids.to(device), self._suffix_mask.to(device)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]
        scores = first[:, suffix_ids[:, 0]]  # [B, C]
        if suffix_ids.shape[1] == 1:
            return scores
        # Every candidate continues its prompt's cache: rows b*C + c hold prompt b, candidate c.
        cache = out.past_key_values
        cache.batch_repeat_interleave(n_cands)
        inputs = suffix_ids[:, :-1].repeat(n_rows, 1)
        targets = suffix_ids[:, 1:].repeat(n_rows, 1)
        target_mask = suffix_mask[:, 1:].repeat(n_rows, 1)
        full_mask = torch.cat([mask.repeat_interleave(n_cands, 0), suffix_mask[:, :-1].repeat(n_rows, 1)], dim=1)
        steps = torch.arange(1, suffix_ids.shape[1], device=device)
        rest = self.model(
            input_ids=inputs,
            attention_mask=full_mask,
            position_ids=positions[:, -1:].repeat_interleave(n_cands, 0) + steps,
            past_key_values=cache,
            use_cache=False,
        )
        logp = torch.log_softmax(rest.logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return scores + (logp * target_mask).sum(-1).view(n_rows, n_cands)



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

    game = get_game(game)  # fail on bad input before loading anything
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise IloraError(f"{adapter}: no adapter_config.json, not a PEFT adapter folder")
    vlm, processor = load_vlm_merged(model, adapter, dtype=dtype, device=device)
    agent = VLMAgent(vlm, processor, game, **agent_options)
    agent.source = {"model": str(model), "adapter": None if adapter is None else str(adapter), "dtype": str(dtype)}
    return agent
