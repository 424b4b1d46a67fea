"""Search the merge settings of a set of routed adapters by a cheap reward (``ilora tune-merge``).

A trial merges the adapters in memory with one setting (a method, its options, a weight per
skill), adds the merged ΔW to the base model (loaded once) and scores, on each skill's held-out
rows, offline agreement with the expert's actions and the answer margin, and the general
benchmark's accuracy. Each score is compared with its unmerged reference (the skill's own
adapter; the base model for general accuracy), and the trial's objective is the minimum or the
mean of these changes.

Two strategies search the same discrete space on the same budget of trials: RL-Fusion's
tabular Q-learning (the state is the setting; an action switches the method or moves one
option or weight to a neighbouring value; the reward of a step is the objective of the setting
it reaches) and Optuna's TPE. Trial 0 of each is the default setting (the first method, its
default options, every weight 1), so the best setting found is never worse than the default on
this reward.

Every trial is recorded in ``OUT/trials-<strategy>.jsonl`` (the file is replaced atomically
after each trial). The strategies draw their random numbers from ``(seed, trial)`` and rebuild
their state from the record, so a killed search resumed with ``--resume`` ends with the same
record as one uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ilora.config import field, to_dict
from ilora.errors import IloraError
from ilora.fileio import atomic_write_text, to_json

STRATEGIES = ("qlearning", "tpe")
OBJECTIVES = ("min", "mean")
GENERAL = "general"  # the key of general accuracy among the per-skill rewards
SEARCH_RECORD = "search.json"
BEST_RECORD = "best.yaml"
PLOT = "best-reward.png"
RECORD_FORMAT = "ilora-tune-merge"
HELDOUT_COLUMNS = ("images", "context", "prompt", "action")
GENERAL_COLUMNS = ("images", "prompt", "answer", "task")

State = tuple[int, ...]  # one value index per dimension of the search space
Move = tuple[int, int]  # (dimension, value index it is set to)


@dataclasses.dataclass
class QLearningSettings:
    """RL-Fusion's tabular Q-learning over the discretised settings."""

    alpha: float = field(0.5, help="learning rate of the Q update, in (0, 1]")
    gamma: float = field(0.9, help="discount of the next setting's best Q value, in [0, 1)")
    epsilon: float = field(0.2, help="probability of a random move (otherwise the best by Q, ties at random)")

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise IloraError(f"qlearning.alpha {self.alpha}: must be in (0, 1]")
        if not 0 <= self.gamma < 1:
            raise IloraError(f"qlearning.gamma {self.gamma}: must be in [0, 1)")
        if not 0 <= self.epsilon <= 1:
            raise IloraError(f"qlearning.epsilon {self.epsilon}: must be in [0, 1]")


@dataclasses.dataclass
class TPESettings:
    """Optuna's TPE sampler."""

    startup_trials: int = field(5, help="trials drawn at random before TPE models the rewards (trial 0 counts)")

    def __post_init__(self) -> None:
        if self.startup_trials < 1:
            raise IloraError(f"tpe.startup_trials {self.startup_trials}: must be at least 1")


def _default_options() -> dict[str, dict[str, list[Any]]]:
    grid = [0.2, 0.4, 0.6, 0.8, 1.0]
    return {"ilora": {"keep": list(grid)}, "ties": {"density": list(grid)}}


@dataclasses.dataclass
class TuneSettings:
    """What ``ilora tune-merge`` searches, how it scores a trial, and how long it searches."""

    methods: list[str] = field(
        default_factory=lambda: ["ilora", "ties", "task_arithmetic"],
        help="merge methods searched (see `ilora merge --list-methods`); the first, with its default options "
        "and every weight 1, is trial 0",
    )
    options: dict[str, dict[str, list[Any]]] = field(
        default_factory=_default_options,
        help="values tried per method option, in order (Q-learning steps between neighbours); each option's "
        "default is added to its values; options not named keep their default; `weights` is tuned by `weights`",
    )
    weights: list[float] = field(
        default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5],
        help="values tried for each skill's weight (methods with a `weights` option); 1 is added; [] tunes none",
    )
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES), help="qlearning and/or tpe, run in turn")
    trials: int = field(24, help="trials per strategy, trial 0 (the default setting) included")
    objective: str = field("min", help="'min' or 'mean', over the skills and general accuracy, of the reward")
    seed: int = field(0, help="seed of the strategies' random draws")
    rows: int = field(64, help="held-out rows of each skill scored per trial (the first ones)")
    general_rows: int = field(64, help="general rows scored per trial (the first ones)")
    margin_weight: float = field(
        0.1,
        help="a skill's score is agreement + margin_weight x its mean answer margin (the margin orders "
        "settings of equal agreement)",
    )
    batch_size: int = field(32, help="rows per model call")
    dtype: str = field("float32", help="dtype the base model is loaded in")
    device: str = field("auto", help="auto (cuda when available), cpu or cuda")
    qlearning: QLearningSettings = field(default_factory=QLearningSettings, help="Q-learning settings")
    tpe: TPESettings = field(default_factory=TPESettings, help="TPE settings")

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise IloraError(f"objective {self.objective!r}: expected one of {', '.join(OBJECTIVES)}")
        unknown = sorted(set(self.strategies) - set(STRATEGIES))
        if unknown or not self.strategies or len(set(self.strategies)) != len(self.strategies):
            raise IloraError(f"strategies {self.strategies}: expected distinct values among {', '.join(STRATEGIES)}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise IloraError(f"methods {self.methods}: expected one or more distinct merge methods")
        for key in ("trials", "rows", "general_rows", "batch_size"):
            if getattr(self, key) < 1:
                raise IloraError(f"{key} {getattr(self, key)}: must be at least 1")
        if not (math.isfinite(self.margin_weight) and self.margin_weight >= 0):
            raise IloraError(f"margin_weight {self.margin_weight}: must be a finite number >= 0")
        bad = [w for w in self.weights if not (math.isfinite(w) and w >= 0)]
        if bad:
            raise IloraError(f"weights {self.weights}: {bad[0]} is not a finite number >= 0")


@dataclasses.dataclass(frozen=True)
class Dim:
    """One choice of a setting: ``values`` in order; ``method`` owns it (``None``: the method
    choice itself, or a skill's weight)."""

    name: str
    values: tuple[Any, ...]
    method: str | None = None


class SearchSpace:
    """The discrete settings: dimension 0 is the method, then each searched option of each
    method (``"<method>.<option>"``), then one weight per skill (``"weight.<i>"``).

    Args:
        settings: the methods, option values and weight values.
        n_inputs: the number of adapters (one weight each).

    Raises:
        IloraError: an unknown method or option, or a value the method refuses.
    """

    def __init__(self, settings: TuneSettings, n_inputs: int) -> None:
        from ilora.merge.registry import available_methods, get_method, method_class

        known = available_methods()
        for name in [*settings.methods, *settings.options]:
            if name not in known:
                raise IloraError(f"tune methods/options: {name!r} is not a merge method; known: {', '.join(known)}")
        self.methods = list(settings.methods)
        self.dims = [Dim("method", tuple(self.methods))]
        self.takes_weights: dict[str, bool] = {}
        for method in self.methods:
            defaults = get_method(method).options()
            self.takes_weights[method] = "weights" in defaults and bool(settings.weights)
            for option, values in settings.options.get(method, {}).items():
                where = f"tune options.{method}.{option}"
                if option == "weights":
                    raise IloraError(f"{where}: per-skill weights are tuned by the `weights` key")
                if option not in defaults:
                    raise IloraError(f"{where}: {method} has no option {option!r}; it has {sorted(defaults)}")
                if not isinstance(values, list) or not values:
                    raise IloraError(f"{where}: expected a non-empty list of values, got {values!r}")
                typed = []  # as the method reads them (YAML's "1e-3" is a float), so records compare equal
                for value in values:
                    try:
                        typed.append(getattr(get_method(method, **{option: value}), option))
                    except IloraError as err:
                        raise IloraError(f"{where}: {err}") from err
                grid = with_default(typed, defaults[option])
                self.dims.append(Dim(f"{method}.{option}", tuple(grid), method))
        self.n_weights = n_inputs if any(self.takes_weights.values()) else 0
        weights = tuple(with_default([float(w) for w in settings.weights], 1.0))
        self.dims += [Dim(f"weight.{i}", weights) for i in range(self.n_weights)]
        self.needs_base = {m: method_class(m).needs_base for m in self.methods}

    def default(self) -> State:
        """The first method with its default options and every weight 1."""
        from ilora.merge.registry import get_method

        state = [0]
        for dim in self.dims[1:]:
            default = 1.0 if dim.method is None else getattr(get_method(dim.method), dim.name.split(".", 1)[1])
            state.append(dim.values.index(default))
        return tuple(state)

    def active(self, state: State) -> list[int]:
        """The dimensions that matter under ``state``'s method: its options, and the weights if it takes them."""
        method = self.methods[state[0]]
        own = [d for d, dim in enumerate(self.dims) if dim.method == method]
        weights = list(range(len(self.dims) - self.n_weights, len(self.dims))) if self.takes_weights[method] else []
        return own + weights

    def setting(self, state: State) -> dict[str, Any]:
        """``{"method", "options"}``: the merge a state stands for (only its active dimensions)."""
        method = self.methods[state[0]]
        options = {
            self.dims[d].name.split(".", 1)[1]: self.dims[d].values[state[d]]
            for d in self.active(state)
            if self.dims[d].method is not None
        }
        if self.takes_weights[method]:
            options["weights"] = [self.dims[d].values[state[d]] for d in self.active(state) if self.dims[d].method is None]
        return {"method": method, "options": options}

    def moves(self, state: State) -> list[Move]:
        """Q-learning's actions from ``state``: switch to another method, or move one active
        option or weight to a neighbouring value."""
        moves = [(0, m) for m in range(len(self.methods)) if m != state[0]]
        for d in self.active(state):
            moves += [(d, j) for j in (state[d] - 1, state[d] + 1) if 0 <= j < len(self.dims[d].values)]
        return moves

    def describe(self) -> list[dict[str, Any]]:
        """The dimensions as recorded (a resumed search must have the same)."""
        return [{"name": d.name, "values": list(d.values)} for d in self.dims]


def with_default(values: list[Any], default: Any) -> list[Any]:
    """``values`` with ``default`` added if missing: numbers stay sorted (Q-learning's neighbours
    are the nearest values), other values keep the user's order with the default first."""
    values = list(dict.fromkeys(values))
    if default not in values:
        values = [default, *values]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return sorted(values) if numbers else values


def setting_key(setting: dict[str, Any]) -> str:
    """One string per distinct merge (equal settings are scored once)."""
    return json.dumps(setting, sort_keys=True)


def objective_of(rewards: Mapping[str, float], kind: str) -> float:
    """The minimum or the mean of the per-skill (and general) rewards."""
    values = list(rewards.values())
    return min(values) if kind == "min" else sum(values) / len(values)


# ---------------------------------------------------------------------------------------------
# Strategies


def trial_rng(seed: int, trial: int):
    """The random numbers of one trial: the same whether the search ran at once or was resumed."""
    import numpy as np

    return np.random.default_rng([seed, trial])


def q_update(
    q: dict[tuple[State, Move], float],
    state: State,
    move: Move,
    reward: float,
    next_state: State,
    next_moves: Sequence[Move],
    alpha: float,
    gamma: float,
) -> float:
    """The Q-learning update ``Q(s,a) += α (r + γ max_a' Q(s',a') − Q(s,a))``, in place.

    Args:
        q: the table; missing entries are 0.
        state, move: the state left and the move taken.
        reward: the reward of the step (the objective of ``next_state``'s setting).
        next_state, next_moves: the state reached and its moves.
        alpha, gamma: learning rate and discount.

    Returns:
        The new ``Q(state, move)``.
    """
    best_next = max((q.get((next_state, m), 0.0) for m in next_moves), default=0.0)
    old = q.get((state, move), 0.0)
    q[(state, move)] = old + alpha * (reward + gamma * best_next - old)
    return q[(state, move)]


class QLearningSearch:
    """One walk through the settings from the default, ε-greedy on the Q table (RL-Fusion)."""

    name = "qlearning"

    def __init__(self, space: SearchSpace, settings: TuneSettings) -> None:
        self.space, self.settings = space, settings
        self.q: dict[tuple[State, Move], float] = {}
        self.state: State | None = None

    def observe(self, record: dict) -> None:
        """Learn from a finished trial (a fresh one or one read back from the record)."""
        reached = tuple(record["state"])
        if self.state is not None:
            s = self.settings.qlearning
            q_update(self.q, self.state, tuple(record["move"]), record["objective"], reached,
                     self.space.moves(reached), s.alpha, s.gamma)
        self.state = reached

    def propose(self, trial: int, history: list[dict]) -> tuple[State, dict]:
        """The next state and ``{"move": move}`` (what :meth:`observe` needs back in the record)."""
        rng = trial_rng(self.settings.seed, trial)
        moves = self.space.moves(self.state)
        if rng.random() < self.settings.qlearning.epsilon:
            move = moves[int(rng.integers(len(moves)))]
        else:
            values = [self.q.get((self.state, m), 0.0) for m in moves]
            best = [m for m, v in zip(moves, values) if v == max(values)]
            move = best[int(rng.integers(len(best)))]
        state = list(self.state)
        state[move[0]] = move[1]
        return tuple(state), {"move": list(move)}


class TPESearch:
    """Optuna's TPE over the same dimensions (the method a categorical, each option and weight
    the index of its value), refitted on the whole record before each trial."""

    name = "tpe"

    def __init__(self, space: SearchSpace, settings: TuneSettings) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.space, self.settings = space, settings

    def observe(self, record: dict) -> None:
        """TPE keeps no state of its own: :meth:`propose` reads the whole history."""

    def _distributions(self, state: State) -> tuple[dict[str, Any], dict[str, Any]]:
        from optuna.distributions import CategoricalDistribution, IntDistribution

        space = self.space
        params = {"method": space.methods[state[0]]}
        dists: dict[str, Any] = {"method": CategoricalDistribution(space.methods)}
        for d in space.active(state):
            params[space.dims[d].name] = state[d]
            dists[space.dims[d].name] = IntDistribution(0, len(space.dims[d].values) - 1)
        return params, dists

    def propose(self, trial: int, history: list[dict]) -> tuple[State, dict]:
        import optuna

        # A new sampler seeded by (seed, trial) and the whole history: the proposal depends on
        # nothing else, so a resumed search proposes what an uninterrupted one would.
        seed = int(trial_rng(self.settings.seed, trial).integers(2**31))
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.settings.tpe.startup_trials)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        for record in history:
            params, dists = self._distributions(tuple(record["state"]))
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=record["objective"]))
        asked = study.ask()
        state = list(self.space.default())
        state[0] = self.space.methods.index(asked.suggest_categorical("method", self.space.methods))
        for d in self.space.active(tuple(state)):
            state[d] = asked.suggest_int(self.space.dims[d].name, 0, len(self.space.dims[d].values) - 1)
        return tuple(state), {}


SEARCHES = {"qlearning": QLearningSearch, "tpe": TPESearch}


def read_trials(path: Path) -> list[dict]:
    """The trials recorded in a JSONL file (none if it does not exist)."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise IloraError(f"{path}: line {number} is not JSON; the record is damaged") from None
        if not isinstance(record, dict) or record.get("trial") != number - 1:
            raise IloraError(f"{path}: line {number} is not trial {number - 1}; the record is damaged")
        records.append(record)
    return records


def run_search(
    search,
    space: SearchSpace,
    evaluate: Callable[[dict[str, Any]], dict],
    trials: int,
    path: Path,
    scored: dict[str, tuple[dict, dict]],
    progress: bool = True,
) -> list[dict]:
    """Run one strategy to ``trials`` trials, continuing the record at ``path``.

    Args:
        search: a :class:`QLearningSearch` or :class:`TPESearch`.
        space: the search space.
        evaluate: scores a setting; returns ``{"rewards": {skill: reward}, "objective": x, ...}``.
        trials: the trial count to reach (trial 0 is the default setting).
        path: the strategy's JSONL record, rewritten atomically after every trial.
        scored: ``{setting_key: (result, where)}`` of every setting already scored (all
            strategies); a repeated setting reuses its result (``repeat_of`` says where from).
        progress: show a progress bar.

    Returns:
        The records of all ``trials`` trials.
    """
    from tqdm.auto import tqdm

    records = read_trials(path)
    for record in records:
        search.observe(record)
    bar = tqdm(total=trials, initial=len(records), desc=f"tune-merge {search.name}", unit="trial", disable=not progress)
    for trial in range(len(records), trials):
        state, extra = (space.default(), {}) if trial == 0 else search.propose(trial, records)
        setting = space.setting(state)
        start = time.perf_counter()
        result, repeat_of = scored.get(setting_key(setting), (None, None))
        if result is None:
            result = evaluate(setting)
            scored[setting_key(setting)] = (result, {"strategy": search.name, "trial": trial})
        record = {"trial": trial, "state": list(state), **extra, "setting": setting, **result,
                  "repeat_of": repeat_of, "seconds": round(time.perf_counter() - start, 3)}
        records.append(record)
        search.observe(record)
        atomic_write_text(path, "".join(to_json(r, indent=None) + "\n" for r in records))
        bar.update(1)
        bar.set_postfix(best=f"{max(r['objective'] for r in records):.4g}")
    bar.close()
    return records


# ---------------------------------------------------------------------------------------------
# Scoring


class MergeScorer:
    """Scores merged deltas on the base model, loaded once; the base weights the adapters touch
    are kept (on the CPU) and restored before each merge is added.

    Args:
        adapters: the opened adapters, one per skill.
        base: the resolved base model path.
        heldout: ``{skill (game): rows}`` in the adapters' order; the first ``settings.rows`` are used.
        general: general rows, or ``None``; the first ``settings.general_rows`` are used.
        settings: the tune settings.
    """

    def __init__(self, adapters: list, base: str, heldout: Mapping[str, Sequence[dict]], general, settings: TuneSettings):
        from ilora.experiment.evaluation import resolve_device
        from ilora.models.load import load_vlm

        self.adapters, self.base, self.settings = adapters, base, settings
        self.heldout = {game: [rows[i] for i in range(min(settings.rows, len(rows)))] for game, rows in heldout.items()}
        self.general = None if general is None else [general[i] for i in range(min(settings.general_rows, len(general)))]
        self.model, self.processor = load_vlm(base, settings.dtype, resolve_device(settings.device))
        params = dict(self.model.named_parameters())
        touched = {f"{m}.weight" for a in adapters for m in a.modules}
        self.originals = {key: params[key].detach().to("cpu", copy=True) for key in sorted(touched)}

    def set_delta(self, state) -> None:
        """The base weights, plus ``state``'s ΔW unless it is ``None``."""
        import torch

        from ilora.merge.export import apply_merged_state

        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for key, original in self.originals.items():
                params[key].copy_(original)
        if state is not None:
            apply_merged_state(self.model, state)

    def skill_scores(self, games: Sequence[str]) -> dict[str, dict[str, float]]:
        """Per game: agreement with the expert's actions, mean answer margin, and the score
        ``agreement + margin_weight × margin``."""
        from ilora.atari.agent import VLMAgent
        from ilora.experiment.evaluation import action_agreement, answer_margins

        out = {}
        for game in games:
            rows = self.heldout[game]
            agent = VLMAgent(self.model, self.processor, game, mode="score")
            agreement = action_agreement(agent, rows, len(rows))["agreement"]
            margin = answer_margins(agent, rows, len(rows), self.settings.batch_size)["mean"]
            score = agreement + self.settings.margin_weight * margin
            out[game] = {"agreement": agreement, "margin": margin, "score": score}
        return out

    def general_accuracy(self) -> float:
        """Exact-match accuracy on the general rows."""
        from ilora.general.benchmark import score_general
        from ilora.models.predict import generate_answers

        batch = self.settings.batch_size
        answer = lambda rows: generate_answers(self.model, self.processor, rows, batch_size=batch)  # noqa: E731
        return score_general(answer, self.general, batch_size=batch)["overall"]["accuracy"]

    def merge(self, setting: dict[str, Any]):
        """The setting's merged state, in memory."""
        from ilora.merge import merge_adapters
        from ilora.merge.registry import method_class

        base = self.base if method_class(setting["method"]).needs_base else None
        return merge_adapters(self.adapters, setting["method"], base=base, progress=False, **setting["options"])

    def references(self) -> dict[str, Any]:
        """The unmerged scores: each skill's own adapter on its rows, the base model's general accuracy."""
        from ilora.merge import merge_adapters

        skills = {}
        for adapter, game in zip(self.adapters, self.heldout):
            self.set_delta(merge_adapters([adapter], "sum", progress=False))
            skills[game] = self.skill_scores([game])[game]
        out: dict[str, Any] = {"skills": skills}
        if self.general is not None:
            self.set_delta(None)
            out[GENERAL] = {"accuracy": self.general_accuracy()}
        return out

    def evaluate(self, setting: dict[str, Any], references: dict[str, Any]) -> dict[str, Any]:
        """Score one setting: per skill and general, the score, and the reward (score − reference).

        Returns:
            ``{"scores": {skill: {...}, "general": {"accuracy"}}, "rewards": {skill: x,
            "general": x}, "objective": min or mean of the rewards}``.
        """
        self.set_delta(self.merge(setting))
        scores: dict[str, Any] = self.skill_scores(list(self.heldout))
        rewards = {g: s["score"] - references["skills"][g]["score"] for g, s in scores.items()}
        if self.general is not None:
            scores[GENERAL] = {"accuracy": self.general_accuracy()}
            rewards[GENERAL] = scores[GENERAL]["accuracy"] - references[GENERAL]["accuracy"]
        return {"scores": scores, "rewards": rewards, "objective": objective_of(rewards, self.settings.objective)}


# ---------------------------------------------------------------------------------------------
# Checks, record, outputs


def check_rows(rows, columns: Sequence[str], where: str):
    """Refuse rows without the needed columns, or none at all."""
    names = rows.column_names if hasattr(rows, "column_names") else (list(rows[0]) if len(rows) else [])
    if not len(rows):
        raise IloraError(f"{where}: no rows")
    missing = sorted(set(columns) - set(names))
    if missing:
        raise IloraError(f"{where}: rows lack {missing}; expected {', '.join(columns)}")
    return rows


def check_heldout(heldout: Mapping[str, Sequence[dict]]) -> None:
    """Refuse an unknown game, rows without the held-out columns, or actions the game does not have."""
    from ilora.atari.games import get_game

    for game, rows in heldout.items():
        where = f"held-out rows of {game}"
        names = get_game(game).action_names
        check_rows(rows, HELDOUT_COLUMNS, where)
        actions = rows["action"] if hasattr(rows, "column_names") else [r["action"] for r in rows]
        unknown = sorted(set(actions) - set(names))
        if unknown:
            raise IloraError(f"{where}: actions {unknown} are not {game}'s ({', '.join(names)})")


def rows_digest(rows, n: int) -> str:
    """SHA-256 of the first ``n`` rows (text fields and image pixels): a resumed search must score the same rows."""
    digest = hashlib.sha256()
    for i in range(min(n, len(rows))):
        row = rows[i]
        for key in sorted(row):
            if key == "images":
                for image in row[key]:
                    digest.update(image.tobytes())
            else:
                digest.update(f"{key}={row[key]}".encode())
    return digest.hexdigest()


def check_same_search(recorded: dict, current: dict, path: Path, where: str = "") -> None:
    """Refuse to resume a search whose space, reward or inputs changed, naming the first change."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        for key in [*current, *(k for k in recorded if k not in current)]:  # the space first
            check_same_search(recorded.get(key), current.get(key), path, f"{where}.{key}" if where else key)
    elif recorded != current:
        raise IloraError(
            f"{path}: recorded search differs at {where} ({str(recorded)[:60]} -> {str(current)[:60]}); "
            "give a new --out to search again"
        )


def merge_command(adapters: Sequence[str], setting: dict[str, Any], base: str | None, out: Path) -> str:
    """The ``ilora merge`` command line that writes the setting's merge (every option as ``--option``)."""
    argv = ["ilora", "merge", *map(str, adapters), "--method", setting["method"]]
    for key, value in setting["options"].items():
        argv += ["--option", f"{key}={value if isinstance(value, str) else json.dumps(value, separators=(',', ':'))}"]
    if base is not None:
        argv += ["--base", base]
    return shlex.join([*argv, "--out", str(out)])


def plot_best(path: Path, records: Mapping[str, list[dict]], objective: str) -> None:
    """Best objective so far against trials, one line per strategy, the default dashed."""
    from ilora.experiment.report import figure

    tmp = path.with_name(f".{path.name}.tmp.png")
    title = f"Merge search: best {objective} reward so far"
    with figure(tmp, (5.5, 3.8), title, f"{objective} over skills of (score - unmerged)", "trial") as ax:
        for name, trials in records.items():
            best = [max(r["objective"] for r in trials[: i + 1]) for i in range(len(trials))]
            ax.step(range(len(best)), best, where="post", label=name)
        default = next(iter(records.values()))[0]["objective"]
        ax.axhline(default, color="grey", linestyle="--", linewidth=1, label="default setting (trial 0)")
    os.replace(tmp, path)


@dataclasses.dataclass
class TuneResult:
    """The best setting of a search (``method`` and ``options`` go to ``merge_adapters``)."""

    method: str
    options: dict[str, Any]
    objective: float
    default_objective: float
    strategy: str
    trial: int
    best_per_strategy: dict[str, float]
    command: str
    out: Path


def tune_merge(
    adapters: Sequence[str | os.PathLike],
    base: str | os.PathLike,
    heldout: Mapping[str, Sequence[dict]],
    out: str | os.PathLike,
    settings: TuneSettings | None = None,
    general: Sequence[dict] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TuneResult:
    """Search the merge settings of ``adapters`` by their reward on held-out rows.

    Every input is checked before the model is loaded. Writes ``out/search.json`` (space,
    settings, inputs, unmerged references), ``out/trials-<strategy>.jsonl`` (one line per trial:
    state, setting, scores, rewards, objective, seconds), ``out/best-reward.png`` and
    ``out/best.yaml`` (the best setting and the ``ilora merge`` command that writes it).

    Args:
        adapters: PEFT LoRA adapter folders, one per skill.
        base: the base model folder (or ``builtin``).
        heldout: ``{game: rows}`` in the adapters' order: rows with ``images``, ``context``,
            ``prompt`` and the expert's ``action`` (validation rows, never evaluation episodes).
        out: the output folder (created; with ``resume`` it holds the record to continue).
        settings: the search (default ``TuneSettings()``).
        general: general benchmark rows (``images``, ``prompt``, ``answer``, ``task``), or
            ``None`` to leave general accuracy out of the reward.
        resume: continue the record in ``out`` (its space, reward and inputs must be the same).
        progress: show a progress bar per strategy.

    Returns:
        The best setting over all strategies' trials (ties: the earlier strategy, then trial).
    """
    from ilora.merge.engine import check_base, check_compatible, check_distinct
    from ilora.merge.io import LoraAdapter, open_input
    from ilora.merge.registry import get_method
    from ilora.models.load import resolve_model_path

    settings = settings or TuneSettings()
    out = Path(out)
    if len(adapters) < 2:
        raise IloraError(f"tune-merge: {len(adapters)} adapter(s) given; a merge needs two or more")
    if len(heldout) != len(adapters):
        raise IloraError(f"{len(adapters)} adapters but held-out rows of {len(heldout)} games; give one per adapter, in order")
    space = SearchSpace(settings, len(adapters))
    if "tpe" in settings.strategies:
        try:
            import optuna  # noqa: F401
        except ModuleNotFoundError:
            raise IloraError("strategy tpe needs optuna: pip install 'ilora[tune]'") from None
    sources = [open_input(a) for a in adapters]
    for source in sources:
        if not isinstance(source, LoraAdapter):
            raise IloraError(f"{source.path}: a merged state; tune-merge takes one PEFT LoRA adapter per skill")
    check_compatible(sources)
    described = [s.describe() for s in sources]
    check_distinct(described)
    for method in space.methods:
        get_method(method).check(sources)
    base = resolve_model_path(base)
    check_base(sources, base)
    check_heldout(heldout)
    if general is not None:
        check_rows(general, GENERAL_COLUMNS, "general rows")
    identity = {
        "format": RECORD_FORMAT,
        "version": 1,
        "space": space.describe(),
        "settings": {k: v for k, v in to_dict(settings).items() if k not in ("trials", "strategies", "device")},
        "adapters": described,
        "base": base,
        "skills": {game: rows_digest(rows, settings.rows) for game, rows in heldout.items()},
        GENERAL: None if general is None else rows_digest(general, settings.general_rows),
    }
    record_path = out / SEARCH_RECORD
    if resume:
        if not record_path.is_file():
            raise IloraError(f"--resume: {record_path} does not exist; nothing to resume")
        try:
            recorded = json.loads(record_path.read_text())
        except json.JSONDecodeError:
            raise IloraError(f"--resume: {record_path} is not JSON; the record is damaged") from None
        check_same_search(recorded.get("identity"), identity, record_path)
        for strategy in settings.strategies:
            done = len(read_trials(out / f"trials-{strategy}.jsonl"))
            if done > settings.trials:
                raise IloraError(f"{out}/trials-{strategy}.jsonl: {done} trials recorded, more than trials={settings.trials}")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise IloraError(f"--out {out}: exists and is not an empty folder (pass --resume to continue its search)")
    elif not out.parent.is_dir():
        raise IloraError(f"--out {out}: folder {out.parent} does not exist")

    scorer = MergeScorer(sources, base, heldout, general, settings)
    if resume:
        references = recorded["references"]
    else:
        out.mkdir(exist_ok=True)
        references = scorer.references()
        atomic_write_text(record_path, to_json({"identity": identity, "references": references}))
    scored: dict[str, tuple[dict, dict]] = {}
    for strategy in settings.strategies:
        for record in read_trials(out / f"trials-{strategy}.jsonl"):
            where = {"strategy": strategy, "trial": record["trial"]}
            kept = {k: record[k] for k in ("scores", "rewards", "objective")}
            scored.setdefault(setting_key(record["setting"]), (kept, where))
    records = {}
    for strategy in settings.strategies:
        search = SEARCHES[strategy](space, settings)
        records[strategy] = run_search(
            search, space, lambda s: scorer.evaluate(s, references), settings.trials,
            out / f"trials-{strategy}.jsonl", scored, progress,
        )
    plot_best(out / PLOT, records, settings.objective)
    strategy, best = max(
        ((s, r) for s in settings.strategies for r in records[s]),
        key=lambda item: (item[1]["objective"], -settings.strategies.index(item[0]), -item[1]["trial"]),
    )
    setting = best["setting"]
    command = merge_command(adapters, setting, base if space.needs_base[setting["method"]] else None, out / "merged")
    result = TuneResult(
        method=setting["method"],
        options=setting["options"],
        objective=best["objective"],
        default_objective=records[settings.strategies[0]][0]["objective"],
        strategy=strategy,
        trial=best["trial"],
        best_per_strategy={s: max(r["objective"] for r in records[s]) for s in settings.strategies},
        command=command,
        out=out,
    )
    summary = {k: v for k, v in to_dict(result).items() if k != "out"}
    summary["rewards"] = best["rewards"]
    atomic_write_text(out / BEST_RECORD, yaml.safe_dump(summary, sort_keys=False))
    return result
