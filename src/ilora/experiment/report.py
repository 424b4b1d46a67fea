"""The experiment's report: the paper's tables on our setting, as Markdown plus PNG plots
(how retention and its intervals are computed: :mod:`ilora.experiment.results`).

:func:`run_tables` computes every table of one run as numbers (:class:`RunTables`), the
``*_lines`` functions render them to Markdown, and ``summary.json`` holds the same numbers
(:func:`to_json`: intervals as ``{value, low, high}``, undefined values as ``null``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ilora.experiment import stats
from ilora.experiment.config import ExperimentConfig
from ilora.experiment.results import (
    BAR_GAP,
    NEAR_RANDOM,
    Results,
    SeedResults,
    fmt,
    merged_models,
    near_random,
    score_interval,
    stage_minutes,
)
from ilora.experiment.stats import Interval

# The paper's Table 4 (retention after merging four games), for reference only: its games
# and scale differ from ours.
PAPER_RETENTION = {
    "I-LoRA (paper)": {"ChopperCommand": 0.328, "Asterix": 0.179, "BattleZone": 0.552, "CrazyClimber": 0.182},
    "best PEFT type (paper, at most)": {"ChopperCommand": 0.203, "Asterix": 0.203, "BattleZone": 0.203, "CrazyClimber": 0.203},
    "joint fine-tuning (paper)": {"ChopperCommand": 0.693, "Asterix": 0.162, "BattleZone": 0.828, "CrazyClimber": 0.454},
}
ModelRef = str | Callable[[str], str]  # one model, or each game's own model


# ------------------------------------------------------------------ numeric tables


@dataclass
class SingleTaskRow:
    """Paper Table 1 for one game: mean scores with 95% t-intervals (None: not played).

    Attributes:
        hns: the single-task agent's human-normalised score (NaN: not played).
        plain_gap_closed, routed_gap_closed: ``(agent - random) / (expert - random)``.
        bar_failures: why the game's retention means nothing (empty: it meets the bar).
    """

    random: Interval
    expert: Interval
    base: Interval | None
    plain: Interval | None
    hns: float
    plain_gap_closed: float
    routed: Interval | None
    routed_gap_closed: float
    bar_failures: list[str]


@dataclass
class RetentionRow:
    """Retention per game (bootstrap 95% CI over episodes) and its mean over the games that
    meet the bar (point estimates; NaN when none is finite)."""

    retention: dict[str, Interval]
    mean: float


@dataclass
class MergeRow(RetentionRow):
    """A Table 4 row; also, over the games that meet the bar, the minimum retention and the mean
    expert-normalised score (episode bootstrap, paired over games)."""

    min: Interval
    normalised_mean: Interval


@dataclass
class BestOf:
    """The label(s) with the highest value to 2 decimals (ties all listed) and that value."""

    labels: list[str]
    value: float


@dataclass
class MergeTable:
    """Paper Table 4: every merge beside the joint adapter and the single-game adapters.

    Attributes:
        best: ranked by mean retention, every row but the last.
        best_per_game: the same rows ranked per game on point estimates (NaN for a model per game).
        near_random: games whose single-task 95% CI reaches within ``NEAR_RANDOM`` of random.
    """

    methods: dict[str, MergeRow]
    best: BestOf
    best_per_game: dict[str, BestOf]
    near_random: list[str]


@dataclass
class GeneralAccuracy:
    """Accuracy on the general benchmark with its 95% CI, over ``n`` rows."""

    accuracy: Interval
    n: int


@dataclass
class SelectionRow:
    """One per-input selection rule: pick accuracy on the scored held-out rows, seconds per
    decision against the merged model's, and per game the share of play decisions its own
    adapter took."""

    accuracy: float
    cost_ratio: float
    own_adapter_acted: dict[str, float]


@dataclass
class TunedMerge:
    """The merge tuned by reward: the best trial's setting and its reward against the default's."""

    method: str
    options: dict[str, Any]
    strategy: str
    trial: int
    trials: int
    objective: float
    default_objective: float


@dataclass
class InterferenceCell:
    """One merge on one game's rows: its output change relative to the game's own adapter, the
    answer margin (mean, share positive) on held-out expert rows, and the retention."""

    change: float
    margin: float
    margin_positive: float
    retention: float


@dataclass
class InterferenceTable:
    """``ratio[i][j]``: adapter j's output on game i's rows relative to adapter i's; per merge
    (by label), one cell per game."""

    ratio: list[list[float]]
    merges: dict[str, list[InterferenceCell]]


@dataclass
class KeepSweep:
    """Retention of the I-LoRA merge per keep ratio (``retention[game][i]`` at ``keeps[i]``)."""

    keeps: list[float]
    retention: dict[str, list[float]]


@dataclass
class AblationRow:
    """One loss variant on the ablation pair: its weights, each pair game's gap closed by the
    variant's own adapter, the damage of each adapter to the other game (``[first on second,
    second on first]``), and retention after the I-LoRA merge of the pair."""

    eps_kl: float
    eps_norm: float
    gap_closed: dict[str, float]
    damage: list[float]
    merged_retention: dict[str, float]


@dataclass
class ImageCheck:
    """A routed single-game adapter's score on its game with normal and blanked frames."""

    normal: Interval | None
    blanked: Interval | None


@dataclass
class RunTables:
    """Every number of one run's report, table by table.

    Attributes:
        bar_games: the games that meet the bar (every mean retention is over them).
        routed_vs_single: paper Table 2 (None: the run trains no routed adapter per game).
        damage: adapter -> other game -> score change against the base model.
        general: model -> general benchmark accuracy (paper Table 3).
        selection: rule -> the per-input selection's pick accuracy and cost.
        tuned_merge: None where the run tunes no merge (or its stage is missing).
        interference: None where the run has no interference analysis.
        agreement: model -> game -> share of held-out expert actions picked.
        iterative: label -> retention on the games merged so far (None: no iterative merges).
        activation_norms: adapter kind -> data type -> mean squared LoRA-B output norm (the first game's).
        ablation_pair: the pair the loss ablations run on (empty: none).
        ablations: variant -> its row.
        minutes: stage kind -> minutes of its stages' own run times.
    """

    games: list[str]
    bar_games: list[str]
    single_task: dict[str, SingleTaskRow]
    routed_vs_single: RetentionRow | None
    damage: dict[str, dict[str, float]]
    general: dict[str, GeneralAccuracy]
    merges: MergeTable
    selection: dict[str, SelectionRow]
    tuned_merge: TunedMerge | None
    interference: InterferenceTable | None
    agreement: dict[str, dict[str, float]]
    iterative: dict[str, RetentionRow] | None
    activation_norms: dict[str, dict[str, float]]
    keep_sweep: KeepSweep
    ablation_pair: list[str]
    ablations: dict[str, AblationRow]
    image_check: dict[str, ImageCheck]
    minutes: dict[str, float]


def number(x: float | None) -> float:
    """A stage result's number as a float (NaN for a missing one)."""
    return math.nan if x is None else float(x)


def retention_row(res: Results, model: ModelRef, games: list[str], mean_over: Collection[str]) -> RetentionRow:
    """``model``'s retention on each of ``games`` and its mean over those in ``mean_over``.

    Args:
        res: the run's results.
        model: one model, or a function of the game giving its model.
        games: the games (in column order).
        mean_over: the games the mean is over (their finite values).

    Returns:
        The row.
    """
    model_for = model if callable(model) else (lambda g: model)
    retention = {g: res.retention(model_for(g), g) for g in games}
    finite = [r.value for g, r in retention.items() if g in mean_over and not math.isnan(r.value)]
    return RetentionRow(retention, float(np.mean(finite)) if finite else math.nan)


def best_labels(labels: list[str], values: list[float]) -> BestOf:
    """The label(s) with the highest value to 2 decimals (ties all listed) and that value;
    no label and NaN when no value is finite."""
    rounded = {label: round(v, 2) for label, v in zip(labels, values) if math.isfinite(v)}
    if not rounded:
        return BestOf([], math.nan)
    top = max(rounded.values())
    return BestOf([k for k, v in rounded.items() if v == top], top)


def score_change(res: Results, model: str, game: str) -> float:
    """``model``'s mean score on ``game`` minus the base model's (NaN if either is unplayed)."""
    played, base = res.play(model, game), res.play("base", game)
    return math.nan if played is None or base is None else played["mean"] - base["mean"]


def own_adapter(kind: str) -> Callable[[str], str]:
    """Each game's own single-game adapter of ``kind`` (``plain``, ``routed``)."""
    return lambda game: f"{kind}/{game}"


def single_task_rows(res: Results) -> dict[str, SingleTaskRow]:
    """Paper Table 1 per game: the references, the base and the single-game adapters."""
    rows = {}
    for g in res.games:
        plain = res.play(f"plain/{g}", g)
        rows[g] = SingleTaskRow(
            random=score_interval(res.reference(g, "random")), expert=score_interval(res.reference(g, "expert")),
            base=res.score("base", g), plain=score_interval(plain), hns=number(plain["hns"]) if plain else math.nan,
            plain_gap_closed=res.gap_closed(f"plain/{g}", g), routed=res.score(f"routed/{g}", g),
            routed_gap_closed=res.gap_closed(f"routed/{g}", g), bar_failures=res.bar_failures(g),
        )
    return rows


def merge_table(res: Results, sr: SeedResults, models: dict[str, ModelRef], scored: list[str]) -> MergeTable:
    """Paper Table 4 over ``models`` (label -> model), means over the ``scored`` games."""
    games = res.games
    rows = {}
    for label, model in models.items():
        row = retention_row(res, model, games, scored)
        # Drawn in this order (per label: retention, then normalised): the seed bootstrap's
        # generator is shared, so the order fixes the intervals.
        low = stats.combine([sr.retention(model, g) for g in scored], "min")
        norm = stats.combine([sr.normalised(model, g) for g in scored], "mean")
        rows[label] = MergeRow(row.retention, row.mean, low, norm)
    # The single-game rows (a model per game) are what the others are compared with, not ranked.
    ranked = [label for label in rows if isinstance(models[label], str)]
    return MergeTable(
        methods=rows, best=best_labels(ranked, [rows[label].mean for label in ranked]),
        best_per_game={g: best_labels(ranked, [rows[label].retention[g].value for label in ranked]) for g in games},
        near_random=near_random(res, games),
    )


def selection_rows(res: Results) -> dict[str, SelectionRow]:
    """Per selection rule that was played: pick accuracy, cost, and which adapter acted in play."""
    rows = {}
    for rule in res.cfg.selection.rules:
        r = res.evals(f"select/{rule}")
        if not r:
            continue
        chosen = r["chosen"]
        rows[rule] = SelectionRow(
            accuracy=number(r["selection"]["accuracy"]), cost_ratio=float(r["selection"]["cost_ratio"]),
            own_adapter_acted={g: chosen[g].get(g, 0) / max(1, sum(chosen[g].values())) for g in res.games},
        )
    return rows


def tuned_merge(experiment, cfg: ExperimentConfig) -> TunedMerge | None:
    """The merge tuned by reward (None where the run tunes none or its stage is missing)."""
    if not cfg.tuned_merge.enabled:
        return None
    try:
        t = experiment.runner.result("tuned-merge")
    except (KeyError, FileNotFoundError):
        return None
    return TunedMerge(t["method"], t["options"], t["strategy"], t["trial"], t["trials"], number(t["objective"]),
                      number(t["default_objective"]))


def interference_table(experiment, res: Results, models: dict[str, ModelRef]) -> InterferenceTable | None:
    """The interference analysis beside margins and retention (None where the run has none)."""
    try:
        data = experiment.runner.result("analysis/interference")
    except (KeyError, FileNotFoundError):
        return None
    label_of = {model: label for label, model in models.items() if isinstance(model, str)}
    merges = {}
    for model, changes in data["merged"].items():
        cells = []
        for g, change in zip(res.games, changes):
            margin = ((res.evals(model) or {}).get("margin") or {}).get(g) or {}
            cells.append(InterferenceCell(number(change), number(margin.get("mean")), number(margin.get("positive")),
                                          res.retention(model, g).value))
        merges[label_of.get(model, model)] = cells
    return InterferenceTable([[number(v) for v in row] for row in data["ratio"]], merges)


def activation_norms(experiment, game: str) -> dict[str, dict[str, float]]:
    """Kind (``plain``, ``routed``) -> data type -> mean LoRA-B output norm of ``game``'s adapter
    of that kind, where it was analysed."""
    norms = {}
    for kind in ("plain", "routed"):
        try:
            data = experiment.runner.result(f"analysis/{kind}/{game}")["table"]["data"]
        except (KeyError, FileNotFoundError):
            continue
        norms[kind] = {t: float(d["average"]) for t, d in data.items()}
    return norms


def keep_sweep(res: Results) -> KeepSweep:
    """Retention of the I-LoRA merge at each keep ratio (the run's own and the sweep's)."""
    cfg = res.cfg
    keeps = sorted({cfg.merge.keep, *cfg.merge.keep_sweep})
    names = {k: ("merge/ilora" if k == cfg.merge.keep else f"keep/{k:g}") for k in keeps}
    return KeepSweep(keeps, {g: [res.retention(names[k], g).value for k in keeps] for g in res.games})


def ablation_rows(res: Results, pair: list[str]) -> dict[str, AblationRow]:
    """Plain, routed and every loss variant on the ablation ``pair`` (empty without a pair)."""
    if not pair:
        return {}
    cfg = res.cfg
    weights = {"plain": cfg.train.loss_weights.plain(), "routed": cfg.train.loss_weights,
               **cfg.ablations.loss_weights(cfg.train)}
    rows = {}
    for variant, w in weights.items():
        prefix = variant if variant in ("plain", "routed") else f"ablation/{variant}"
        rows[variant] = AblationRow(
            w.eps_kl, w.eps_norm, {g: res.gap_closed(f"{prefix}/{g}", g) for g in pair},
            [score_change(res, f"{prefix}/{pair[0]}", pair[1]), score_change(res, f"{prefix}/{pair[1]}", pair[0])],
            {g: res.retention(f"ablation-merge/{variant}", g).value for g in pair},
        )
    return rows


def run_tables(experiment, res: Results, sr: SeedResults, models: dict[str, ModelRef]) -> RunTables:
    """Every table of one run's report, as numbers.

    Args:
        experiment: the finished run (its stage results are read).
        res: its results.
        sr: the same run as a one-seed :class:`SeedResults` (Table 4's paired bootstrap).
        models: Table 4's label -> model (:func:`merged_models`).

    Returns:
        The tables.
    """
    cfg, games = res.cfg, res.games
    single = single_task_rows(res)
    scored = [g for g in games if not single[g].bar_failures]
    general = {}
    for model in ["base", *[f"{k}/{g}" for k in ("plain", "routed") for g in games], "joint", "merge/ilora"]:
        r = res.evals(model)
        if r:
            s = r["general"]
            general[model] = GeneralAccuracy(Interval(s["accuracy"], s["ci95_low"], s["ci95_high"]), s["n"])
    agreement_models = ["base", *[f"plain/{g}" for g in games], *[f"routed/{g}" for g in games],
                        *[m for m in models.values() if isinstance(m, str)]]
    iterative = None
    if cfg.merge.iterative:
        iterative = {}
        for order in [list(games), *[list(o) for o in cfg.merge.orders]]:
            tag = "-".join(order)
            for k in range(2, len(order) + 1):
                iterative[f"{tag} after {k}"] = retention_row(res, f"iter/{tag}/{k}", order[:k], scored)
    pair = cfg.ablation_pair()
    return RunTables(
        games=games, bar_games=scored, single_task=single,
        routed_vs_single=retention_row(res, own_adapter("routed"), games, scored) if cfg.adapters.routed else None,
        damage={f"{kind}/{g}": {other: score_change(res, f"{kind}/{g}", other) for other in games if other != g}
                for kind in ("plain", "routed") for g in games},
        general=general, merges=merge_table(res, sr, models, scored), selection=selection_rows(res),
        tuned_merge=tuned_merge(experiment, cfg), interference=interference_table(experiment, res, models),
        agreement={m: {g: number((res.evals(m) or {}).get("agreement", {}).get(g, {}).get("agreement")) for g in games}
                   for m in agreement_models},
        iterative=iterative, activation_norms=activation_norms(experiment, games[0]), keep_sweep=keep_sweep(res),
        ablation_pair=pair, ablations=ablation_rows(res, pair),
        image_check={g: ImageCheck(score_interval((res.evals(f"routed/{g}") or {}).get("play", {}).get(g)),
                                   score_interval((res.evals(f"routed/{g}") or {}).get("blank", {}).get(g)))
                     for g in games},
        minutes=stage_minutes(experiment),
    )


def to_json(obj: Any) -> Any:
    """``obj`` (dataclasses, intervals, dicts, lists, numbers) as JSON-able data: intervals as
    ``{value, low, high}``, NaN as ``None`` (JSON has no NaN)."""
    if isinstance(obj, Interval):
        return obj.as_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


# ------------------------------------------------------------------ rendering


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def score_cell(score: Interval | None) -> str:
    """A mean score with its interval to one decimal, e.g. ``"3.0 [1.2, 4.8]"``."""
    return "n/a" if score is None else f"{score.value:.1f} [{score.low:.1f}, {score.high:.1f}]"


def interval_cell(e: Interval) -> str:
    """A retention-like value with its interval to two decimals, e.g. ``"0.52 [0.31, 0.77]"``."""
    return f"{fmt(e.value)} [{fmt(e.low)}, {fmt(e.high)}]"


def change_cell(x: float) -> str:
    """A signed score change to one decimal, e.g. ``"-7.0"`` (``n/a`` for NaN)."""
    return "n/a" if math.isnan(x) else f"{x:+.1f}"


def best_cell(best: BestOf) -> str:
    """E.g. ``"ilora, joint (1.00)"``; ``n/a`` when nothing is ranked."""
    return ", ".join(best.labels) + f" ({best.value:.2f})" if best.labels else "n/a"


def ilora_remark(best: list[str]) -> str:
    """What the best-mean line adds about I-LoRA: nothing when it wins alone (or nothing won)."""
    if not best or best == ["ilora"]:
        return ""
    return " (a tie)" if "ilora" in best else " (I-LoRA is not the best here)"


def retention_cells(row: RetentionRow) -> list[str]:
    """A retention row's per-game cells then its mean."""
    return [*[interval_cell(r) for r in row.retention.values()], fmt(row.mean)]


@contextlib.contextmanager
def figure(path: Path, size: tuple[float, float], title: str, ylabel: str, xlabel: str = ""):
    """A matplotlib axes saved to ``path`` (PNG) when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    yield ax
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_line(path: Path, xs: list[float], ys: dict[str, list[float]], xlabel: str, ylabel: str, title: str) -> None:
    with figure(path, (5, 3.6), title, ylabel, xlabel) as ax:
        for name, values in ys.items():
            ax.plot(xs, values, marker="o", label=name)


def bar_retention(sr: SeedResults, models: dict[str, ModelRef], games: list[str]) -> dict[str, dict[str, stats.Estimate]]:
    """Label -> game -> retention over seeds x episodes (undefined where the game misses the bar):
    what :func:`plot_retention` draws. Drawn game by game, after the tables' estimates."""
    cells: dict[str, dict[str, stats.Estimate]] = {label: {} for label in models}
    for game in games:
        for label, model in models.items():
            cells[label][game] = sr.retention(model, game)
    return cells


def plot_retention(path: Path, seeds: list[int], cells: dict[str, dict[str, Interval]], games: list[str]) -> None:
    """Grouped bars of retention per method (``cells``: label -> game -> retention) with their
    two-level 95% intervals."""
    labels = list(cells)
    width = 0.8 / len(games)
    with figure(path, (max(7.0, 0.6 * len(labels) + 2), 4.5),
                f"Retention after merging, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} "
                "(95% intervals over seeds x episodes; no bar: the game misses the bar)",
                "retention") as ax:
        for i, game in enumerate(games):
            values, lows, highs = [], [], []
            for label in labels:
                e = cells[label][game]
                values.append(0.0 if math.isnan(e.value) else e.value)
                lows.append(0.0 if math.isnan(e.low) else max(0.0, e.value - e.low))
                highs.append(0.0 if math.isnan(e.high) else max(0.0, e.high - e.value))
            ax.bar(np.arange(len(labels)) + i * width, values, width, yerr=[lows, highs], capsize=2, label=game)
        ax.set_xticks(np.arange(len(labels)) + width * (len(games) - 1) / 2)
        ax.set_xticklabels(labels, rotation=30, ha="right")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")


def header_lines(cfg: ExperimentConfig) -> list[str]:
    """The report's title and what was played how."""
    e = cfg.eval
    return [f"# ilora experiment report: `{cfg.run_dir}`", "",
            f"Games: {', '.join(cfg.games)}. Base: `{cfg.base}`. Object-state text in the prompt: **{cfg.data.object_text}**; "
            f"answers: {'reasoning + action' if cfg.data.reasoning else 'direct action'}. "
            f"Play: {e.episodes} episodes per cell"
            + (f" ({e.own_game_episodes} for the random and expert references and for each single-game adapter on its "
               "own game)" if e.own_game_episodes else "")
            + f", capped at {e.max_frames} emulator frames, "
            f"sticky actions 0.25, FireReset {'on' if e.fire_on_reset else 'off'}. "
            "Scores are means with 95% t-intervals over episodes; retention is random-baselined "
            "`(model - random) / (single-task - random)` with a bootstrap 95% CI (see `ilora.experiment.report`).", ""]


def single_task_lines(t: RunTables) -> list[str]:
    """Paper Table 1 and the bar."""
    rows = [[g, score_cell(r.random), score_cell(r.expert), score_cell(r.base), score_cell(r.plain), fmt(r.hns),
             fmt(r.plain_gap_closed), score_cell(r.routed), fmt(r.routed_gap_closed), "no" if r.bar_failures else "yes"]
            for g, r in t.single_task.items()]
    scored = t.bar_games
    return ["## 1. Single-task agents (paper Table 1)", "",
            table(["game", "random", "expert", "base", "single-task LoRA", "HNS", "gap closed", "routed LoRA", "gap closed",
                   "meets the bar"], rows),
            "", f"`gap closed` = (agent - random) / (expert - random). The bar for a meaningful retention: the single-task "
            f"and the routed agent each close at least {BAR_GAP:g} of the gap, with the 95% CI of their score above "
            "random's mean. Every mean retention below is over the games that meet it"
            + (f": {', '.join(scored)}." if scored else "; none does, so every mean is n/a.")
            + "".join(f" {g} does not ({'; '.join(r.bar_failures)}): its retention is shown, and means nothing."
                      for g, r in t.single_task.items() if r.bar_failures), ""]


def routed_and_damage_lines(t: RunTables) -> list[str]:
    """Paper Table 2 and each single-game adapter's damage to the other games."""
    games = t.games
    rows = [[adapter, *["—" if other not in changes else change_cell(changes[other]) for other in games]]
            for adapter, changes in t.damage.items()]
    return ["## 2. Routing-tuned vs single-task (paper Table 2)", "",
            table(["", *games, "mean"], [["routed / single-task", *retention_cells(t.routed_vs_single)]])
            if t.routed_vs_single else "This run trains a routed adapter for the first game only (`adapters.routed: false`).",
            "", "### Damage to the other games", "",
            "Mean score of a one-game adapter on each other game minus the base model's score there "
            "(0 = no change; negative = forgetting).", "",
            table(["adapter", *games], rows), ""]


def general_lines(t: RunTables) -> list[str]:
    """Paper Table 3."""
    rows = [[model, f"{a.accuracy.value:.3f} [{a.accuracy.low:.3f}, {a.accuracy.high:.3f}]", str(a.n)]
            for model, a in t.general.items()]
    return ["## 3. General benchmark accuracy (paper Table 3)", "", table(["model", "accuracy [95% CI]", "n"], rows), ""]


def merge_lines(t: RunTables) -> list[str]:
    """Paper Table 4, who is best, and the noisy denominators."""
    m, games = t.merges, t.games
    rows = [[label, *retention_cells(r), fmt(r.min.value), fmt(r.normalised_mean.value)] for label, r in m.methods.items()]
    md = ["## 4. Retention after merging all games (paper Table 4)", "",
          table(["method", *games, "mean", "min over games", "expert-normalised (mean)"], rows), "",
          f"Best mean retention: **{', '.join(m.best.labels) or 'n/a'}**{ilora_remark(m.best.labels)}. "
          "A mean over games can hide a loss on one game (hence the minimum), and a small single-task denominator "
          "can inflate a retention (the expert-normalised score `(model - random) / (expert - random)` has none); "
          "the best per game (point estimates, ties listed): "
          + "; ".join(f"{g}: {best_cell(m.best_per_game[g])}" for g in games) + ".", ""]
    if m.near_random:
        md += [f"Single-task denominators whose 95% CI reaches within {NEAR_RANDOM:g} of the expert-random gap above "
               f"random (their retentions are noisy): {', '.join(m.near_random)}.", ""]
    return md


def selection_lines(t: RunTables, cfg: ExperimentConfig) -> list[str]:
    """The per-input selection rules (pick accuracy, cost per decision against the merged model's,
    which skill acted in play) and the merge tuned by reward (its setting and search budget)."""
    md = []
    if t.selection:
        rows = [[rule, fmt(r.accuracy), f"{r.cost_ratio:.2f}x",
                 ", ".join(f"{g}: {fmt(share)}" for g, share in r.own_adapter_acted.items())]
                for rule, r in t.selection.items()]
        md += ["### Skills chosen per input", "",
               "Every game's routed adapter loaded side by side, one chosen per step (no merge); the rows above name "
               "each rule's retention. Pick accuracy: share of the held-out rows the report scores agreement on "
               "where the rule picks the row's own game's adapter; cost: seconds per decision against a merged "
               "model's on those rows; in play: share of decisions taken by the game's own adapter.", "",
               table(["rule", "pick accuracy", "cost per decision vs merged", "own adapter acted in play"], rows), ""]
    if (tm := t.tuned_merge) is not None:
        search = cfg.tuned_merge.search
        options = ", ".join(f"{k}={v}" for k, v in tm.options.items()) or "defaults"
        md += ["### Merge tuned by reward", "",
               f"{tm.trials} trials ({', '.join(search.strategies)}, objective: the "
               f"{search.objective} over games and general accuracy of a cheap reward on validation rows, "
               f"apart from every scored row and episode): best `{tm.method}` ({options}) from {tm.strategy} trial "
               f"{tm.trial}, reward {fmt(tm.objective, 3)} against {fmt(tm.default_objective, 3)} for the default "
               "setting (trial 0). Its row above is played like the untuned merges.", ""]
    return md


def interference_lines(t: RunTables, folder: Path) -> list[str]:
    """Interference in activations beside retention: how far each merge moves each routed adapter's
    output on its own game's rows, and the answer margin that output has to spare (and its plot)."""
    if t.interference is None:
        return []
    games = t.games
    md = ["### Interference in activations", "",
          "Per pair of routed adapters, `||dW_j X_i|| / ||dW_i X_i||`: adapter j's output on game i's rows (inputs of every "
          "LoRA module, measured in adapter i's model; norms summed over modules) relative to game i's own adapter. "
          "Weight-space cosines do not see this; a merged model adds every adapter's output on one row.", "",
          table(["rows of / adapter", *games], [[g, *[fmt(v) for v in row]] for g, row in zip(games, t.interference.ratio)]),
          "", "Per merge, `||(dW_merged - dW_i) X_i|| / ||dW_i X_i||` (0: game i's adapter acts unchanged on its rows) and, "
          "after `/`, the answer margin on game i's held-out expert rows (mean of the expert action's score minus the "
          "best other action's, and the share of rows where it is positive), then the retention from Table 4.", ""]
    rows = [[label, *[f"{fmt(c.change)} / {fmt(c.margin)} ({fmt(c.margin_positive)}) / {fmt(c.retention)}" for c in cells]]
            for label, cells in t.interference.merges.items()]
    md += [table(["merge", *games], rows), ""]
    points = [(c.change, c.retention, g) for cells in t.interference.merges.values() for g, c in zip(games, cells)
              if math.isfinite(c.change) and math.isfinite(c.retention)]
    if points:
        with figure(folder / "interference.png", (5.5, 4), "Output change on a game's rows vs its retention",
                    "retention", "||(dW_merged - dW_i) X_i|| / ||dW_i X_i||") as ax:
            for g in games:
                mine = [(x, y) for x, y, game in points if game == g]
                ax.scatter([x for x, _ in mine], [y for _, y in mine], label=g)
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        md += ["![interference](interference.png)", ""]
    return md


def agreement_lines(t: RunTables) -> list[str]:
    """The paper's retention for reference, then offline agreement with held-out expert actions."""
    return ["![retention](retention.png)", "", "Paper, for reference (other games, a 7B model):", "",
            table(["", *PAPER_RETENTION["I-LoRA (paper)"]],
                  [[k, *[f"{v:.3f}" for v in d.values()]] for k, d in PAPER_RETENTION.items()]), "",
            "### Offline agreement with held-out expert actions", "",
            "Share of held-out expert steps where the model picks the expert's action, by the same scoring it plays "
            "with. A cheap second metric on the expert's own states: it does not see where the model's own play "
            "leads, and it did not predict play in earlier measurements, so it ranks nothing on its own.", "",
            table(["model", *t.games], [[m, *[fmt(v) for v in by_game.values()]] for m, by_game in t.agreement.items()]), ""]


def iterative_lines(t: RunTables) -> list[str]:
    """Paper Table 5 (nothing where the run merges no game at a time)."""
    if t.iterative is None:
        return []
    n = len(t.games)
    rows = [[label, *[interval_cell(r) for r in row.retention.values()], *[""] * (n - len(row.retention)), fmt(row.mean)]
            for label, row in t.iterative.items()]
    return ["## 5. Iterative I-LoRA merging (paper Table 5)", "",
            "Each row merges the next game's routed adapter into the saved merged state; retention on the games merged so far.", "",
            table(["order / games merged", *[f"game {i + 1}" for i in range(n)], "mean"], rows), ""]


def activation_lines(t: RunTables, heatmaps: list[str]) -> list[str]:
    """Paper Table 6 and the heatmaps copied into the report (``heatmaps``: their kinds)."""
    md = ["## 6. LoRA activation norms on task vs general data (paper Table 6, Figure 5)", "",
          f"Mean squared LoRA-B output norm (scaling included), averaged over layers, of `{t.games[0]}`'s adapters on "
          "held-out rows of each data type; the heatmaps show one layer's LoRA-B outputs per position.", ""]
    if t.activation_norms:
        types = list(next(iter(t.activation_norms.values())))
        md += [table(["adapter", *types], [[f"{kind}/{t.games[0]}", *[f"{v:.4g}" for v in norms.values()]]
                                           for kind, norms in t.activation_norms.items()]), ""]
        md += [f"![{k} heatmap](heatmap-{k}.png)" for k in heatmaps]
    return [*md, ""]


def keep_and_ablation_lines(t: RunTables, cfg: ExperimentConfig) -> list[str]:
    """Figure 4's keep-ratio sweep and the loss ablations on the ablation pair."""
    k = t.keep_sweep
    md = ["## 7. Keep-ratio sweep (Figure 4) and loss ablations", "",
          table(["keep", *t.games], [[f"{keep:g}", *[fmt(k.retention[g][i]) for g in t.games]] for i, keep in enumerate(k.keeps)]),
          "", "![keep sweep](keep_sweep.png)", ""]
    pair = t.ablation_pair
    if not pair:
        return [*md, "This run merges no ablation pair (`ablations.games` is not two of its games).", ""]
    rows = [[v, f"{r.eps_kl:g}", f"{r.eps_norm:g}", *[fmt(r.gap_closed[g]) for g in pair], *[change_cell(d) for d in r.damage],
             *[fmt(r.merged_retention[g]) for g in pair]] for v, r in t.ablations.items()]
    return [*md, f"Loss ablations on {pair[0]} + {pair[1]}: own-game gap closed, damage to the other game "
            "(mean score change vs the base model; 0 = none), and retention after the I-LoRA merge of the pair.", "",
            table(["variant", "eps_kl", "eps_norm", *[f"gap {g}" for g in pair],
                   f"{pair[0]} adapter on {pair[1]}", f"{pair[1]} adapter on {pair[0]}", *[f"merged: {g}" for g in pair]], rows), "",
            "`routed` is this run's loss weights (`train.eps_kl`, `train.eps_norm`); every other row differs from it only in "
            "the weights shown." if cfg.ablations.variants else
            "This run has no loss-ablation variants (`ablations.variants`); `configs/ablations.yaml` adds KL only, norm "
            "only and the eps sweep to the default run.", ""]


def image_lines(t: RunTables, gifs: list[str]) -> list[str]:
    """Whether the models read the images, and the gameplay GIFs (``gifs``: their file names)."""
    rows = [[g, score_cell(c.normal), score_cell(c.blanked)] for g, c in t.image_check.items()]
    return ["## Do the models read the images?", "",
            "Routed single-game adapters played normally and with both frames blanked (black). With object-state text "
            "in the prompt a small model may act on the text alone; equal scores mean it does.", "",
            table(["game", "normal", "frames blanked"], rows), "",
            "Gameplay (first episode, first steps, the model's action alongside): " + ", ".join(f"[{n}]({n})" for n in gifs), ""]


def compute_lines(minutes: dict[str, float]) -> list[str]:
    """Minutes per kind of stage, largest first."""
    return [f"Compute: {sum(minutes.values()):.1f} min summed over the stages' own run times (first computation of each): "
            + ", ".join(f"{kind} {m:.1f}" for kind, m in sorted(minutes.items(), key=lambda kv: -kv[1])) + ".", ""]


def copy_heatmaps(experiment, t: RunTables, folder: Path) -> list[str]:
    """Copy the analysed adapters' heatmaps into ``folder``; returns the kinds copied."""
    copied = []
    for kind in t.activation_norms:
        png = experiment.runner.folder(f"analysis/{kind}/{t.games[0]}") / "out" / "heatmap.png"
        if png.is_file():
            (folder / f"heatmap-{kind}.png").write_bytes(png.read_bytes())
            copied.append(kind)
    return copied


def copy_gifs(experiment, games: list[str], folder: Path) -> list[str]:
    """Copy each routed adapter's gameplay GIF into ``folder``; returns every GIF's name there, sorted."""
    gifs = [p.name for p in folder.glob("*.gif")]
    for g in games:
        src = experiment.runner.folder(f"eval/routed/{g}") / f"{g}.gif"
        if src.is_file():
            (folder / f"routed-{g}.gif").write_bytes(src.read_bytes())
            gifs.append(f"routed-{g}.gif")
    return sorted(set(gifs))


def write_report(experiment, folder: Path) -> dict[str, Any]:
    """Write ``REPORT.md``, ``summary.json`` (:func:`to_json` of :class:`RunTables`) and the PNGs
    into ``folder``; print Table 4.

    Returns:
        The summary (the report stage's result).
    """
    res = Results(experiment)
    cfg, games = res.cfg, res.games
    models = merged_models(cfg)
    sr = SeedResults(cfg, [experiment])
    t = run_tables(experiment, res, sr, models)
    plot_retention(folder / "retention.png", sr.seeds, bar_retention(sr, models, games), games)
    plot_line(folder / "keep_sweep.png", t.keep_sweep.keeps, t.keep_sweep.retention, "keep ratio", "retention",
              "I-LoRA keep ratio (Figure 4)")
    md = [*header_lines(cfg), *single_task_lines(t), *routed_and_damage_lines(t), *general_lines(t), *merge_lines(t),
          *selection_lines(t, cfg), *interference_lines(t, folder), *agreement_lines(t), *iterative_lines(t),
          *activation_lines(t, copy_heatmaps(experiment, t, folder)), *keep_and_ablation_lines(t, cfg),
          *image_lines(t, copy_gifs(experiment, games, folder)), *compute_lines(t.minutes)]
    (folder / "REPORT.md").write_text("\n".join(md))
    summary = to_json(t)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
    print("\n".join(merge_lines(t)[2:3]))
    return summary
