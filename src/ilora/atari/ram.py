"""Object positions read from the console RAM, and the object-state text built from them.

Addresses follow the AtariARI annotations (Anand et al., 2019, ``ram_annotations.py``); the
offsets that turn RAM values into screen pixels were measured here against rendered frames.
Each reader turns two RAMs (earlier, later frame) into :class:`ObjectFacts`: positions in screen
pixels ``(x, y)`` and *relations* (``"ball_vs_paddle": "above"``). The relations are what the
scripted experts act on, so the text states exactly the fact that decides the expert's action
(a tiny model learns a policy from positions + relation words, not from positions alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ilora.atari.games import Game, get_game
from ilora.errors import IloraError

Point = tuple[int, int]  # (x, y) in screen pixels of the 210x160 frame
CELL = 16  # coarse bins: 16x16-pixel cells, a 10 x 14 grid


@dataclass(frozen=True)
class ObjectFacts:
    """What the RAM says about one step.

    Attributes:
        objects: ``name -> (earlier, later)`` screen positions; ``None`` when not on screen.
        relations: ``name -> word``, e.g. ``{"ball_vs_paddle": "above"}``; experts act on these.
        sentences: The relations as short sentences, in the text's order.
    """

    objects: dict[str, tuple[Point | None, Point | None]]
    relations: dict[str, str]
    sentences: tuple[str, ...]

    def text(self) -> str:
        """The object-state text: binned positions in both frames, then the relations."""
        parts = [f"{name} {_cell(before)} -> {_cell(now)}" for name, (before, now) in self.objects.items()]
        return (
            f"Objects (column, row in {CELL}-pixel cells; earlier frame -> later frame): "
            + "; ".join(parts)
            + ". Relations: "
            + "; ".join(self.sentences)
            + "."
        )


def _cell(point: Point | None) -> str:
    return "none" if point is None else f"({point[0] // CELL}, {point[1] // CELL})"


def _compare(delta: int, tolerance: int, below: str, above: str, level: str) -> str:
    """Word for a signed offset: ``below`` if ``delta < -tolerance``, ``above`` if ``> tolerance``."""
    if delta < -tolerance:
        return below
    if delta > tolerance:
        return above
    return level


# --- Pong: the player is the green paddle on the right. ------------------------------------------
PONG_PADDLE_X, PONG_OPPONENT_X = 141, 17
PONG_LEVEL_TOLERANCE = 6  # paddle 16 px tall; +-6 px scored best of 4/6/8/10 (sticky actions)


def _pong_objects(ram: np.ndarray) -> dict[str, Point | None]:
    ball_x, ball_y = int(ram[49]), int(ram[54])
    in_play = ball_y != 0 and 49 <= ball_x <= 208
    return {
        "ball": (ball_x - 49, ball_y - 13) if in_play else None,
        "your paddle": (PONG_PADDLE_X, int(ram[51]) - 6),
        "opponent paddle": (PONG_OPPONENT_X, int(ram[50]) - 7),
    }


def pong_facts(ram_prev: np.ndarray, ram_now: np.ndarray) -> ObjectFacts:
    before, now = _pong_objects(ram_prev), _pong_objects(ram_now)
    ball, paddle = now["ball"], now["your paddle"]
    if ball is None:
        relation, sentence = "none", "no ball in play"
    else:
        relation = _compare(ball[1] - paddle[1], PONG_LEVEL_TOLERANCE, "above", "below", "level")
        sentence = "ball is level with your paddle" if relation == "level" else f"ball is {relation} your paddle"
    return ObjectFacts({k: (before[k], now[k]) for k in now}, {"ball_vs_paddle": relation}, (sentence,))


# --- Breakout: paddle at the bottom, FIRE launches a ball. ---------------------------------------
BREAKOUT_PADDLE_Y = 190
BREAKOUT_LEVEL_TOLERANCE = 4  # the paddle is 16 px wide


def _breakout_objects(ram: np.ndarray) -> dict[str, Point | None]:
    ball_y = int(ram[101]) + 10
    in_play = ram[101] != 0 and ball_y < 196
    return {
        "ball": (int(ram[99]) - 49, ball_y) if in_play else None,
        "paddle": (int(ram[72]) - 39, BREAKOUT_PADDLE_Y),
    }


def breakout_facts(ram_prev: np.ndarray, ram_now: np.ndarray) -> ObjectFacts:
    before, now = _breakout_objects(ram_prev), _breakout_objects(ram_now)
    ball, paddle = now["ball"], now["paddle"]
    if ball is None:
        relation, sentence = "none", "no ball in play"
    else:
        relation = _compare(ball[0] - paddle[0], BREAKOUT_LEVEL_TOLERANCE, "left", "right", "level")
        sentence = "ball is straight above the paddle" if relation == "level" else f"ball is {relation} of the paddle"
    return ObjectFacts({k: (before[k], now[k]) for k in now}, {"ball_vs_paddle": relation}, (sentence,))


# --- Freeway: the chicken crosses ten lanes upward. ----------------------------------------------
FREEWAY_CHICKEN_X = (44, 49)  # the chicken's columns
FREEWAY_LANES = 10
FREEWAY_LOOKAHEAD = 2  # agent steps looked ahead; 1-2 scored 26 (vs 25 at 3-4, 21 always-UP)
FREEWAY_CAR_WIDTH = 8


def _freeway_lane_top(lane: int) -> int:
    """Top pixel row of lane ``lane`` (0 = bottom lane, 9 = top lane); lanes are 16 px apart."""
    return 172 - 16 * lane


def _freeway_chicken_y(ram: np.ndarray) -> int:
    return 196 - int(ram[14])  # centre row; ram[14] counts up from 6 at the bottom kerb


def _freeway_next_lane(ram: np.ndarray) -> int | None:
    """The lowest lane lying wholly above the chicken, ``None`` past the top lane."""
    chicken_top = _freeway_chicken_y(ram) - 4
    for lane in range(FREEWAY_LANES):
        if _freeway_lane_top(lane) + 7 < chicken_top:
            return lane
    return None


def _freeway_car_x(ram: np.ndarray, lane: int) -> int:
    return int(ram[108 + lane]) - 3  # left edge on screen


def freeway_facts(ram_prev: np.ndarray, ram_now: np.ndarray) -> ObjectFacts:
    lane = _freeway_next_lane(ram_now)
    chicken = lambda ram: (sum(FREEWAY_CHICKEN_X) // 2, _freeway_chicken_y(ram))  # noqa: E731
    objects: dict[str, tuple[Point | None, Point | None]] = {"chicken": (chicken(ram_prev), chicken(ram_now))}
    if lane is None:
        relation, sentence = "clear", "the chicken is past the last lane"
    else:
        top = _freeway_lane_top(lane) + 4
        x_prev, x_now = _freeway_car_x(ram_prev, lane), _freeway_car_x(ram_now, lane)
        objects["car in next lane"] = ((x_prev + 4, top), (x_now + 4, top))
        # Cars wrap around the screen: take the shorter signed distance.
        speed = (x_now - x_prev + 80) % 160 - 80
        hits = any(
            x_now + speed * t + FREEWAY_CAR_WIDTH >= FREEWAY_CHICKEN_X[0] - 2
            and x_now + speed * t <= FREEWAY_CHICKEN_X[1] + 2
            for t in range(FREEWAY_LOOKAHEAD + 1)
        )
        relation = "car" if hits else "clear"
        sentence = "a car is about to pass the chicken in the chicken's next lane" if hits else "the chicken's next lane is clear"
    return ObjectFacts(objects, {"next_lane": relation}, (sentence,))


# --- Boxing: you are the white boxer. -----------------------------------------------------------
# Measured on landed punches: they land from 14-30 px away horizontally with the opponent 8-24 px
# above or below (in line with a glove), never level. 26 / 10-18 px scored best in a sweep.
BOXING_REACH = 26
BOXING_GLOVE_BAND = (10, 18)
BOXING_VERTICAL = {  # word -> sentence
    "above": "opponent is above your top glove",
    "top glove": "opponent is in line with your top glove",
    "high centre": "opponent is between your gloves, nearer the top one",
    "low centre": "opponent is between your gloves, nearer the bottom one",
    "bottom glove": "opponent is in line with your bottom glove",
    "below": "opponent is below your bottom glove",
}


def _boxing_objects(ram: np.ndarray) -> dict[str, Point | None]:
    # RAM holds ring coordinates; the ring's top-left corner is drawn at about (0, 36).
    return {"you": (int(ram[32]), int(ram[34]) + 36), "opponent": (int(ram[33]), int(ram[35]) + 36)}


def _boxing_vertical(dy: int) -> str:
    low, high = BOXING_GLOVE_BAND
    if dy < -high:
        return "above"
    if dy <= -low:
        return "top glove"
    if dy < 0:
        return "high centre"
    if dy < low:
        return "low centre"
    return "bottom glove" if dy <= high else "below"


def boxing_facts(ram_prev: np.ndarray, ram_now: np.ndarray) -> ObjectFacts:
    before, now = _boxing_objects(ram_prev), _boxing_objects(ram_now)
    (you_x, you_y), (op_x, op_y) = now["you"], now["opponent"]
    dx, dy = op_x - you_x, op_y - you_y
    side = "right" if dx >= 0 else "left"
    distance = "far" if abs(dx) > BOXING_REACH else "in reach"
    vertical = _boxing_vertical(dy)
    relations = {"side": side, "distance": distance, "vertical": vertical}
    sentences = (f"opponent is to your {side}, {distance}", BOXING_VERTICAL[vertical])
    return ObjectFacts({k: (before[k], now[k]) for k in now}, relations, sentences)


FactsReader = Callable[[np.ndarray, np.ndarray], ObjectFacts]

READERS: dict[str, FactsReader] = {
    "Pong": pong_facts,
    "Breakout": breakout_facts,
    "Freeway": freeway_facts,
    "Boxing": boxing_facts,
}


def has_object_text(game: str | Game) -> bool:
    """Whether the game has a RAM reader (and so object-state text and a scripted expert)."""
    return get_game(game).name in READERS


def object_facts(game: str | Game, ram_prev: np.ndarray, ram_now: np.ndarray) -> ObjectFacts:
    """Positions and relations for the step whose earlier/later RAMs are given.

    Raises:
        IloraError: The game has no RAM reader; the message lists those that do.
    """
    name = get_game(game).name
    reader = READERS.get(name)
    if reader is None:
        raise IloraError(f"no RAM reader for {name}; object-state text exists for: {', '.join(sorted(READERS))}")
    return reader(np.asarray(ram_prev), np.asarray(ram_now))


def object_text(game: str | Game, ram_prev: np.ndarray, ram_now: np.ndarray) -> str:
    """The object-state text for the prompt (see :meth:`ObjectFacts.text`)."""
    return object_facts(game, ram_prev, ram_now).text()
