"""The report's arithmetic on hand-made results: the bar, means over the games that meet it, ties."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from ilora.experiment.config import AblationSettings, ExperimentConfig
from ilora.experiment.report import Results, best_labels, best_per_game, retention_row, score_change


def summary(scores: list[float], ci_low: float) -> dict:
    return {"scores": scores, "mean": sum(scores) / len(scores), "ci_low": ci_low}


def fake_results(plays: dict[str, dict[str, dict]], references: dict[str, dict]) -> Results:
    """A ``Results`` over stage results given as ``{model: {game: summary}}`` and ``{game: {"random"|"expert": summary}}``."""
    stages = {f"eval/{m}": {"play": p} for m, p in plays.items()}
    stages |= {f"eval/reference/{g}": r for g, r in references.items()}

    def result(name: str) -> dict:
        if name not in stages:
            raise KeyError(name)
        return stages[name]

    cfg = ExperimentConfig(games=list(references), ablations=AblationSettings(variants={}))
    return Results(SimpleNamespace(cfg=cfg, runner=SimpleNamespace(result=result)))


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
    "merge/x": {"Good": summary([4, 5, 6], 2.5), "Noisy": summary([9, 10, 11], 7.5), "Weak": summary([0, 0, 0], 0)},
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
    row = retention_row(res, "x", "merge/x", games, mean_over=["Good"])
    good = res.retention("merge/x", "Good")[0]
    assert good == pytest.approx(0.5)  # (5 - 0) / (10 - 0)
    assert row[0] == "x" and len(row) == len(games) + 2
    assert float(row[-1]) == pytest.approx(good, abs=0.005)
    assert retention_row(res, "x", "merge/x", games, mean_over=[])[-1] == "n/a"
    everything = retention_row(res, "x", "merge/x", games, mean_over=games)
    assert float(everything[-1]) == pytest.approx(sum(res.retention("merge/x", g)[0] for g in games) / 3, abs=0.005)


def test_best_labels_lists_ties_and_skips_nan():
    assert best_labels(["a", "b", "c"], [0.491, 0.489, math.nan]) == (["a", "b"], 0.49)
    labels, top = best_labels(["a"], [math.nan])
    assert labels == [] and math.isnan(top)
    assert best_per_game(["a", "b"], [0.1, 0.7]) == "b (0.70)"
    assert best_per_game(["a"], [math.nan]) == "n/a"


def test_score_change_is_against_the_base_model():
    plays = {**PLAYS, "base": {"Good": summary([1, 1, 1], 1)}}
    res = fake_results(plays, REFERENCES)
    assert score_change(res, "merge/x", "Good") == "+4.0"
    assert score_change(res, "merge/x", "Noisy") == "n/a"  # the base never played it


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
