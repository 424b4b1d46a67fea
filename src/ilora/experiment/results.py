"""Reading a finished experiment's results: scores, references, the bar, and estimates over seeds.

Retention is measured against random play, ``(score_model - random) / (score_single - random)``
with ``single`` the single-task (plain LoRA) adapter of that game: the paper's plain ratio
``score_merged / score_single`` is meaningless for games with negative scores (Pong). Within
one run its 95% CI comes from a bootstrap over episodes (both scores resampled, 2,000 draws,
fixed seed); over seeds, from resampling seeds and then episodes (:mod:`ilora.experiment.stats`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ilora.experiment import stats
from ilora.experiment.config import ExperimentConfig
from ilora.experiment.plan import iterative_name, stage_kind

BOOTSTRAP = 2000
NEAR_RANDOM = 0.25  # a single-task CI this close to random (share of the expert-random gap) makes retention noisy
BAR_GAP = 0.5  # share of the random-to-expert gap an agent must close for its game's retention to count


def ratio_ci(model: list[float], single: list[float], random: float, seed: int = 0) -> stats.Interval:
    """Retention and its bootstrap 95% CI.

    Args:
        model: the model's episode scores.
        single: the single-task agent's episode scores.
        random: the random policy's mean score.
        seed: seeds the bootstrap.

    Returns:
        ``(mean(model) - random) / (mean(single) - random)`` with its interval; NaN when the
        single-task agent does not beat random.
    """
    m, s = np.asarray(model, float), np.asarray(single, float)
    denom = s.mean() - random
    if len(m) == 0 or len(s) == 0 or denom <= 0:
        return stats.Interval(math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    mb = rng.choice(m, (BOOTSTRAP, len(m))).mean(1) - random
    sb = rng.choice(s, (BOOTSTRAP, len(s))).mean(1) - random
    ok = sb > 0
    draws = mb[ok] / sb[ok]
    lo, hi = (np.percentile(draws, [2.5, 97.5]) if ok.any() else (math.nan, math.nan))
    return stats.Interval(float((m.mean() - random) / denom), float(lo), float(hi))


def fmt(x: float | None, digits: int = 2) -> str:
    """``x`` to ``digits`` decimals; ``n/a`` for None or NaN."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


class Results:
    """Read access to every finished stage's result."""

    def __init__(self, experiment) -> None:
        self.x = experiment
        self.cfg = experiment.cfg
        self.games = list(self.cfg.games)

    def evals(self, model: str) -> dict | None:
        try:
            return self.x.runner.result(f"eval/{model}")
        except (KeyError, FileNotFoundError):
            return None

    def play(self, model: str, game: str) -> dict | None:
        r = self.evals(model)
        return None if r is None else r["play"].get(game)

    def score(self, model: str, game: str) -> stats.Interval | None:
        """``model``'s mean score on ``game`` with its 95% t-interval (None: not played)."""
        return score_interval(self.play(model, game))

    def reference(self, game: str, who: str) -> dict:
        return self.x.runner.result(f"eval/reference/{game}")[who]

    def retention(self, model: str, game: str, single: str | None = None) -> stats.Interval:
        single = single or f"plain/{game}"
        m, s = self.play(model, game), self.play(single, game)
        if m is None or s is None:
            return stats.Interval(math.nan, math.nan, math.nan)
        return ratio_ci(m["scores"], s["scores"], self.reference(game, "random")["mean"], self.cfg.seed)

    def gap_closed(self, model: str, game: str) -> float:
        p, r, e = self.play(model, game), self.reference(game, "random")["mean"], self.reference(game, "expert")["mean"]
        return math.nan if p is None or e <= r else (p["mean"] - r) / (e - r)

    def bar_failures(self, game: str) -> list[str]:
        """Why ``game``'s retention means nothing (empty when it meets the bar).

        The bar: the single-task and the routed agent (where the experiment trains one for
        ``game``) each close at least half of the random-to-expert gap, with the 95% CI of their
        score above random's mean score.
        """
        random = self.reference(game, "random")["mean"]
        why = []
        for kind in ("plain", "routed") if game in self.cfg.routed_games() else ("plain",):
            model = f"{kind}/{game}"
            p, gap = self.play(model, game), self.gap_closed(model, game)
            if p is None:
                why.append(f"{kind}: not played")
                continue
            if not gap >= BAR_GAP:
                why.append(f"{kind} closes {fmt(gap)} of the gap")
            if not p["ci_low"] > random:
                why.append(f"{kind} CI low {p['ci_low']:.1f} <= random {random:.1f}")
        return why


def score_interval(summary: dict | None) -> stats.Interval | None:
    """A play summary's mean score and 95% t-interval (None for no summary)."""
    return None if not summary else stats.Interval(summary["mean"], summary["ci_low"], summary["ci_high"])


def stage_minutes(experiment) -> dict[str, float]:
    """Minutes of each stage's own run time (its first computation), summed by the kind of stage
    (:func:`ilora.experiment.plan.stage_kind`; the base model's copy under ``base``)."""
    totals: dict[str, float] = {}
    kinds = [("base", "base"), *((stage_kind(spec), spec.stage) for spec in experiment.plan.specs())]
    for kind, stage in kinds:
        record = experiment.runner.folder(stage) / "stage.json"
        if record.is_file():
            totals[kind] = totals.get(kind, 0.0) + json.loads(record.read_text())["seconds"] / 60
    return totals


def own_routed(game: str) -> str:
    return f"routed/{game}"


def own_refit(game: str) -> str:
    return f"refit/{game}"


class SeedResults:
    """The replicates' results side by side, with one set of seed picks for every estimate."""

    def __init__(self, config: ExperimentConfig, experiments: Sequence[Any]) -> None:
        self.cfg = config
        self.games = list(config.games)
        self.seeds = [x.cfg.seed for x in experiments]
        self.results = [Results(x) for x in experiments]
        self.rng = np.random.default_rng(config.seed)
        self.picks = stats.seed_picks(len(self.results), self.rng)
        self.bar = {g: [not r.bar_failures(g) for r in self.results] for g in self.games}

    def cells(self, model: str | Callable[[str], str], game: str, bar_only: bool) -> list[stats.SeedCell] | None:
        """Per seed, the cell of ``model`` on ``game``; seeds where the game misses the bar are
        left out when ``bar_only`` (their slot in the picks becomes undefined). ``None`` when a
        seed did not play it."""
        name = model(game) if callable(model) else model
        cells = []
        for res, meets in zip(self.results, self.bar[game]):
            played, single = res.play(name, game), res.play(f"plain/{game}", game)
            if played is None or single is None:
                return None
            random, expert = res.reference(game, "random")["mean"], res.reference(game, "expert")["mean"]
            scores = np.asarray(played["scores"], float)
            if bar_only and not meets:
                single = {"scores": [random]}  # a zero denominator: undefined in that seed
            cells.append(stats.SeedCell(scores, np.asarray(single["scores"], float), random, expert))
        return cells

    def retention(self, model, game: str) -> stats.Estimate:
        cells = self.cells(model, game, bar_only=True)
        return stats.retention(cells, self.picks, self.rng) if cells else _missing(self.picks)

    def normalised(self, model, game: str) -> stats.Estimate:
        cells = self.cells(model, game, bar_only=False)
        return stats.normalised_score(cells, self.picks, self.rng) if cells else _missing(self.picks)

    def general(self, model: str | Callable[[str], str]) -> float:
        """Mean general accuracy over seeds (NaN for a model per game, or one not scored in every seed)."""
        if callable(model):
            return math.nan
        values = [(r.evals(model) or {}).get("general", {}).get("accuracy") for r in self.results]
        finite = [v for v in values if v is not None]
        return float(np.mean(finite)) if len(finite) == len(values) else math.nan


def _missing(picks: np.ndarray) -> stats.Estimate:
    return stats.Estimate(math.nan, math.nan, math.nan, np.full(picks.shape[0], np.nan))


def merged_models(cfg: ExperimentConfig) -> dict[str, str | Callable[[str], str]]:
    """Label -> model of every merge of all the routed adapters (one-shot, iterative, tuned) and
    of the refit and continual ones, the selection rules, then the references they are compared
    with (the joint adapter, each game's own routed or refit adapter)."""
    games = list(cfg.games)
    models = {m: f"merge/{m}" for m in cfg.merge.methods}
    for method in (["ilora"] if cfg.merge.iterative else []) + list(cfg.merge.iterative_methods):
        models[f"{method} (iterative)"] = iterative_name(method, games, len(games))
    if cfg.refit.enabled:
        models.update({f"{m} of refit adapters": f"merge-refit/{m}" for m in cfg.refit.methods})
    if cfg.continual.enabled:
        models.update({f"{m} of continual adapters": f"merge-continual/{m}" for m in cfg.continual.methods})
    if cfg.tuned_merge.enabled:
        models["merge tuned by reward"] = "tuned-merge"
    models.update({f"skill chosen per input: {rule}": f"select/{rule}" for rule in cfg.selection.rules})
    if cfg.adapters.joint:
        models["joint multi-task LoRA"] = "joint"
    if cfg.adapters.routed:
        models["routed single-game adapters"] = own_routed
    if cfg.refit.enabled:
        models["refit single-game adapters"] = own_refit
    return models


def near_random(res: Results, games: Sequence[str]) -> list[str]:
    """Games whose single-task score's 95% CI reaches within ``NEAR_RANDOM`` of the
    random-to-expert gap above random: small, uncertain retention denominators."""
    near = []
    for g in games:
        single, random, expert = res.play(f"plain/{g}", g), res.reference(g, "random")["mean"], res.reference(g, "expert")["mean"]
        if single is not None and expert > random and single["ci_low"] - random < NEAR_RANDOM * (expert - random):
            near.append(g)
    return near
