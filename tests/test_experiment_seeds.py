"""The seed axis: two-level bootstrap statistics, and replicates of the quick config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ilora.config import load_yaml
from ilora.errors import IloraError
from ilora.experiment import stats
from ilora.experiment.config import ExperimentConfig
from ilora.experiment.pipeline import Experiment, replicate_configs, run_experiment

ROOT = Path(__file__).resolve().parent.parent


def cell(scores, single, random=0.0, expert=10.0) -> stats.SeedCell:
    return stats.SeedCell(np.asarray(scores, float), np.asarray(single, float), random, expert)


def test_point_estimates_average_the_per_seed_values():
    rng = np.random.default_rng(0)
    cells = [cell([2, 4], [4, 4], random=1.0), cell([5, 5], [9, 9], random=1.0)]
    picks = stats.seed_picks(2, rng)
    r = stats.retention(cells, picks, rng)
    assert r.value == pytest.approx(((3 - 1) / (4 - 1) + (5 - 1) / (9 - 1)) / 2)
    n = stats.normalised_score(cells, picks, rng)
    assert n.value == pytest.approx(((3 - 1) / 9 + (5 - 1) / 9) / 2)
    assert r.low <= r.value <= r.high


def test_constant_episodes_in_one_seed_give_a_point_interval():
    rng = np.random.default_rng(0)
    picks = stats.seed_picks(1, rng)
    r = stats.retention([cell([3, 3, 3], [6, 6])], picks, rng)
    assert r.value == r.low == r.high == pytest.approx(0.5)


def test_a_seed_below_random_is_left_out_not_averaged_in():
    rng = np.random.default_rng(0)
    cells = [cell([5], [10]), cell([5], [0])]  # the second seed's single-task agent is at random
    r = stats.retention(cells, stats.seed_picks(2, rng), rng)
    assert r.value == pytest.approx(0.5)
    assert r.low == r.high == pytest.approx(0.5)


def test_combine_mean_and_min_are_paired_over_draws():
    rng = np.random.default_rng(1)
    picks = stats.seed_picks(3, rng)
    a = stats.retention([cell([4, 6], [10, 10]), cell([5], [10]), cell([6], [10])], picks, rng)
    b = stats.retention([cell([9], [10]), cell([8, 10], [10]), cell([9], [10])], picks, rng)
    mean, low = stats.combine([a, b], "mean"), stats.combine([a, b], "min")
    assert mean.value == pytest.approx((a.value + b.value) / 2)
    assert low.value == pytest.approx(min(a.value, b.value))
    np.testing.assert_allclose(low.draws, np.minimum(a.draws, b.draws))
    assert stats.separates(b, a) and not stats.separates(a, b)
    nan = stats.Estimate(math.nan, math.nan, math.nan, np.full(len(picks), np.nan))
    assert math.isnan(stats.combine([a, nan], "mean").value)


def test_replicates_get_their_own_folders_and_seeds(tmp_path):
    config = load_yaml(ExperimentConfig, ROOT / "configs" / "quick.yaml", [f"run_dir={tmp_path}", "seeds=[3, 5]"])
    replicas = replicate_configs(config)
    assert [(c.seed, c.seeds, Path(c.run_dir).name) for c in replicas] == [(3, None, "seed-3"), (5, None, "seed-5")]
    assert replicate_configs(load_yaml(ExperimentConfig, ROOT / "configs" / "quick.yaml")) [0].run_dir == "runs/quick"
    with pytest.raises(IloraError, match="seeds"):
        load_yaml(ExperimentConfig, ROOT / "configs" / "quick.yaml", ["seeds=[1, 1]"])


@pytest.mark.slow
def test_quick_config_over_two_seeds_reports_per_seed_and_averaged_cells(tmp_path):
    config = load_yaml(ExperimentConfig, ROOT / "configs" / "quick.yaml", [f"run_dir={tmp_path}", "seeds=[0, 1]"])
    report = run_experiment(config, log=lambda *_: None)
    assert report == tmp_path / "report" / "REPORT.md"
    for seed in (0, 1):
        assert (tmp_path / f"seed-{seed}" / "report" / "REPORT.md").is_file()
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    for method in config.merge.methods:
        cells = summary["methods"][method]
        assert set(cells["retention"]) == set(config.games)
        for key in ("mean", "min", "normalised_mean"):
            value = cells[key]
            assert value["value"] is None or value["low"] <= value["value"] <= value["high"]
    assert (tmp_path / "report" / "retention.png").stat().st_size > 1000


SLIM = ["adapters.routed=false", "adapters.joint=false", "merge.methods=[]", "merge.iterative=false",
        "merge.keep_sweep=[]", "merge.orders=[]", "ablations.games=[]", "ablations.variants={}",
        "refit.steps_share=0", "selection.rules=[]", "tuned_merge.enabled=false"]


def test_without_routed_adapters_the_settings_that_read_them_are_refused():
    with pytest.raises(IloraError, match=r"adapters.routed = false: merge.methods needs every game's routed adapter"):
        load_yaml(ExperimentConfig, ROOT / "configs" / "quick.yaml", ["adapters.routed=false"])
    with pytest.raises(IloraError, match="refit.steps_share"):
        load_yaml(ExperimentConfig, ROOT / "configs" / "quick.yaml", [*SLIM, "refit.steps_share=0.5"])


def test_the_headline_seeds_config_trains_plain_and_continual_adapters_only():
    """configs/seeds.yaml: each game's plain adapter (the denominators) and the continual chain,
    whose first link is the first game's routed adapter; no joint, Grams or interference stages."""
    config = load_yaml(ExperimentConfig, ROOT / "configs" / "seeds.yaml")
    experiment = Experiment(replicate_configs(config)[0])
    games = config.games
    trained = [spec.name for spec in experiment.plan.adapters]
    assert trained == [*[f"plain/{g}" for g in games], f"routed/{games[0]}", *[f"continual/{g}" for g in games[1:]]]
    stages = {job.key for job in experiment.jobs()}
    assert not {s for s in stages if s.startswith(("grams/", "analysis/interference", "merge/", "iter", "train/joint"))}
    assert {f"merge-continual/{m}" for m in config.continual.methods} <= stages
    full = load_yaml(ExperimentConfig, ROOT / "configs" / "seeds_full.yaml")
    assert set(trained) < {spec.name for spec in Experiment(replicate_configs(full)[0]).plan.adapters}


@pytest.mark.slow
def test_quick_config_without_routed_or_joint_adapters_reports_the_continual_merges(tmp_path):
    config = load_yaml(ExperimentConfig, ROOT / "configs" / "quick.yaml", [f"run_dir={tmp_path}", "seeds=[0]", *SLIM])
    run_experiment(config, log=lambda *_: None)
    seed = tmp_path / "seed-0"
    assert not (seed / "train" / "joint").exists() and not (seed / "train" / "routed" / config.games[1]).exists()
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert set(summary["methods"]) == {f"{m} of continual adapters" for m in config.continual.methods}
    assert "routed" not in " ".join(f for failures in summary["bar"].values() for f in map(str, failures))
