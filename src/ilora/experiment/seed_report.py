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
from pathlib import Path
from typing import Any

from ilora.experiment import stats
from ilora.experiment.config import ExperimentConfig
from ilora.experiment.report import plot_retention, table
from ilora.experiment.results import SeedResults, estimate_cell, fmt, merged_models, stage_minutes
from ilora.fileio import atomic_dir

KEEP_MEAN, KEEP_MIN = 0.9, 0.8  # "keeps every game": mean retention and every game's retention
GENERAL_TOLERANCE = 0.02  # general accuracy within this of the base's


def write_seed_report(config: ExperimentConfig, experiments: Sequence[Any], out: Path) -> Path:
    """Write ``REPORT.md``, ``summary.json`` and ``retention.png`` over the replicates into ``out``.

    Returns:
        The path of ``REPORT.md``.
    """
    sr = SeedResults(config, experiments)
    games, seeds = sr.games, sr.seeds
    counted = [g for g in games if any(sr.bar[g])]
    md = [f"# ilora experiment report over seeds: `{config.run_dir}`", "",
          f"Seeds {', '.join(map(str, seeds))}: each has its own expert data, adapters, merges and play "
          f"(`seed-<s>/report/REPORT.md`). Every cell is the mean over seeds of the per-seed value, with a 95% "
          f"interval from resampling seeds, then episodes within each seed ({stats.DRAWS} draws). Retention is "
          "`(model - random) / (single-task - random)` per seed; a seed's retention on a game counts only where that "
          "seed's single-task and routed agents (where trained) meet the bar. The expert-normalised score `(model - random) / "
          "(expert - random)` needs no single-task denominator.", ""]

    md += ["## The bar per seed", "",
           table(["game", *[f"seed {s}" for s in seeds]],
                 [[g, *["yes" if ok else "no" for ok in sr.bar[g]]] for g in games]), ""]
    if len(counted) < len(games):
        md += [f"Games that miss the bar in every seed are left out of the means: "
               f"{', '.join(g for g in games if g not in counted)}.", ""]

    base_general = sr.general("base")
    rows, summary_rows, estimates = [], {}, {}
    models = merged_models(config)
    for label, model in models.items():
        per_game = {g: sr.retention(model, g) for g in games}
        normalised = [sr.normalised(model, g) for g in counted]
        mean = stats.combine([per_game[g] for g in counted], "mean")
        low = stats.combine([per_game[g] for g in counted], "min")
        norm = stats.combine(normalised, "mean")
        estimates[label] = mean
        general = sr.general(model)
        general_kept = math.isnan(general) or general >= base_general - GENERAL_TOLERANCE
        keeps = mean.value >= KEEP_MEAN and low.value >= KEEP_MIN and general_kept
        rows.append([label, *[estimate_cell(per_game[g]) for g in games], estimate_cell(mean), estimate_cell(low),
                     estimate_cell(norm), fmt(general, 3), "yes" if keeps else "no"])
        summary_rows[label] = {
            "retention": {g: per_game[g].as_dict() for g in games}, "mean": mean.as_dict(), "min": low.as_dict(),
            "normalised_mean": norm.as_dict(), "general": None if math.isnan(general) else general, "keeps_every_game": keeps,
        }
    md += ["## Retention after merging the adapters of all games", "",
           table(["method", *games, "mean", "min over games", "expert-normalised (mean)", "general acc.",
                  f"keeps every game (mean >= {KEEP_MEAN:g}, min >= {KEEP_MIN:g}, general acc. >= base - "
                  f"{GENERAL_TOLERANCE:g})"], rows), "",
           f"General accuracy of the base: {fmt(base_general, 3)}. "
           f"Means over games are over {', '.join(counted) or 'no game'}.", ""]
    md += [_best_line(estimates), ""]
    # Retention leaves out the games that miss the bar; what a merge does to them still shows here.
    normalised_rows = [[label, *[estimate_cell(sr.normalised(model, g)) for g in games]]
                       for label, model in {"base": "base", **models}.items()]
    md += ["## Expert-normalised score per game", "",
           "`(model - random) / (expert - random)` on every game, those that miss the bar included (0: random play, "
           "1: the expert; below 0: worse than random).", "",
           table(["model", *games], normalised_rows), ""]
    minutes = [stage_minutes(x) for x in experiments]
    kinds = sorted({k for m in minutes for k in m}, key=lambda k: -sum(m.get(k, 0.0) for m in minutes))
    md += ["## Compute", "",
           "Minutes of the stages' own run times (first computation of each), by kind of stage and seed:", "",
           table(["seed", *kinds, "total"], [[str(s), *[f"{m.get(k, 0.0):.1f}" for k in kinds], f"{sum(m.values()):.1f}"]
                                            for s, m in zip(seeds, minutes)]), ""]
    report = "\n".join(md)
    with atomic_dir(out) as tmp:
        (tmp / "REPORT.md").write_text(report)
        plot_retention(tmp / "retention.png", sr, models, games)
        summary = {"seeds": seeds, "games": games, "counted_games": counted, "bar": sr.bar,
                   "base_general": None if math.isnan(base_general) else base_general, "methods": summary_rows}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    print(table(["method", *games, "mean", "min", "normalised", "general", "keeps"], rows))
    return out / "REPORT.md"


def _best_line(estimates: dict[str, stats.Estimate]) -> str:
    """Who has the highest mean retention, called best only where it separates from the runner-up."""
    ranked = sorted(((e.value, label) for label, e in estimates.items() if math.isfinite(e.value)), reverse=True)
    ranked = [(v, label) for v, label in ranked if not label.endswith("single-game adapters")]
    if len(ranked) < 2:
        return "Too few finite mean retentions to rank the methods."
    (top, best), (second, runner_up) = ranked[0], ranked[1]
    if stats.separates(estimates[best], estimates[runner_up]):
        return (f"Best mean retention: **{best}** ({fmt(top)}), ahead of {runner_up} ({fmt(second)}): the 95% interval "
                "of the paired difference over seeds x episodes excludes 0.")
    return (f"Highest mean retention: {best} ({fmt(top)}), but it does not separate from {runner_up} ({fmt(second)}): "
            "the 95% interval of their paired difference includes 0, so no method is called best.")
