"""Visual-grounding questions on Atari frames, for pretraining the small world's base VLM.

The base model must learn to read game screens and object-state text — where things are,
how they relate — without ever seeing a game's policy (that is the adapters' job). Frames
come from random play; the answers come from the RAM readers in ``ilora.atari.ram``.

Three families:
- ``relation``: the object-state text is in the prompt; the question asks for one relation
  word (``above``, ``left``, ``in reach`` ...). Teaches the language model to read the text.
- ``where``: no text; the question asks for an object's coarse cell in the later frame.
  Only the pixels carry the answer, which pushes the vision tower to localise objects.
- ``action_format``: the game's own playing prompt (rules, numbered actions, object text)
  followed by a question naming an action number; the answer is ``Action: NAME``. Teaches
  the answer format and the action list, as any instruction-tuned VLM knows them, without
  any policy (the number asked is random).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from ilora.atari.envs import TwoFrameEnv
from ilora.atari.prompts import build_answer, build_prompt
from ilora.atari.ram import CELL, READERS, object_facts

FAMILIES = ("relation", "where", "action_format")


def relation_question(key: str) -> str:
    """``"ball_vs_paddle"`` -> ``"What is the ball vs paddle relation?"``."""
    return f"What is the {key.replace('_', ' ')} relation?"


def action_number_question(number: int) -> str:
    return f"Question: which action has number {number}?"


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
        families: ``"relation"`` and/or ``"where"``.
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
            if family == "action_format":
                k = int(rng.integers(len(env.action_names)))
                prompt = f"{build_prompt(game, object_text=facts.text(), reasoning=False)}\n{action_number_question(k)}"
                answer = build_answer(None, env.action_names[k])
            elif family == "relation":
                key = sorted(facts.relations)[int(rng.integers(len(facts.relations)))]
                prompt = f"{facts.text()}\n{relation_question(key)}"
                answer = facts.relations[key]
            else:
                visible = [name for name, (_, now) in facts.objects.items() if now is not None]
                if not visible:
                    continue
                name = visible[int(rng.integers(len(visible)))]
                x, y = facts.objects[name][1]
                prompt, answer = where_question(name), f"{x // CELL}, {y // CELL}"
            rows.append(
                {
                    "images": images,
                    "prompt": prompt if family == "action_format" else f"Game: {game}.\n{prompt}",
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
