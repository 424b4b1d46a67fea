"""Visual-grounding questions on Atari frames, for pretraining the small world's base VLM.

The base model must learn to read game screens and object-state text — where things are,
how they relate — without ever seeing a game's policy (that is the adapters' job). Frames
come from random play; the answers come from the RAM readers in ``ilora.atari.ram``.

Four families:
- ``relation``: the object-state text is in the prompt; the question asks for one relation
  word (``above``, ``left``, ``in reach`` ...). Teaches the language model to read the text.
- ``where``: no text; the question asks for an object's coarse cell in the later frame.
  Only the pixels carry the answer, which pushes the vision tower to localise objects.
- ``prompt_relation``: the game's own playing prompt (rules and numbered actions before the
  frames, object text after them) followed by a relation question. In the ~400-token playing
  prompt a base trained only on short relation prompts did not attend to the relation words
  (swapping "above" for "below" moved its last hidden state by 0.4%).
- ``action_meaning``: the playing prompt followed by "which action means '<meaning>'?"; the
  answer is ``Action: NAME``, the first listed action with that meaning. Teaches the answer
  format and what the action names mean, as any instruction-tuned VLM knows them. Without
  it the tied embeddings of all action names collapsed (cosine 0.92-0.98 between RIGHT,
  LEFT, UP, DOWN, ...), and a LoRA adapter, which cannot move embeddings, never learned
  Pong's or Breakout's direction in CPU-minutes while full fine-tuning learned it in 100 steps.

None of them is a policy: no question asks which action the situation calls for.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from ilora.atari.envs import TwoFrameEnv
from ilora.atari.prompts import build_answer, build_context, build_step_prompt, describe_action
from ilora.atari.ram import CELL, READERS, object_facts

FAMILIES = ("relation", "where", "prompt_relation", "action_meaning")


def relation_question(key: str) -> str:
    """``"ball_vs_paddle"`` -> ``"What is the ball vs paddle relation?"``."""
    return f"What is the {key.replace('_', ' ')} relation?"


def action_meaning_question(meaning: str) -> str:
    return f"Question: which action means '{meaning}'?"


def where_question(obj: str) -> str:
    return f"Where is the {obj} in the later frame? Answer column, row."


def grounding_rows(
    n: int,
    seed: int,
    games: tuple[str, ...] | list[str] | None = None,
    families: tuple[str, ...] = FAMILIES,
    steps_between: int = 7,
) -> list[dict[str, Any]]:
    """``n`` grounding rows from random play, deterministic in its arguments.

    Args:
        n: number of rows, spread round-robin over games and families.
        seed: seeds the episodes and the random actions.
        games: games with a RAM reader (default: all of them).
        families: any of :data:`FAMILIES`.
        steps_between: random agent steps between two sampled observations (decorrelates rows).

    Returns:
        Rows with ``images`` (two frames), ``prompt``, ``answer``, ``task``
        (``"grounding_<family>"``), ``source`` (``"atari_grounding"``) and ``game``.
    """
    games = list(games or sorted(READERS))
    rng = np.random.default_rng(seed)
    envs = {g: TwoFrameEnv(g) for g in games}
    obs = {g: env.reset(seed=seed) for g, env in envs.items()}
    rows: list[dict[str, Any]] = []
    i = 0
    try:
        while len(rows) < n:
            game = games[i % len(games)]
            family = families[(i // len(games)) % len(families)]
            i += 1
            env = envs[game]
            for _ in range(steps_between):
                step = env.step(int(rng.integers(len(env.action_names))))
                obs[game] = env.reset(seed=int(rng.integers(1 << 30))) if step.done else step.observation
            o = obs[game]
            facts = object_facts(game, *o.rams)
            images = [Image.fromarray(f) for f in o.frames]
            context = None
            if family in ("prompt_relation", "action_meaning"):
                context = build_context(game)
                playing = build_step_prompt(object_text=facts.text(), reasoning=False)
            if family == "action_meaning":
                meanings = {}
                for name in env.action_names:  # the first listed action with each meaning
                    meanings.setdefault(describe_action(name, game), name)
                meaning = sorted(meanings)[int(rng.integers(len(meanings)))]
                prompt = f"{playing}\n{action_meaning_question(meaning)}"
                answer = build_answer(None, meanings[meaning])
            elif family in ("relation", "prompt_relation"):
                key = sorted(facts.relations)[int(rng.integers(len(facts.relations)))]
                if family == "relation":
                    prompt = f"Game: {game}.\n{facts.text()}\n{relation_question(key)}"
                else:
                    prompt = f"{playing}\nQuestion: {relation_question(key)}"
                answer = facts.relations[key]
            else:
                visible = [name for name, (_, now) in facts.objects.items() if now is not None]
                if not visible:
                    continue
                name = visible[int(rng.integers(len(visible)))]
                x, y = facts.objects[name][1]
                prompt, answer = f"Game: {game}.\n{where_question(name)}", f"{x // CELL}, {y // CELL}"
            rows.append(
                {
                    "images": images,
                    "context": context,
                    "prompt": prompt,
                    "answer": answer,
                    "task": f"grounding_{family}",
                    "source": "atari_grounding",
                    "game": game,
                }
            )
    finally:
        for env in envs.values():
            env.close()
    return rows
