"""`configs/quick.yaml` end to end: every stage, the report's tables, caching and redo."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest

from ilora.config import load_yaml
from ilora.experiment.config import ExperimentConfig
from ilora.experiment.pipeline import Experiment
from ilora.experiment.results import merged_models

ROOT = Path(__file__).resolve().parent.parent
SCORE_BOUNDS = {"Pong": (-21, 21), "Breakout": (0, 864)}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("quick") / "run"
    config = load_yaml(ExperimentConfig, ROOT / "configs" / "quick.yaml", [f"run_dir={run_dir}"])
    report = Experiment(config, log=lambda *_: None).run()
    return config, run_dir, report


def test_report_has_every_table_and_figure(quick_run):
    config, run_dir, report = quick_run
    text = report.read_text()
    for heading in ["## 1. Single-task", "## 2. Routing-tuned", "### Damage to the other games", "## 3. General",
                    "## 4. Retention", "### Offline agreement", "## 5. Iterative", "## 6. LoRA activation norms",
                    "## 7. Keep-ratio sweep", "Loss ablations", "## Do the models read the images?",
                    "the best per game"]:
        assert heading in text, heading
    folder = report.parent
    for png in ["retention.png", "keep_sweep.png", "heatmap-plain.png", "heatmap-routed.png"]:
        assert (folder / png).stat().st_size > 1000, png
    assert list(folder.glob("routed-*.gif"))
    summary = json.loads((folder / "summary.json").read_text())
    methods = summary["merges"]["methods"]
    assert set(methods) == set(merged_models(config))
    for row in methods.values():
        assert set(row["retention"]) == set(config.games)
        values = [r["value"] for r in row["retention"].values()]
        for value in [*values, row["mean"], row["min"]["value"], row["normalised_mean"]["value"]]:
            assert value is None or math.isfinite(value)


def test_every_score_is_in_range_with_ordered_ci(quick_run):
    _, run_dir, _ = quick_run
    results = [json.loads(p.read_text())["result"] for p in (run_dir / "eval").rglob("stage.json")]
    assert len(results) >= 15  # references, base, adapters, merges, iterations, ablations
    checked = 0
    for result in results:
        summaries = list(result.get("play", {}).values()) + list(result.get("blank", {}).values())
        summaries += [result[k] for k in ("random", "expert") if k in result]
        for s in summaries:
            lo, hi = SCORE_BOUNDS[s["game"]]
            assert lo <= s["ci_low"] <= s["mean"] <= s["ci_high"] <= max(hi, s["ci_high"])
            assert all(lo <= x <= hi for x in s["scores"])
            assert 0 <= s["invalid_rate"] <= 1
            checked += 1
        if "general" in result:
            g = result["general"]
            assert 0 <= g["ci95_low"] <= g["accuracy"] <= g["ci95_high"] <= 1
    assert checked > 40


def test_the_scripted_expert_beats_random(quick_run):
    """The weak form of the report's 'agents really play' bar that the quick budget allows."""
    _, run_dir, _ = quick_run
    ref = json.loads((run_dir / "eval" / "reference" / "Breakout" / "stage.json").read_text())["result"]
    assert ref["expert"]["mean"] > ref["random"]["mean"]


def test_rerun_skips_and_a_deleted_stage_is_redone_with_its_dependents(quick_run):
    config, run_dir, _ = quick_run
    serial = dataclasses.replace(config, workers=1)
    again = Experiment(serial, log=lambda *_: None)
    again.run()
    assert again.runner.ran == []
    shutil.rmtree(run_dir / "merge" / "ilora")
    redo = Experiment(serial, log=lambda *_: None)
    redo.run()
    # the merge is redone with what reads it: its play and the interference analysis of the merges
    assert sorted(redo.runner.ran) == ["analysis/interference", "eval/merge/ilora", "merge/ilora", "report"]


def test_routed_and_joint_adapters_see_as_many_task_rows_as_plain_ones(quick_run):
    """Routed batches also carry general rows, so routed adapters take more steps (match_task_rows);
    the joint adapter takes the single-game adapters' steps together."""
    config, run_dir, _ = quick_run
    batch = config.train.batch_size
    joint = json.loads((run_dir / "train" / "joint" / "stage.json").read_text())["result"]
    assert joint["steps"] == config.train.max_steps * len(config.games)
    for game in config.games:
        plain = json.loads((run_dir / "train" / "plain" / game / "stage.json").read_text())["result"]
        routed = json.loads((run_dir / "train" / "routed" / game / "stage.json").read_text())["result"]
        assert plain["steps"] == config.train.max_steps
        n_general = config.data.other_game_rows * (len(config.games) - 1)
        n_general += max(1, int(config.train.general_share * routed["task_rows"]))
        task_share = routed["task_rows"] / (routed["task_rows"] + n_general)
        assert routed["steps"] > plain["steps"]
        assert routed["steps"] * batch * task_share >= plain["steps"] * batch
        assert (routed["steps"] - 1) * batch * task_share < plain["steps"] * batch  # and no more than that


def test_references_and_own_game_cells_play_own_game_episodes(quick_run):
    """The bar and every retention's denominator rest on these cells, so they get more episodes."""
    config, run_dir, _ = quick_run
    e = config.eval
    assert e.own_game_episodes > e.episodes

    def result(stage: str) -> dict:
        return json.loads((run_dir / stage / "stage.json").read_text())["result"]

    for game in config.games:
        ref = result(f"eval/reference/{game}")
        assert ref["random"]["episodes"] == ref["expert"]["episodes"] == e.own_game_episodes
        for kind in ("plain", "routed"):
            plays = result(f"eval/{kind}/{game}")["play"]
            assert {g: p["episodes"] for g, p in plays.items()} == {
                g: e.own_game_episodes if g == game else e.episodes for g in config.games
            }
        assert result(f"eval/routed/{game}")["blank"][game]["episodes"] == e.episodes
    assert all(p["episodes"] == e.episodes for p in result("eval/merge/ilora")["play"].values())


def test_a_forced_stage_is_redone_by_the_workers_with_exactly_what_reads_it(quick_run):
    """Workers recompute the forced training; the evaluations they run re-enter it without redoing it."""
    config, run_dir, _ = quick_run
    assert config.workers == 2
    forced = Experiment(config, force=("train/routed/Pong",), log=lambda *_: None)
    forced.run()
    merges = ["merge/ilora", "merge/magmax", "merge/ties", "merge/peft:linear", "keep/0.5",
              "iter/Pong-Breakout/2", "iter/Breakout-Pong/2", "ablation-merge/routed"]
    merges += ["merge-refit/sum", "merge-continual/sum"]
    refits = [f"train/refit/{g}" for g in config.games] + [f"eval/refit/{g}" for g in config.games]
    refits += [f"train/continual/{g}" for g in config.games[1:]]
    readers = ["tuned-merge", "eval/tuned-merge", *[f"eval/select/{rule}" for rule in config.selection.rules]]
    expected = {"train/routed/Pong", "eval/routed/Pong", "analysis/routed/Pong", "grams/Pong", "analysis/interference",
                "report", *merges, *[f"eval/{m}" for m in merges], *refits, *readers}
    assert forced.runner.redone == expected
    record = json.loads((run_dir / "train" / "routed" / "Pong" / "stage.json").read_text())
    assert record["fingerprint"] == forced.runner.fingerprint("train/routed/Pong")


def test_refit_adapters_continue_from_their_routed_adapter_with_the_others_folded(quick_run):
    """A refit adapter starts from its game's routed adapter, on the base with the other games'
    routed adapters added, for its share of the routed adapter's steps; the report merges them."""
    from ilora.fileio import file_sha256

    config, run_dir, report = quick_run
    for game in config.games:
        record = json.loads((run_dir / "train" / "refit" / game / "adapter" / "trained_on.json").read_text())
        weights = {g: file_sha256(run_dir / "train" / "routed" / g / "adapter" / "adapter_model.safetensors")
                   for g in config.games}
        assert record["init"]["sha256"] == weights[game]
        assert [f["sha256"] for f in record["folded"]] == [weights[g] for g in config.games if g != game]
        steps = {kind: json.loads((run_dir / "train" / kind / game / "stage.json").read_text())["result"]["steps"]
                 for kind in ("routed", "refit")}
        assert steps["refit"] == max(1, round(steps["routed"] * config.refit.steps_share))
    assert "sum of refit adapters" in report.read_text()


def test_continual_adapters_are_trained_on_the_earlier_games_adapters(quick_run):
    """Each game after the first trains a fresh routed adapter on the base with the earlier games'
    continual adapters folded in (the first game's is its routed adapter), for the routed steps."""
    from ilora.fileio import file_sha256

    config, run_dir, report = quick_run
    earlier = [run_dir / "train" / "routed" / config.games[0] / "adapter"]
    for game in config.games[1:]:
        folder = run_dir / "train" / "continual" / game
        record = json.loads((folder / "adapter" / "trained_on.json").read_text())
        assert record["init"] is None
        assert [f["sha256"] for f in record["folded"]] == [file_sha256(a / "adapter_model.safetensors") for a in earlier]
        routed = json.loads((run_dir / "train" / "routed" / game / "stage.json").read_text())["result"]["steps"]
        assert json.loads((folder / "stage.json").read_text())["result"]["steps"] == routed
        earlier.append(folder / "adapter")
    assert "sum of continual adapters" in report.read_text()
    recorded = json.loads((run_dir / "train" / "routed" / config.games[0] / "adapter" / "prompt_settings.json").read_text())
    assert recorded["games"] == [config.games[0]] and recorded["object_text"] == config.data.object_text


def test_selection_rules_and_the_tuned_merge_sit_beside_the_merges(quick_run):
    """Each rule plays every game with the routed adapters side by side; the oracle always picks the
    game's own adapter; the tuned merge records its whole search and is played like the others."""
    config, run_dir, report = quick_run
    text = report.read_text()
    for rule in config.selection.rules:
        result = json.loads((run_dir / "eval" / "select" / rule / "stage.json").read_text())["result"]
        assert set(result["play"]) == set(config.games)
        assert result["selection"]["rule"] == rule and result["selection"]["cost_ratio"] > 0
        assert f"skill chosen per input: {rule}" in text
    oracle = json.loads((run_dir / "eval" / "select" / "oracle" / "stage.json").read_text())["result"]
    assert oracle["selection"]["accuracy"] == 1.0
    assert all(set(k for k, v in oracle["chosen"][g].items() if v) == {g} for g in config.games)
    search = config.tuned_merge.search
    tuned = json.loads((run_dir / "tuned-merge" / "stage.json").read_text())["result"]
    assert tuned["trials"] == search.trials * len(search.strategies)
    for strategy in search.strategies:
        lines = (run_dir / "tuned-merge" / "search" / f"trials-{strategy}.jsonl").read_text().splitlines()
        assert len(lines) == search.trials
    assert tuned["objective"] >= tuned["default_objective"]  # trial 0 is the default setting
    assert "### Merge tuned by reward" in text and "merge tuned by reward" in text
