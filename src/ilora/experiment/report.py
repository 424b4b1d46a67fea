"""The experiment's report: the paper's tables on our setting, as Markdown plus PNG plots
(how retention and its intervals are computed: :mod:`ilora.experiment.results`)."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np

from ilora.experiment import stats
from ilora.experiment.results import (
    BAR_GAP,
    NEAR_RANDOM,
    Results,
    SeedResults,
    fmt,
    merged_models,
    near_random,
    stage_minutes,
)

# The paper's Table 4 (retention after merging four games), for reference only: its games
# and scale differ from ours.
PAPER_RETENTION = {
    "I-LoRA (paper)": {"ChopperCommand": 0.328, "Asterix": 0.179, "BattleZone": 0.552, "CrazyClimber": 0.182},
    "best PEFT type (paper, at most)": {"ChopperCommand": 0.203, "Asterix": 0.203, "BattleZone": 0.203, "CrazyClimber": 0.203},
    "joint fine-tuning (paper)": {"ChopperCommand": 0.693, "Asterix": 0.162, "BattleZone": 0.828, "CrazyClimber": 0.454},
}
def score_cell(summary: dict | None) -> str:
    if not summary:
        return "n/a"
    return f"{summary['mean']:.1f} [{summary['ci_low']:.1f}, {summary['ci_high']:.1f}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def retention_row(
    res: Results, label: str, model: str | Callable[[str], str], games: list[str], mean_over: Collection[str]
) -> list[str]:
    """``[label, "r [lo, hi]" per game, mean over the games of mean_over]``; ``model`` is one
    model or a function of the game."""
    model_for = model if callable(model) else (lambda g: model)
    cells, values = [], []
    for g in games:
        v, lo, hi = res.retention(model_for(g), g)
        if g in mean_over:
            values.append(v)
        cells.append(f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]")
    finite = [v for v in values if not math.isnan(v)]
    return [label, *cells, fmt(float(np.mean(finite)) if finite else math.nan)]


def best_labels(labels: list[str], values: list[float]) -> tuple[list[str], float]:
    """The label(s) with the highest value to 2 decimals (ties all listed) and that value;
    ``([], nan)`` when no value is finite."""
    rounded = {label: round(v, 2) for label, v in zip(labels, values) if math.isfinite(v)}
    if not rounded:
        return [], math.nan
    top = max(rounded.values())
    return [k for k, v in rounded.items() if v == top], top


def best_per_game(labels: list[str], values: list[float]) -> str:
    """The label(s) with the highest value (to 2 decimals), e.g. ``"ilora, joint (1.00)"``."""
    top_labels, top = best_labels(labels, values)
    return ", ".join(top_labels) + f" ({top:.2f})" if top_labels else "n/a"


def ilora_remark(best: list[str]) -> str:
    """What the best-mean line adds about I-LoRA: nothing when it wins alone (or nothing won)."""
    if not best or best == ["ilora"]:
        return ""
    return " (a tie)" if "ilora" in best else " (I-LoRA is not the best here)"


def score_change(res: Results, model: str, game: str) -> str:
    """``model``'s mean score on ``game`` minus the base model's, e.g. ``"-7.0"`` (``n/a`` if unplayed)."""
    played, base = res.play(model, game), res.play("base", game)
    return "n/a" if played is None or base is None else f"{played['mean'] - base['mean']:+.1f}"


def own_adapter(kind: str) -> Callable[[str], str]:
    """Each game's own single-game adapter of ``kind`` (``plain``, ``routed``)."""
    return lambda game: f"{kind}/{game}"


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


def plot_retention(path: Path, sr: SeedResults, models: dict[str, str | Callable[[str], str]], games: list[str]) -> None:
    """Grouped bars of retention per method and game with their two-level 95% intervals."""
    labels = list(models)
    width = 0.8 / len(games)
    with figure(path, (max(7.0, 0.6 * len(labels) + 2), 4.5),
                f"Retention after merging, seed{'s' if len(sr.seeds) > 1 else ''} {', '.join(map(str, sr.seeds))} "
                "(95% intervals over seeds x episodes; no bar: the game misses the bar)",
                "retention") as ax:
        for i, game in enumerate(games):
            values, lows, highs = [], [], []
            for label in labels:
                e = sr.retention(models[label], game)
                values.append(0.0 if math.isnan(e.value) else e.value)
                lows.append(0.0 if math.isnan(e.low) else max(0.0, e.value - e.low))
                highs.append(0.0 if math.isnan(e.high) else max(0.0, e.high - e.value))
            ax.bar(np.arange(len(labels)) + i * width, values, width, yerr=[lows, highs], capsize=2, label=game)
        ax.set_xticks(np.arange(len(labels)) + width * (len(games) - 1) / 2)
        ax.set_xticklabels(labels, rotation=30, ha="right")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")


def interference_section(experiment, res: Results, models: dict, games: list[str], folder: Path) -> list[str]:
    """Interference in activations beside retention: how far each merge moves each routed adapter's
    output on its own game's rows, and the answer margin that output has to spare."""
    try:
        data = experiment.runner.result("analysis/interference")
    except (KeyError, FileNotFoundError):
        return []
    md = ["### Interference in activations", "",
          "Per pair of routed adapters, `||dW_j X_i|| / ||dW_i X_i||`: adapter j's output on game i's rows (inputs of every "
          "LoRA module, measured in adapter i's model; norms summed over modules) relative to game i's own adapter. "
          "Weight-space cosines do not see this; a merged model adds every adapter's output on one row.", "",
          table(["rows of / adapter", *games],
                [[g, *[fmt(v) for v in row]] for g, row in zip(games, data["ratio"])]), "",
          "Per merge, `||(dW_merged - dW_i) X_i|| / ||dW_i X_i||` (0: game i's adapter acts unchanged on its rows) and, "
          "after `/`, the answer margin on game i's held-out expert rows (mean of the expert action's score minus the "
          "best other action's, and the share of rows where it is positive), then the retention from Table 4.", ""]
    rows, points = [], []
    label_of = {model: label for label, model in models.items() if isinstance(model, str)}
    for model, changes in data["merged"].items():
        cells = []
        for g, change in zip(games, changes):
            margin = ((res.evals(model) or {}).get("margin") or {}).get(g) or {}
            retention = res.retention(model, g)[0]
            cells.append(f"{fmt(change)} / {fmt(margin.get('mean'))} ({fmt(margin.get('positive'))}) / {fmt(retention)}")
            if change is not None and math.isfinite(retention):
                points.append((change, retention, g))
        rows.append([label_of.get(model, model), *cells])
    md += [table(["merge", *games], rows), ""]
    if points:
        with figure(folder / "interference.png", (5.5, 4), "Output change on a game's rows vs its retention",
                    "retention", "||(dW_merged - dW_i) X_i|| / ||dW_i X_i||") as ax:
            for g in games:
                mine = [(x, y) for x, y, game in points if game == g]
                ax.scatter([x for x, _ in mine], [y for _, y in mine], label=g)
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        md += ["![interference](interference.png)", ""]
    return md


def selection_section(experiment, res: Results, games: list[str]) -> list[str]:
    """The per-input selection rules (pick accuracy, cost per decision against the merged model's,
    which skill acted in play) and the merge tuned by reward (its setting and search budget)."""
    cfg, md = res.cfg, []
    rows = []
    for rule in cfg.selection.rules:
        r = res.evals(f"select/{rule}")
        if not r:
            continue
        sel = r["selection"]
        acted = [f"{g}: {fmt(r['chosen'][g].get(g, 0) / max(1, sum(r['chosen'][g].values())))}" for g in games]
        rows.append([rule, fmt(sel["accuracy"]), f"{sel['cost_ratio']:.2f}x", ", ".join(acted)])
    if rows:
        md += ["### Skills chosen per input", "",
               "Every game's routed adapter loaded side by side, one chosen per step (no merge); the rows above name "
               "each rule's retention. Pick accuracy: share of the held-out rows the report scores agreement on "
               "where the rule picks the row's own game's adapter; cost: seconds per decision against a merged "
               "model's on those rows; in play: share of decisions taken by the game's own adapter.", "",
               table(["rule", "pick accuracy", "cost per decision vs merged", "own adapter acted in play"], rows), ""]
    if cfg.tuned_merge.enabled:
        try:
            t = experiment.runner.result("tuned-merge")
        except (KeyError, FileNotFoundError):
            return md
        options = ", ".join(f"{k}={v}" for k, v in t["options"].items()) or "defaults"
        md += ["### Merge tuned by reward", "",
               f"{t['trials']} trials ({', '.join(cfg.tuned_merge.search.strategies)}, objective: the "
               f"{cfg.tuned_merge.search.objective} over games and general accuracy of a cheap reward on validation rows, "
               f"apart from every scored row and episode): best `{t['method']}` ({options}) from {t['strategy']} trial "
               f"{t['trial']}, reward {fmt(t['objective'], 3)} against {fmt(t['default_objective'], 3)} for the default "
               "setting (trial 0). Its row above is played like the untuned merges.", ""]
    return md


def write_report(experiment, folder: Path) -> dict[str, Any]:
    """Write ``REPORT.md``, ``summary.json`` and the PNGs into ``folder``; print the summary table."""
    res = Results(experiment)
    cfg, games = res.cfg, res.games
    md: list[str] = [f"# ilora experiment report: `{cfg.run_dir}`", ""]
    md.append(
        f"Games: {', '.join(games)}. Base: `{cfg.base}`. Object-state text in the prompt: **{cfg.data.object_text}**; "
        f"answers: {'reasoning + action' if cfg.data.reasoning else 'direct action'}. "
        f"Play: {cfg.eval.episodes} episodes per cell"
        + (f" ({cfg.eval.own_game_episodes} for the random and expert references and for each single-game adapter on its "
           "own game)" if cfg.eval.own_game_episodes else "")
        + f", capped at {cfg.eval.max_frames} emulator frames, "
        f"sticky actions 0.25, FireReset {'on' if cfg.eval.fire_on_reset else 'off'}. "
        "Scores are means with 95% t-intervals over episodes; retention is random-baselined "
        "`(model - random) / (single-task - random)` with a bootstrap 95% CI (see `ilora.experiment.report`)."
    )
    md.append("")

    # Table 1: single-task agents.
    failures = {g: res.bar_failures(g) for g in games}
    scored = [g for g in games if not failures[g]]
    rows = []
    for g in games:
        rnd, exp = res.reference(g, "random"), res.reference(g, "expert")
        rows.append(
            [g, score_cell(rnd), score_cell(exp), score_cell(res.play("base", g)), score_cell(res.play(f"plain/{g}", g)),
             fmt(res.play(f"plain/{g}", g)["hns"] if res.play(f"plain/{g}", g) else None),
             fmt(res.gap_closed(f"plain/{g}", g)), score_cell(res.play(f"routed/{g}", g)), fmt(res.gap_closed(f"routed/{g}", g)),
             "yes" if not failures[g] else "no"]
        )
    md += ["## 1. Single-task agents (paper Table 1)", "",
           table(["game", "random", "expert", "base", "single-task LoRA", "HNS", "gap closed", "routed LoRA", "gap closed",
                  "meets the bar"], rows),
           "", f"`gap closed` = (agent - random) / (expert - random). The bar for a meaningful retention: the single-task "
           f"and the routed agent each close at least {BAR_GAP:g} of the gap, with the 95% CI of their score above "
           "random's mean. Every mean retention below is over the games that meet it"
           + (f": {', '.join(scored)}." if scored else "; none does, so every mean is n/a.")
           + "".join(f" {g} does not ({'; '.join(failures[g])}): its retention is shown, and means nothing."
                     for g in games if failures[g]), ""]

    # Table 2: routed vs single-task.
    md += ["## 2. Routing-tuned vs single-task (paper Table 2)", "",
           table(["", *games, "mean"], [retention_row(res, "routed / single-task", own_adapter("routed"), games, scored)])
           if cfg.adapters.routed else "This run trains a routed adapter for the first game only (`adapters.routed: false`).", ""]

    # Forgetting: each single-game adapter played on the other games.
    rows = []
    for kind in ("plain", "routed"):
        for g in games:
            cells = ["—" if other == g else score_change(res, f"{kind}/{g}", other) for other in games]
            rows.append([f"{kind}/{g}", *cells])
    md += ["### Damage to the other games", "",
           "Mean score of a one-game adapter on each other game minus the base model's score there "
           "(0 = no change; negative = forgetting).", "",
           table(["adapter", *games], rows), ""]

    # Table 3: general benchmark.
    rows = []
    for model in ["base", *[f"{k}/{g}" for k in ("plain", "routed") for g in games], "joint", "merge/ilora"]:
        r = res.evals(model)
        if r:
            s = r["general"]
            rows.append([model, f"{s['accuracy']:.3f} [{s['ci95_low']:.3f}, {s['ci95_high']:.3f}]", str(s["n"])])
    md += ["## 3. General benchmark accuracy (paper Table 3)", "", table(["model", "accuracy [95% CI]", "n"], rows), ""]

    # Table 4: merges (one-shot and iterative), beside the joint adapter and the routed adapters themselves.
    models = merged_models(cfg)
    sr = SeedResults(cfg, [experiment])
    rows = []
    for label, model in models.items():
        row = retention_row(res, label, model, games, scored)
        low = stats.combine([sr.retention(model, g) for g in scored], "min")
        norm = stats.combine([sr.normalised(model, g) for g in scored], "mean")
        rows.append([*row, fmt(low.value), fmt(norm.value)])
    rows_table4 = rows
    labels = [r[0] for r in rows[:-1]]
    best, _ = best_labels(labels, [float(r[-3]) if r[-3] not in ("n/a", "") else math.nan for r in rows[:-1]])
    point = {g: [res.retention(models[label], g)[0] for label in labels] for g in games}
    md += ["## 4. Retention after merging all games (paper Table 4)", "",
           table(["method", *games, "mean", "min over games", "expert-normalised (mean)"], rows), "",
           f"Best mean retention: **{', '.join(best) or 'n/a'}**{ilora_remark(best)}. "
           "A mean over games can hide a loss on one game (hence the minimum), and a small single-task denominator "
           "can inflate a retention (the expert-normalised score `(model - random) / (expert - random)` has none); "
           "the best per game (point estimates, ties listed): "
           + "; ".join(f"{g}: {best_per_game(labels, point[g])}" for g in games) + ".", ""]
    md += [f"Single-task denominators whose 95% CI reaches within {NEAR_RANDOM:g} of the expert-random gap above "
           f"random (their retentions are noisy): {', '.join(near) }.", ""] if (near := near_random(res, games)) else []
    plot_retention(folder / "retention.png", sr, models, games)
    md += selection_section(experiment, res, games)
    md += interference_section(experiment, res, models, games, folder)
    md += ["![retention](retention.png)", "", "Paper, for reference (other games, a 7B model):", "",
           table(["", *PAPER_RETENTION["I-LoRA (paper)"]],
                 [[k, *[f"{v:.3f}" for v in d.values()]] for k, d in PAPER_RETENTION.items()]), ""]
    ag_rows = [[m, *[fmt((res.evals(m) or {}).get("agreement", {}).get(g, {}).get("agreement")) for g in games]]
               for m in ["base", *[f"plain/{g}" for g in games], *[f"routed/{g}" for g in games], *[m for m in models.values() if isinstance(m, str)]]]
    md += ["### Offline agreement with held-out expert actions", "",
           "Share of held-out expert steps where the model picks the expert's action, by the same scoring it plays "
           "with. A cheap second metric on the expert's own states: it does not see where the model's own play "
           "leads, and it did not predict play in earlier measurements, so it ranks nothing on its own.", "",
           table(["model", *games], ag_rows), ""]

    # Table 5: iterative merging and order.
    rows = []
    orders = [list(games)] + [list(o) for o in cfg.merge.orders]
    if cfg.merge.iterative:
        for order in orders:
            tag = "-".join(order)
            for k in range(2, len(order) + 1):
                row = retention_row(res, f"{tag} after {k}", f"iter/{tag}/{k}", order[:k], scored)
                rows.append(row[:-1] + [""] * (len(games) - k) + row[-1:])
        md += ["## 5. Iterative I-LoRA merging (paper Table 5)", "",
               "Each row merges the next game's routed adapter into the saved merged state; retention on the games merged so far.", "",
               table(["order / games merged", *[f"game {i + 1}" for i in range(len(games))], "mean"], rows), ""]

    # Table 6 / Figure 5: activation norms.
    md += ["## 6. LoRA activation norms on task vs general data (paper Table 6, Figure 5)", "",
           f"Mean squared LoRA-B output norm (scaling included), averaged over layers, of `{games[0]}`'s adapters on "
           "held-out rows of each data type; the heatmaps show one layer's LoRA-B outputs per position.", ""]
    rows, kinds = [], []
    for kind in ("plain", "routed"):
        name = f"analysis/{kind}/{games[0]}"
        try:
            data = experiment.runner.result(name)["table"]["data"]
        except (KeyError, FileNotFoundError):
            continue
        types = list(data)
        rows.append([f"{kind}/{games[0]}", *[f"{data[t]['average']:.4g}" for t in types]])
        kinds.append(kind)
        png = experiment.runner.folder(name) / "out" / "heatmap.png"
        if png.is_file():
            (folder / f"heatmap-{kind}.png").write_bytes(png.read_bytes())
    if rows:
        md += [table(["adapter", *types], rows), ""]
        md += [f"![{k} heatmap](heatmap-{k}.png)" for k in kinds if (folder / f"heatmap-{k}.png").is_file()]
    md.append("")

    # Figure 4: keep-ratio sweep.
    keeps = sorted({cfg.merge.keep, *cfg.merge.keep_sweep})
    names = {k: ("merge/ilora" if k == cfg.merge.keep else f"keep/{k:g}") for k in keeps}
    series = {g: [res.retention(names[k], g)[0] for k in keeps] for g in games}
    plot_line(folder / "keep_sweep.png", keeps, series, "keep ratio", "retention", "I-LoRA keep ratio (Figure 4)")
    md += ["## 7. Keep-ratio sweep (Figure 4) and loss ablations", "",
           table(["keep", *games], [[f"{k:g}", *[fmt(series[g][i]) for g in games]] for i, k in enumerate(keeps)]),
           "", "![keep sweep](keep_sweep.png)", ""]
    pair = cfg.ablation_pair()
    if not pair:
        md += ["This run merges no ablation pair (`ablations.games` is not two of its games).", ""]
    variants = {} if not pair else {"plain": (0.0, 0.0), "routed": (cfg.train.eps_kl, cfg.train.eps_norm),
                **{v: (w.get("eps_kl", 0.0), w.get("eps_norm", 0.0)) for v, w in cfg.ablations.variants.items()}}
    rows = []
    for v, (kl, nm) in variants.items():
        prefix = {"plain": "plain", "routed": "routed"}.get(v, f"ablation/{v}")
        own = [fmt(res.gap_closed(f"{prefix}/{g}", g)) for g in pair]
        cross = [score_change(res, f"{prefix}/{pair[0]}", pair[1]), score_change(res, f"{prefix}/{pair[1]}", pair[0])]
        merged = [fmt(res.retention(f"ablation-merge/{v}", g)[0]) for g in pair]
        rows.append([v, f"{kl:g}", f"{nm:g}", *own, *cross, *merged])
    md += [] if not pair else [f"Loss ablations on {pair[0]} + {pair[1]}: own-game gap closed, damage to the other game "
           "(mean score change vs the base model; 0 = none), and retention after the I-LoRA merge of the pair.", "",
           table(["variant", "eps_kl", "eps_norm", *[f"gap {g}" for g in pair],
                  f"{pair[0]} adapter on {pair[1]}", f"{pair[1]} adapter on {pair[0]}", *[f"merged: {g}" for g in pair]], rows), "",
           "`routed` is this run's loss weights (`train.eps_kl`, `train.eps_norm`); every other row differs from it only in "
           "the weights shown." if cfg.ablations.variants else
           "This run has no loss-ablation variants (`ablations.variants`); `configs/ablations.yaml` adds KL only, norm "
           "only and the eps sweep to the default run.", ""]

    # Do the models read the images?
    rows = []
    for g in games:
        r = res.evals(f"routed/{g}") or {}
        rows.append([g, score_cell(r.get("play", {}).get(g)), score_cell(r.get("blank", {}).get(g))])
    md += ["## Do the models read the images?", "",
           "Routed single-game adapters played normally and with both frames blanked (black). With object-state text "
           "in the prompt a small model may act on the text alone; equal scores mean it does.", "",
           table(["game", "normal", "frames blanked"], rows), ""]
    gifs = [p.name for p in folder.glob("*.gif")]
    for g in games:
        src = experiment.runner.folder(f"eval/routed/{g}") / f"{g}.gif"
        if src.is_file():
            (folder / f"routed-{g}.gif").write_bytes(src.read_bytes())
            gifs.append(f"routed-{g}.gif")
    md += ["Gameplay (first episode, first steps, the model's action alongside): " + ", ".join(f"[{n}]({n})" for n in sorted(set(gifs))), ""]

    minutes = stage_minutes(experiment)
    md += [f"Compute: {sum(minutes.values()):.1f} min summed over the stages' own run times (first computation of each): "
           + ", ".join(f"{kind} {m:.1f}" for kind, m in sorted(minutes.items(), key=lambda kv: -kv[1])) + ".", ""]
    (folder / "REPORT.md").write_text("\n".join(md))
    summary_rows = rows_table4
    summary = {"games": games, "bar_games": scored, "retention": {r[0]: r[1:] for r in summary_rows}, "best": best}
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    print(table(["method", *games, "mean"], summary_rows))
    return summary
