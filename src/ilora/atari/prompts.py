"""The benchmark's prompt and answer text, and the exact-match action parser.

The user turn is: the constant per-game text (:func:`build_context`: the rules and the numbered
action meanings), then the two images (earlier, later frame; the processor's chat template places
them), then the per-step text (:func:`build_step_prompt`: optionally the object-state text, and
the instruction). Constant text first lets an agent compute its KV cache once per game.
:func:`build_prompt` joins both parts into one text. The answer is either reasoning followed by
``Action: NAME`` or just ``Action: NAME`` (direct).
"""

from __future__ import annotations

import re

from ilora.atari.games import DEFAULT_FRAME_SKIP, Game, get_game

ACTION_PREFIX = "Action:"

# What the ALE's direction/fire names do, for action names without a game-specific meaning.
_DIRECTIONS = {"UP": "up", "DOWN": "down", "LEFT": "left", "RIGHT": "right"}

# Where a game gives an action a meaning its name hides (Pong's RIGHT moves the paddle up).
GAME_ACTION_MEANINGS: dict[str, dict[str, str]] = {
    "Pong": {
        "FIRE": "serve / do nothing",
        "RIGHT": "move your paddle up",
        "LEFT": "move your paddle down",
        "RIGHTFIRE": "move your paddle up",
        "LEFTFIRE": "move your paddle down",
    },
    "Breakout": {"FIRE": "launch a new ball (when none is in play)"},
    "Freeway": {"UP": "move the chicken up, toward the far side", "DOWN": "move the chicken back down"},
    "Boxing": {"FIRE": "punch"},
}


def describe_action(name: str, game: str | Game | None = None) -> str:
    """A short meaning for an ALE action name, e.g. ``UPRIGHTFIRE`` -> ``move up-right and fire``."""
    if game is not None:
        special = GAME_ACTION_MEANINGS.get(get_game(game).name, {}).get(name)
        if special:
            return special
    if name == "NOOP":
        return "do nothing"
    fire = name.endswith("FIRE")
    rest = name[: -len("FIRE")] if fire else name
    moves = []
    while rest:
        word = next((w for w in _DIRECTIONS if rest.startswith(w)), None)
        if word is None:  # not a direction name: show it as is
            return name.lower()
        moves.append(_DIRECTIONS[word])
        rest = rest[len(word):]
    move = "move " + "-".join(moves) if moves else ""
    return " and ".join(p for p in (move, "fire" if fire else "") if p)


def action_list(action_names: tuple[str, ...] | list[str], game: str | Game | None = None) -> str:
    """The numbered action meanings, one per line: ``0. NOOP: do nothing``."""
    return "\n".join(f"{i}. {name}: {describe_action(name, game)}" for i, name in enumerate(action_names))


def build_context(
    game: str | Game,
    *,
    action_names: tuple[str, ...] | None = None,
    frame_skip: int = DEFAULT_FRAME_SKIP,
) -> str:
    """The constant per-game text, placed before the two frames (a row's ``context``).

    Args:
        game: The game (or its name).
        action_names: The actions the environment accepts; defaults to the minimal set.
        frame_skip: Emulator frames between the two images.

    Returns:
        The intro, the rules and the numbered actions.
    """
    game = get_game(game)
    names = action_names if action_names is not None else game.action_names
    parts = [
        f"You are playing the Atari game {game.name}. The two images are frames of the game "
        f"{frame_skip} emulator frames apart; act on the second (later) one.",
        f"Rules: {game.rules}",
        f"Actions:\n{action_list(names, game)}",
    ]
    return "\n\n".join(parts)


def build_step_prompt(*, object_text: str | None = None, reasoning: bool = True) -> str:
    """The per-step text, placed after the two frames (a row's ``prompt``).

    Args:
        object_text: Object-state text from :func:`ilora.atari.ram.object_text`, or ``None``.
        reasoning: Ask for reasoning before the action (else only ``Action: NAME``).

    Returns:
        The object-state text (if any), then the answer instruction.
    """
    parts = []
    if object_text:
        parts.append(object_text)
    if reasoning:
        parts.append(
            "Say what is on the screen and which rule applies, then give your action on the last "
            f"line as '{ACTION_PREFIX} NAME' with one of the action names above."
        )
    else:
        parts.append(f"Answer only with '{ACTION_PREFIX} NAME' using one of the action names above.")
    return "\n\n".join(parts)


def build_prompt(
    game: str | Game,
    *,
    object_text: str | None = None,
    reasoning: bool = True,
    action_names: tuple[str, ...] | None = None,
    frame_skip: int = DEFAULT_FRAME_SKIP,
) -> str:
    """The whole user text as one string: :func:`build_context`, then :func:`build_step_prompt`.

    For single-text layouts (text after the images); the game's rows and the agent place the
    two parts around the frames instead (``context``, images, ``prompt``).
    """
    context = build_context(game, action_names=action_names, frame_skip=frame_skip)
    return "\n\n".join([context, build_step_prompt(object_text=object_text, reasoning=reasoning)])


def build_answer(reasoning: str | None, action: str) -> str:
    """The assistant text: optional reasoning, then ``Action: NAME`` on its own line."""
    line = f"{ACTION_PREFIX} {action}"
    return f"{reasoning.strip()}\n{line}" if reasoning and reasoning.strip() else line


_ACTION_RE = re.compile(r"(?:^|\s)" + re.escape(ACTION_PREFIX) + r"[ \t]*([A-Za-z_]+)[ \t.]*$")


def parse_action(text: str, action_names: tuple[str, ...] | list[str]) -> str | None:
    """The action named on the answer's last non-empty line, by exact match; ``None`` if invalid.

    The whole name token must match (``RIGHTFIRE`` never parses as ``RIGHT``; case matters), and
    the line must end with ``Action: NAME`` (a trailing period is tolerated).
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    match = _ACTION_RE.search(lines[-1])
    if match is None or match.group(1) not in action_names:
        return None
    return match.group(1)


def prompt_vocabulary(samples_per_game: int = 200, seed: int = 0) -> list[str]:
    """Texts covering the benchmark's words, for training a tokenizer.

    Every catalogued game's prompt (reasoning and direct), and for the games with a RAM reader the
    object-state text and the scripted expert's answers on ``samples_per_game`` random console RAMs
    (enough to reach every relation word). Deterministic under ``seed``; needs no emulator steps.
    """
    import numpy as np

    from ilora.atari.experts import EXPERTS
    from ilora.atari.games import GAMES
    from ilora.atari.ram import object_facts

    rng = np.random.default_rng(seed)
    texts: list[str] = []
    for game in GAMES.values():
        texts += [build_prompt(game, reasoning=True), build_prompt(game, reasoning=False)]
        texts += [build_answer(None, name) for name in game.action_names]
    for name, make_expert in sorted(EXPERTS.items()):
        expert = make_expert()
        for _ in range(samples_per_game):
            before, now = rng.integers(0, 256, size=(2, 128), dtype=np.uint8)
            facts = object_facts(name, before, now)
            decision = expert.act(facts)
            texts += [facts.text(), build_answer(decision.reasoning, decision.action)]
    return texts
