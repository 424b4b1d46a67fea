"""The report over seeds: every cell is a mean over replicates with a two-level interval.

Each replicate (``run_dir/seed-<s>``) has its own report; this one reads their results and
gives, per model and game, the mean over seeds of the per-seed score, retention and
expert-normalised score, with 95% intervals from resampling seeds and then episodes
(:mod:`ilora.experiment.stats`). A game's retention in a seed counts only where that seed's
single-task and routed agents (where trained) meet the bar (:meth:`Results.bar_failures`). A method is
called best only where the paired interval of its lead over the runner-up excludes 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ilora.experiment import stats
from ilora.experiment.config import ExperimentConfig
from ilora.experiment.report import ModelRef, bar_retention, interval_cell, plot_retention, table, to_json
from ilora.experiment.results import SeedResults, fmt, merged_models, stage_minutes
from ilora.fileio import atomic_dir

KEEP_MEAN, KEEP_MIN = 0.9, 0.8  # "keeps every game": mean retention and every game's retention
GENERAL_TOLERANCE = 0.02  # general accuracy within this of the base's


@dataclass
class SeedMethodRow:
    """One method over seeds: retention per game and, over the counted games, its mean and
    minimum and the mean expert-normalised score; mean general accuracy over seeds (NaN: a model
    per game, or not scored in every seed); whether it keeps every game (mean, min and general
    accuracy within their thresholds)."""

    retention: dict[str, stats.Estimate]
    mean: stats.Estimate
    min: stats.Estimate
    normalised_mean: stats.Estimate
    general: float
    keeps_every_game: bool


@dataclass
class Ranking:
    """The two highest mean retentions (single-game references left out) and whether the paired
    interval of the leader's lead excludes 0."""

    best: str
    best_value: float
    runner_up: str
    runner_up_value: float
    separates: bool


@dataclass
class SeedTables:
    """Every number of the report over seeds.

    Attributes:
        counted_games: the games that meet the bar in at least one seed (the means are over them).
        bar: game -> per seed, whether it meets the bar.
        base_general: the base model's mean general accuracy over seeds.
        methods: label -> its row (:func:`merged_models`).
        ranking: None when fewer than two mean retentions are finite.
        normalised: model label (the base first) -> game -> expert-normalised score, every game.
        minutes: per seed, stage kind -> minutes of its stages' own run times.
    """

    seeds: list[int]
    games: list[str]
    counted_games: list[str]
    bar: dict[str, list[bool]]
    base_general: float
    methods: dict[str, SeedMethodRow]
    ranking: Ranking | None
    normalised: dict[str, dict[str, stats.Estimate]]
    minutes: list[dict[str, float]]


def method_row(sr: SeedResults, model: ModelRef, counted: list[str], base_general: float) -> SeedMethodRow:
    """One method's row over seeds.

    Args:
        sr: the replicates' results.
        model: the method's model (or each game's own).
        counted: the games its means are over.
        base_general: the base model's mean general accuracy (the keeps-every-game threshold).

    Returns:
        The row.
    """
    per_game = {g: sr.retention(model, g) for g in sr.games}
    normalised = [sr.normalised(model, g) for g in counted]
    mean = stats.combine([per_game[g] for g in counted], "mean")
    low = stats.combine([per_game[g] for g in counted], "min")
    general = sr.general(model)
    general_kept = math.isnan(general) or general >= base_general - GENERAL_TOLERANCE
    keeps = mean.value >= KEEP_MEAN and low.value >= KEEP_MIN and general_kept
    return SeedMethodRow(per_game, mean, low, stats.combine(normalised, "mean"), general, keeps)


def ranking(means: dict[str, stats.Estimate]) -> Ranking | None:
    """Who has the highest mean retention (single-game references left out) and whether it
    separates from the runner-up; None when fewer than two means are finite."""
    ranked = sorted(((e.value, label) for label, e in means.items() if math.isfinite(e.value)), reverse=True)
    ranked = [(v, label) for v, label in ranked if not label.endswith("single-game adapters")]
    if len(ranked) < 2:
        return None
    (top, best), (second, runner_up) = ranked[0], ranked[1]
    return Ranking(best, top, runner_up, second, stats.separates(means[best], means[runner_up]))


def seed_tables(config: ExperimentConfig, sr: SeedResults, experiments: Sequence[Any]) -> SeedTables:
    """Every table of the report over seeds, as numbers (estimates drawn in the report's order)."""
    counted = [g for g in sr.games if any(sr.bar[g])]
    base_general = sr.general("base")
    models = merged_models(config)
    methods = {label: method_row(sr, model, counted, base_general) for label, model in models.items()}
    # Retention leaves out the games that miss the bar; what a merge does to them still shows here.
    normalised = {label: {g: sr.normalised(model, g) for g in sr.games} for label, model in {"base": "base", **models}.items()}
    return SeedTables(sr.seeds, sr.games, counted, sr.bar, base_general, methods,
                      ranking({label: row.mean for label, row in methods.items()}), normalised,
                      [stage_minutes(x) for x in experiments])


def method_lines(t: SeedTables) -> list[str]:
    """The retention table, the base's general accuracy and who is best."""
    rows = [[label, *[interval_cell(r.retention[g]) for g in t.games], interval_cell(r.mean), interval_cell(r.min),
             interval_cell(r.normalised_mean), fmt(r.general, 3), "yes" if r.keeps_every_game else "no"]
            for label, r in t.methods.items()]
    return ["## Retention after merging the adapters of all games", "",
            table(["method", *t.games, "mean", "min over games", "expert-normalised (mean)", "general acc.",
                   f"keeps every game (mean >= {KEEP_MEAN:g}, min >= {KEEP_MIN:g}, general acc. >= base - "
                   f"{GENERAL_TOLERANCE:g})"], rows), "",
            f"General accuracy of the base: {fmt(t.base_general, 3)}. "
            f"Means over games are over {', '.join(t.counted_games) or 'no game'}.", "", ranking_line(t.ranking), ""]


def ranking_line(r: Ranking | None) -> str:
    """Who has the highest mean retention, called best only where it separates from the runner-up."""
    if r is None:
        return "Too few finite mean retentions to rank the methods."
    if r.separates:
        return (f"Best mean retention: **{r.best}** ({fmt(r.best_value)}), ahead of {r.runner_up} ({fmt(r.runner_up_value)}): "
                "the 95% interval of the paired difference over seeds x episodes excludes 0.")
    return (f"Highest mean retention: {r.best} ({fmt(r.best_value)}), but it does not separate from {r.runner_up} "
            f"({fmt(r.runner_up_value)}): the 95% interval of their paired difference includes 0, so no method is called best.")


def seed_report_lines(config: ExperimentConfig, t: SeedTables) -> list[str]:
    """The whole report over seeds, as Markdown lines."""
    games, seeds = t.games, t.seeds
    md = [f"# ilora experiment report over seeds: `{config.run_dir}`", "",
          f"Seeds {', '.join(map(str, seeds))}: each has its own expert data, adapters, merges and play "
          f"(`seed-<s>/report/REPORT.md`). Every cell is the mean over seeds of the per-seed value, with a 95% "
          f"interval from resampling seeds, then episodes within each seed ({stats.DRAWS} draws). Retention is "
          "`(model - random) / (single-task - random)` per seed; a seed's retention on a game counts only where that "
          "seed's single-task and routed agents (where trained) meet the bar. The expert-normalised score `(model - random) / "
          "(expert - random)` needs no single-task denominator.", ""]
    md += ["## The bar per seed", "",
           table(["game", *[f"seed {s}" for s in seeds]], [[g, *["yes" if ok else "no" for ok in t.bar[g]]] for g in games]), ""]
    if len(t.counted_games) < len(games):
        md += [f"Games that miss the bar in every seed are left out of the means: "
               f"{', '.join(g for g in games if g not in t.counted_games)}.", ""]
    md += method_lines(t)
    md += ["## Expert-normalised score per game", "",
           "`(model - random) / (expert - random)` on every game, those that miss the bar included (0: random play, "
           "1: the expert; below 0: worse than random).", "",
           table(["model", *games], [[label, *[interval_cell(e) for e in by_game.values()]]
                                     for label, by_game in t.normalised.items()]), ""]
    kinds = sorted({k for m in t.minutes for k in m}, key=lambda k: -sum(m.get(k, 0.0) for m in t.minutes))
    md += ["## Compute", "",
           "Minutes of the stages' own run times (first computation of each), by kind of stage and seed:", "",
           table(["seed", *kinds, "total"], [[str(s), *[f"{m.get(k, 0.0):.1f}" for k in kinds], f"{sum(m.values()):.1f}"]
                                            for s, m in zip(seeds, t.minutes)]), ""]
    return md


def write_seed_report(config: ExperimentConfig, experiments: Sequence[Any], out: Path) -> Path:
    """Write ``REPORT.md``, ``summary.json`` (:func:`to_json` of :class:`SeedTables`) and
    ``retention.png`` over the replicates into ``out``; print the retention table.

    Returns:
        The path of ``REPORT.md``.
    """
    sr = SeedResults(config, experiments)
    t = seed_tables(config, sr, experiments)
    report = "\n".join(seed_report_lines(config, t))
    with atomic_dir(out) as tmp:
        (tmp / "REPORT.md").write_text(report)
        plot_retention(tmp / "retention.png", sr.seeds, bar_retention(sr, merged_models(config), sr.games), sr.games)
        (tmp / "summary.json").write_text(json.dumps(to_json(t), indent=1, allow_nan=False) + "\n")
    print(method_lines(t)[2])
    return out / "REPORT.md"
