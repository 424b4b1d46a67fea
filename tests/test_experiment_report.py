"""The report's arithmetic on hand-made results: the bar, means over the games that meet it, ties,
and ``summary.json`` holding the numbers the report shows."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ilora.experiment.config import AblationSettings, ExperimentConfig, MergeSettings
from ilora.experiment.report import (
    Results,
    best_cell,
    best_labels,
    change_cell,
    interval_cell,
    retention_row,
    score_change,
    to_json,
    write_report,
)
from ilora.experiment.seed_report import ranking, ranking_line
from ilora.experiment.stats import Estimate, Interval


def summary(scores: list[float], ci_low: float) -> dict:
    mean = sum(scores) / len(scores)
    return {"scores": scores, "mean": mean, "ci_low": ci_low, "ci_high": 2 * mean - ci_low, "hns": None}


def fake_experiment(plays: dict[str, dict[str, dict]], references: dict[str, dict], folder: Path | None = None):
    """An experiment whose stage results are ``{model: {game: summary}}`` plays and
    ``{game: {"random"|"expert": summary}}`` references; Table 4 merges I-LoRA only."""
    general = {"accuracy": 0.5, "ci95_low": 0.4, "ci95_high": 0.6, "n": 100}
    stages = {f"eval/{m}": {"play": p, "general": general} for m, p in plays.items()}
    stages |= {f"eval/reference/{g}": r for g, r in references.items()}

    def result(name: str) -> dict:
        if name not in stages:
            raise KeyError(name)
        return stages[name]

    cfg = ExperimentConfig(games=list(references), ablations=AblationSettings(variants={}),
                           merge=MergeSettings(methods=["ilora"], iterative=False, keep_sweep=[], orders=[]))
    runner = SimpleNamespace(result=result, all_stages=lambda: [], folder=lambda name: (folder or Path("/nonexistent")) / name)
    return SimpleNamespace(cfg=cfg, runner=runner, plan=SimpleNamespace(specs=lambda: []))


def fake_results(plays: dict[str, dict[str, dict]], references: dict[str, dict]) -> Results:
    return Results(fake_experiment(plays, references))


REFERENCES = {
    "Good": {"random": summary([0, 0, 0], 0), "expert": summary([10, 10, 10], 10)},
    "Noisy": {"random": summary([0, 0, 0], 0), "expert": summary([10, 10, 10], 10)},
    "Weak": {"random": summary([0, 0, 0], 0), "expert": summary([10, 10, 10], 10)},
}
PLAYS = {
    "plain/Good": {"Good": summary([9, 10, 11], 7.5)},
    "routed/Good": {"Good": summary([8, 9, 10], 6.5)},
    "plain/Noisy": {"Noisy": summary([0, 10, 20], -14.8)},  # closes the gap, CI reaches below random
    "routed/Noisy": {"Noisy": summary([9, 10, 11], 7.5)},
    "plain/Weak": {"Weak": summary([4, 4, 4], 4)},  # CI above random, closes only 0.4
    "routed/Weak": {"Weak": summary([9, 10, 11], 7.5)},
    "merge/ilora": {"Good": summary([4, 5, 6], 2.5), "Noisy": summary([9, 10, 11], 7.5), "Weak": summary([0, 0, 0], 0)},
}


def test_bar_needs_half_the_gap_and_a_ci_above_random_for_both_adapters():
    res = fake_results(PLAYS, REFERENCES)
    assert res.bar_failures("Good") == []
    assert res.bar_failures("Noisy") == ["plain CI low -14.8 <= random 0.0"]
    assert res.bar_failures("Weak") == ["plain closes 0.40 of the gap"]


def test_missing_adapter_fails_the_bar():
    plays = {k: v for k, v in PLAYS.items() if k != "routed/Good"}
    assert fake_results(plays, REFERENCES).bar_failures("Good") == ["routed: not played"]


def test_retention_mean_is_over_the_given_games_only():
    res = fake_results(PLAYS, REFERENCES)
    games = list(REFERENCES)
    row = retention_row(res, "merge/ilora", games, mean_over=["Good"])
    good = res.retention("merge/ilora", "Good")
    assert good.value == pytest.approx(0.5)  # (5 - 0) / (10 - 0)
    assert good.low <= good.value <= good.high
    assert list(row.retention) == games and row.retention["Good"] == good
    assert row.mean == pytest.approx(good.value)
    assert math.isnan(retention_row(res, "merge/ilora", games, mean_over=[]).mean)
    everything = retention_row(res, "merge/ilora", games, mean_over=games)
    assert everything.mean == pytest.approx(sum(res.retention("merge/ilora", g).value for g in games) / 3)


def test_best_labels_lists_ties_and_skips_nan():
    best = best_labels(["a", "b", "c"], [0.491, 0.489, math.nan])
    assert (best.labels, best.value) == (["a", "b"], 0.49)
    nothing = best_labels(["a"], [math.nan])
    assert nothing.labels == [] and math.isnan(nothing.value)
    assert best_cell(best_labels(["a", "b"], [0.1, 0.7])) == "b (0.70)"
    assert best_cell(nothing) == "n/a"


def test_score_change_is_against_the_base_model():
    plays = {**PLAYS, "base": {"Good": summary([1, 1, 1], 1)}}
    res = fake_results(plays, REFERENCES)
    assert score_change(res, "merge/ilora", "Good") == pytest.approx(4.0)
    assert math.isnan(score_change(res, "merge/ilora", "Noisy"))  # the base never played it
    assert change_cell(score_change(res, "merge/ilora", "Good")) == "+4.0"
    assert change_cell(math.nan) == "n/a"


def test_to_json_writes_intervals_as_numbers_and_nan_as_null():
    estimate = Estimate(0.5, math.nan, 0.75, draws=None)
    assert to_json({"a": [Interval(1.0, 0.5, 2.0), estimate, math.nan, 3]}) == {
        "a": [{"value": 1.0, "low": 0.5, "high": 2.0}, {"value": 0.5, "low": None, "high": 0.75}, None, 3]}


def test_summary_json_holds_the_numbers_the_report_shows(tmp_path):
    experiment = fake_experiment(PLAYS, REFERENCES, tmp_path / "run")
    returned = write_report(experiment, tmp_path)
    text = (tmp_path / "REPORT.md").read_text()
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == returned
    assert saved["bar_games"] == ["Good"]
    ilora = saved["merges"]["methods"]["ilora"]
    assert ilora["retention"]["Good"]["value"] == pytest.approx(0.5)
    assert ilora["mean"] == pytest.approx(0.5)  # over the games that meet the bar only
    cells = [interval_cell(Interval(**{k: math.nan if v is None else v for k, v in ilora["retention"][g].items()}))
             for g in saved["games"]]
    assert f"| ilora | {' | '.join(cells)} | 0.50 |" in text
    routed = saved["merges"]["methods"]["routed single-game adapters"]["retention"]["Good"]
    assert routed["value"] == pytest.approx((9 - 0) / (10 - 0))
    assert saved["single_task"]["Weak"]["plain_gap_closed"] == pytest.approx(0.4)
    assert saved["single_task"]["Good"]["base"] is None  # the base never played
    assert saved["merges"]["best"]["labels"] == ["ilora"] and "Best mean retention: **ilora**." in text
    assert saved["general"]["merge/ilora"] == {"accuracy": {"value": 0.5, "low": 0.4, "high": 0.6}, "n": 100}
    assert "| merge/ilora | 0.500 [0.400, 0.600] | 100 |" in text


def test_combining_no_game_is_undefined_not_an_error():
    from ilora.experiment import stats

    for how in ("mean", "min"):
        e = stats.combine([], how)
        assert math.isnan(e.value) and math.isnan(e.low) and math.isnan(e.high)


def test_seed_ranking_calls_best_only_a_separated_leader_and_skips_single_game_rows():
    def estimate(value: float, draws: list[float]) -> Estimate:
        return Estimate(value, min(draws), max(draws), np.asarray(draws))

    a, b = estimate(0.9, [0.85, 0.9, 0.95]), estimate(0.5, [0.45, 0.5, 0.55])
    close = estimate(0.88, [0.87, 0.96, 0.9])  # beats a in one paired draw
    routed = estimate(1.0, [1.0, 1.0, 1.0])
    r = ranking({"a": a, "b": b, "routed single-game adapters": routed})
    assert (r.best, r.runner_up, r.separates) == ("a", "b", True)
    assert ranking_line(r).startswith("Best mean retention: **a** (0.90), ahead of b (0.50)")
    r = ranking({"a": a, "close": close})
    assert (r.best, r.runner_up, r.separates) == ("a", "close", False)
    assert ranking_line(r).startswith("Highest mean retention: a (0.90), but it does not separate")
    assert ranking({"a": a, "nan": estimate(math.nan, [math.nan])}) is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.episodes=0", "eval: episodes = 0: must be >= 1"),
        ("eval.own_game_episodes=0", "own_game_episodes = 0: must be >= 1"),
        ("games=[Pong, Pong]", "each once"),
        ("ablations.games=[Pong, Pong]", "a pair of two of games"),
        ("ablations.games=[Pong, Skiing]", "a pair of two of games"),
        ("merge.orders=[[Pong, Pong]]", "is not an order of games"),
        ("train.max_steps=0", "must be >= 1"),
    ],
)
def test_experiment_config_refuses_what_no_stage_could_run(override, message):
    from ilora.config import load_yaml
    from ilora.errors import IloraError

    quick = Path(__file__).resolve().parent.parent / "configs" / "quick.yaml"
    with pytest.raises(IloraError, match=re.escape(message)) as err:
        load_yaml(ExperimentConfig, quick, [override])
    assert str(quick) in str(err.value)
