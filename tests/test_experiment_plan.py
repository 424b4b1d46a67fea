"""The experiment's plan: typed stage specs, their inputs and names, and the loss weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ilora.config import load_yaml
from ilora.errors import IloraError
from ilora.experiment.config import ExperimentConfig, LossWeights
from ilora.experiment.plan import EvalSpec, MergeSpec, build_plan, stage_kind

ROOT = Path(__file__).resolve().parent.parent


def quick(*overrides: str) -> ExperimentConfig:
    return load_yaml(ExperimentConfig, ROOT / "configs" / "quick.yaml", list(overrides))


def test_every_stage_is_named_once_and_reads_only_stages_before_it():
    plan = build_plan(quick())
    seen = {"base"}
    for spec in plan.specs():
        assert spec.stage not in seen, spec.stage
        assert set(spec.deps) <= seen, (spec.stage, set(spec.deps) - seen)
        seen.add(spec.stage)
    assert len(seen) - 1 == len(plan.specs())


def test_merges_and_evaluations_are_typed_not_parsed_from_names():
    config = quick()
    plan = build_plan(config)
    merges = {m.name: m for m in plan.merges}
    step = merges["iter/Breakout-Pong/2"]
    assert step == MergeSpec("iter/Breakout-Pong/2", ("routed/Breakout", "routed/Pong"), "ilora",
                             {"keep": config.merge.keep}, "iterative", ("Breakout", "Pong"), False,
                             ("base", "train/routed/Breakout", "train/routed/Pong"))
    assert merges["ablation-merge/norm_only"].inputs == ("ablation/norm_only/Pong", "ablation/norm_only/Breakout")
    evals = {e.model: e for e in plan.evals}
    assert evals["routed/Pong"] == EvalSpec(
        "routed/Pong", ("Pong", "Breakout"), "Pong", True,
        ("base", "train/routed/Pong", "data/Pong", "data/Breakout", "data/general"))
    assert evals["merge/ilora"].own_game is None and not evals["merge/ilora"].blank
    assert not any(m.startswith("continual/") for m in evals)  # played in their merges only
    assert plan.stage_of("routed/Pong") == "train/routed/Pong" and plan.stage_of("merge/ties") == "merge/ties"
    with pytest.raises(KeyError, match="no model named 'merge/nope'"):
        plan.stage_of("merge/nope")


def test_intermediate_iterative_merges_are_played_only_when_asked():
    three = ["Pong", "Breakout", "Freeway"]
    games = [f"games=[{','.join(three)}]", "merge.orders=[]", "ablations.variants={}", "refit.steps_share=0"]
    played = {e.model: e.games for e in build_plan(quick(*games)).evals}
    assert played["iter/Pong-Breakout-Freeway/2"] == ("Pong", "Breakout")
    assert played["iter/Pong-Breakout-Freeway/3"] == tuple(three)
    last_only = {e.model for e in build_plan(quick(*games, "merge.play_intermediate=false")).evals}
    assert "iter/Pong-Breakout-Freeway/2" not in last_only and "iter/Pong-Breakout-Freeway/3" in last_only


def test_loss_weights_reach_each_adapter_and_plain_ones_read_no_general_rows():
    config = quick("train.eps_lm=0.5")
    adapters = {a.name: a for a in build_plan(config).adapters}
    assert adapters["plain/Pong"].weights == LossWeights(0.5, 0.0, 0.0)
    assert "data/general" not in adapters["plain/Pong"].deps and not adapters["plain/Pong"].others
    routed = adapters["routed/Pong"]
    assert routed.weights == LossWeights(0.5, config.train.eps_kl, config.train.eps_norm)
    assert routed.others == ("Breakout",) and "data/general" in routed.deps
    assert adapters["ablation/norm_only/Pong"].weights == LossWeights(0.5, 0.0, 2.0)


def test_a_misspelled_ablation_weight_is_an_error_not_a_zero():
    with pytest.raises(IloraError, match=r"ablations.variants.typo: unknown loss weight\(s\) \['eps_nrom'\]"):
        quick("ablations.variants={typo: {eps_kl: 0.01, eps_nrom: 2.0}}")


def adapter_cache_keys(tmp_path: Path, *overrides: str) -> dict[str, Any]:
    """Every adapter stage's hashed settings (what ``Experiment.stage`` is given), nothing trained."""
    from ilora.experiment.pipeline import Experiment

    keys: dict[str, Any] = {}
    experiment = Experiment(quick(f"run_dir={tmp_path}", *overrides))
    experiment.stage = lambda name, config, fn, deps=(): keys.setdefault(name, config)
    for spec in experiment.plan.adapters:
        if not spec.starts_from:
            experiment.train(spec)
    return keys


def test_an_adapter_stage_hashes_only_what_its_training_reads(tmp_path):
    default = adapter_cache_keys(tmp_path)
    assert {"train/plain/Pong", "train/joint", "train/routed/Pong"} <= set(default)

    def changed(*overrides: str) -> set[str]:
        new = adapter_cache_keys(tmp_path, *overrides)
        return {name for name in default if new[name] != default[name]}

    routed = {name for name in default if name.startswith(("train/routed/", "train/ablation/"))}
    routed_by_config = {name for name in routed if "/routed/" in name}
    # Plain and joint adapters read no general rows: their caches survive the routing weights and the mix.
    assert changed("train.eps_norm=3.0") == routed_by_config  # ablation variants set their own weights
    assert changed("train.general_share=0.25") == routed
    assert changed("data.other_game_rows=7") == routed
    assert changed("train.learning_rate=0.001") == set(default)


def test_every_stage_is_counted_under_one_compute_kind():
    plan = build_plan(quick())  # the quick config has every kind of stage
    assert sorted({stage_kind(spec) for spec in plan.specs()}) == [
        "analysis", "data", "eval", "grams", "merge", "train/ablation", "train/continual", "train/joint", "train/plain",
        "train/refit", "train/routed", "tuned-merge"]
    assert {spec.name: spec.family for spec in plan.adapters}["routed/Pong"] == "routed"
