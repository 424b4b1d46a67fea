"""Scores over seeds and episodes: point estimates and a two-level bootstrap.

A replicate (seed) has its own expert data, adapters and play episodes, so the unit of
resampling is the seed; within a seed, episodes are resampled. Every draw first picks the
seeds (the same picks for every cell of a table, so that differences between methods and
means over games are paired), then resamples each picked seed's episodes. With one seed
this is the plain episode bootstrap.

Retention is random-baselined per seed, ``(model - random) / (single - random)``, and then
averaged over seeds; the expert-normalised score ``(model - random) / (expert - random)``
needs no single-task denominator, so a seed whose single-task agent played badly cannot
inflate it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DRAWS = 2000


@dataclass
class SeedCell:
    """One model on one game in one seed: what retention and the normalised score read.

    Attributes:
        scores: the model's episode scores.
        single: the single-task adapter's episode scores (retention's denominator).
        random: the random policy's mean score in that seed's evaluation.
        expert: the scripted expert's mean score there.
    """

    scores: np.ndarray
    single: np.ndarray
    random: float
    expert: float

    def retention(self) -> float:
        denominator = self.single.mean() - self.random
        return math.nan if denominator <= 0 else float((self.scores.mean() - self.random) / denominator)

    def normalised(self) -> float:
        span = self.expert - self.random
        return math.nan if span <= 0 else float((self.scores.mean() - self.random) / span)


@dataclass
class Interval:
    """A point estimate with its 95% interval (NaN where undefined)."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float | None]:
        """JSON-able numbers (``None`` for NaN, which JSON cannot hold)."""
        return {k: (None if math.isnan(v) else v) for k, v in (("value", self.value), ("low", self.low), ("high", self.high))}


@dataclass
class Estimate(Interval):
    """A point estimate with its 95% interval and the bootstrap draws behind it."""

    draws: np.ndarray


def seed_picks(n_seeds: int, rng: np.random.Generator, draws: int = DRAWS) -> np.ndarray:
    """``draws x n_seeds`` seed indices drawn with replacement (all seeds in order when there is one)."""
    return rng.integers(0, n_seeds, size=(draws, n_seeds))


def _resampled_means(values: np.ndarray, rng: np.random.Generator, draws: int) -> np.ndarray:
    return rng.choice(values, (draws, len(values))).mean(1)


def _estimate(point_per_seed: list[float], draws: np.ndarray) -> Estimate:
    finite = [v for v in point_per_seed if math.isfinite(v)]
    value = float(np.mean(finite)) if finite else math.nan
    ok = draws[np.isfinite(draws)]
    low, high = (np.percentile(ok, [2.5, 97.5]) if len(ok) else (math.nan, math.nan))
    return Estimate(value, float(low), float(high), draws)


def _over_seeds(per_seed_draws: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """Mean over the picked seeds of each draw (``per_seed_draws``: ``n_seeds x draws``); a draw
    whose picked seeds are all undefined (NaN) is NaN."""
    chosen = np.take_along_axis(per_seed_draws.T, picks, axis=1)  # draws x n_seeds
    defined = np.isfinite(chosen)
    counts = defined.sum(1)
    sums = np.where(defined, chosen, 0.0).sum(1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def retention(cells: Sequence[SeedCell], picks: np.ndarray, rng: np.random.Generator) -> Estimate:
    """Mean over seeds of the per-seed retention, with its two-level bootstrap interval.

    Args:
        cells: one per seed, in the order the ``picks`` index.
        picks: ``draws x len(cells)`` seed indices (:func:`seed_picks`).
        rng: draws the episode resamples.

    Returns:
        The estimate; a draw whose resampled single-task mean is not above random is
        undefined for that seed and left out of that draw's mean.
    """
    draws = picks.shape[0]
    per_seed = np.empty((len(cells), draws))
    for i, cell in enumerate(cells):
        model = _resampled_means(cell.scores, rng, draws) - cell.random
        single = _resampled_means(cell.single, rng, draws) - cell.random
        with np.errstate(divide="ignore", invalid="ignore"):
            per_seed[i] = np.where(single > 0, model / single, np.nan)
    return _estimate([c.retention() for c in cells], _over_seeds(per_seed, picks))


def normalised_score(cells: Sequence[SeedCell], picks: np.ndarray, rng: np.random.Generator) -> Estimate:
    """Mean over seeds of ``(model - random) / (expert - random)`` with its two-level interval."""
    draws = picks.shape[0]
    per_seed = np.empty((len(cells), draws))
    for i, cell in enumerate(cells):
        span = cell.expert - cell.random
        per_seed[i] = (_resampled_means(cell.scores, rng, draws) - cell.random) / span if span > 0 else np.nan
    return _estimate([c.normalised() for c in cells], _over_seeds(per_seed, picks))


def combine(estimates: Sequence[Estimate], how: str) -> Estimate:
    """The mean or the minimum over games of paired estimates (same seed picks), drawn jointly.

    Args:
        estimates: per game, estimates built with the same ``picks``.
        how: ``"mean"`` or ``"min"``.

    Returns:
        The combined estimate (NaN when any game's value is NaN: a mean over fewer games
        would not be comparable across methods).
    """
    reduce = {"mean": np.mean, "min": np.min}[how]
    if not estimates:  # no game to combine (none meets the bar): undefined, not an error
        return Estimate(math.nan, math.nan, math.nan, np.empty(0))
    values = [e.value for e in estimates]
    value = float(reduce(values)) if values and all(math.isfinite(v) for v in values) else math.nan
    stacked = np.stack([e.draws for e in estimates])
    draws = reduce(stacked, axis=0)
    ok = draws[np.isfinite(draws)]
    low, high = (np.percentile(ok, [2.5, 97.5]) if len(ok) and math.isfinite(value) else (math.nan, math.nan))
    return Estimate(value, float(low), float(high), draws)


def separates(best: Estimate, runner_up: Estimate) -> bool:
    """Whether the 95% interval of the paired difference ``best - runner_up`` lies above 0."""
    diff = best.draws - runner_up.draws
    ok = diff[np.isfinite(diff)]
    return bool(len(ok)) and float(np.percentile(ok, 2.5)) > 0
