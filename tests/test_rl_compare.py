"""``ilora rl-compare`` (issue 19's measurement): config refusals, the report from a summary, stage caching.

A stub source stands in for an experiment replicate: the shipped base, a few expert rows per
game, a few general rows and random LoRA adapters, each with a ``stage.json`` as the
experiment writes them.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from ilora.cli import main
from ilora.experiment.rl_compare import (
    KINDS,
    RLCompare,
    check_sources,
    difference,
    load_config,
    render_report,
    replicate_seed,
    write_report,
)
from ilora.experiment.schedule import Schedule
from ilora.experiment.stats import Estimate
from ilora.models.load import builtin_base

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "rl_compare.yaml"
GAMES = ["Pong", "Breakout"]


def mark_stage(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stage.json").write_text(json.dumps({"name": name, "fingerprint": f"fp-{name.replace('/', '-')}"}))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An experiment replicate's folders, as small as they get: two games, random rank-4 adapters."""
    from routing_helpers import random_lora_vlm

    from ilora.atari.collect import collect_dataset
    from ilora.general.data import generate_general

    root = tmp_path_factory.mktemp("source") / "seed-0"
    shutil.copytree(builtin_base(), root / "base" / "model")
    mark_stage(root / "base", "base")
    for k, game in enumerate(GAMES):
        mark_stage(root / "data" / game, f"data/{game}")
        for split, seed in (("train", 0), ("heldout", 10_000)):
            rows = collect_dataset(game, 1, seed, object_text=True, max_steps=12, progress=False)
            rows.save_to_disk(str(root / "data" / game / split))
        for j, kind in enumerate(("plain", "routed")):
            model, _ = random_lora_vlm(root / "base" / "model", seed=10 * k + j)
            model.save_pretrained(str(root / "train" / kind / game / "adapter"))
            mark_stage(root / "train" / kind / game, f"train/{kind}/{game}")
    generate_general(8, 0, "test").save_to_disk(str(root / "data" / "general" / "test"))
    mark_stage(root / "data" / "general", "data/general")
    return root


def tiny_settings(source: Path, run_dir: Path, *extra: str) -> list[str]:
    """``--set`` overrides for a run of seconds on the stub source."""
    return [
        f"run_dir={run_dir}", f"sources=[{source}]", "games=[Pong]", f"all_games=[{','.join(GAMES)}]",
        "frames=16", "rl.groups=1", "rl.group_size=2", "rl.horizon=2", "rl.lora_r=4", "rl.lora_alpha=8",
        "rl.max_episode_frames=40", "eval.own_episodes=2", "eval.other_episodes=1", "eval.n_envs=2",
        "eval.max_frames=40", "eval.general_rows=4", "eval.margin_rows=4", "eval.grams_rows=4", "workers=1", *extra,
    ]


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    "override, needle",
    [
        ("bogus=1", "unknown key(s) ['bogus']"),
        ("eval.episodes=3", "unknown key(s) ['episodes']"),
        ("games=[Pacman]", "unknown game 'Pacman'"),
        ("games=[Seaquest]", "all_games"),
        ("cloned=joint", "cloned = 'joint'"),
        ("rl.frames=100", "rl.frames: set by the comparison"),
        ("rl.seed=3", "rl.seed: set by the comparison"),
        ("from_clone={lr: 0.1}", "from_clone: ['lr'] are not GRPO settings"),
        ("from_clone={frames: 10}", "from_clone: ['frames'] are not GRPO settings"),
        ("from_clone={learning_rate: -1}", "learning_rate = -1.0"),
        ("per_game={Seaquest: {horizon: 4}}", "per_game: ['Seaquest'] are not among all_games"),
        ("per_game={Boxing: {frames: 4}}", "per_game.Boxing: ['frames'] are not GRPO settings"),
        ("per_game={Boxing: {horizon: 0}}", "horizon"),
        ("merge.methods=[regmean]", "needs general Grams"),
        ("merge.methods=[nope]", "unknown merge method"),
        ("eval.own_episodes=0", "eval.own_episodes = 0"),
        ("eval.own_episodes=eight", "expected int"),
        ("frames=0", "frames = 0"),
        ("sources=[/nonexistent/seed-9]", "/nonexistent/seed-9 is not a folder"),
    ],
)
def test_bad_config_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, override, needle):
    run_dir = tmp_path / "out"
    assert main(["rl-compare", str(CONFIG), "--set", f"run_dir={run_dir}", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("ilora rl-compare: error:") and needle in err, err
    assert not run_dir.exists()


def test_source_missing_a_stage_is_refused_in_one_line(source, tmp_path, capsys):
    broken = tmp_path / "seed-0"
    shutil.copytree(source, broken)
    (broken / "train" / "routed" / "Breakout" / "stage.json").unlink()
    args = ["rl-compare", str(CONFIG), *[a for s in tiny_settings(broken, tmp_path / "out") for a in ("--set", s)]]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "train/routed/Breakout is not a finished stage" in err and err.count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_the_shipped_config_loads_and_names_its_games():
    cfg = load_config(CONFIG)
    assert cfg.games == ["Boxing", "Breakout"] and set(cfg.games) <= set(cfg.all_games)
    assert cfg.rl_settings("rl-clone", "Boxing", 100, 1).frames == 100
    for key, value in cfg.from_clone.items():
        assert getattr(cfg.rl_settings("rl-clone", "Boxing"), key) == value


def test_per_game_settings_apply_to_that_games_runs_and_from_clone_goes_last():
    cfg = load_config(CONFIG, ["per_game={Breakout: {horizon: 32, beta: 0.5}}", "from_clone={beta: 0.3}"])
    assert cfg.rl_settings("rl-base", "Breakout").horizon == 32 and cfg.rl_settings("rl-base", "Breakout").beta == 0.5
    assert cfg.rl_settings("rl-clone", "Breakout").horizon == 32 and cfg.rl_settings("rl-clone", "Breakout").beta == 0.3
    assert cfg.rl_settings("rl-base", "Boxing").horizon == cfg.rl.horizon


# ------------------------------------------------------------------- caching
def test_stages_are_cached_and_redone_when_their_settings_change(source, tmp_path):
    def stages(*extra: str) -> RLCompare:
        x = RLCompare(load_config(CONFIG, tiny_settings(source, tmp_path / "run", *extra)), log=lambda *_: None)
        check_sources(x.cfg)
        x.adapter("seed-0", "routed", "Pong")
        x.grams("seed-0", "routed", "Pong")
        x.reference("seed-0", "Pong")
        return x

    first = stages()
    assert first.runner.ran == ["seed-0/adapter/routed/Pong", "seed-0/grams/routed/Pong", "seed-0/eval/reference/Pong"]
    rep = first.reps["seed-0"]
    linked = first.adapter_dir(rep, "routed", "Pong") / "adapter_model.safetensors"
    assert linked.samefile(source / "train" / "routed" / "Pong" / "adapter" / "adapter_model.safetensors")
    assert (first.grams_dir(rep, "routed", "Pong") / "grams.safetensors").is_file()
    assert not (first.adapter_dir(rep, "routed", "Pong") / "grams.safetensors").exists()

    again = stages()
    assert again.runner.ran == [] and len(again.runner.skipped) == 3
    assert stages("eval.grams_rows=3").runner.ran == ["seed-0/grams/routed/Pong"]  # nothing else reads grams_rows
    assert stages("eval.grams_rows=3", "eval.max_frames=48").runner.ran == ["seed-0/eval/reference/Pong"]
    forced = RLCompare(load_config(CONFIG, tiny_settings(source, tmp_path / "run", "eval.grams_rows=3", "eval.max_frames=48")),
                       force=("seed-0/adapter",), log=lambda *_: None)
    forced.adapter("seed-0", "routed", "Pong")
    forced.grams("seed-0", "routed", "Pong")
    assert forced.runner.ran == ["seed-0/adapter/routed/Pong", "seed-0/grams/routed/Pong"]  # and what read it


def test_adding_a_source_redoes_none_of_the_others_stages(source, tmp_path):
    first = RLCompare(load_config(CONFIG, tiny_settings(source, tmp_path / "run")), log=lambda *_: None)
    first.reference("seed-0", "Pong")
    other = tmp_path / "elsewhere" / "seed-7"
    shutil.copytree(source, other)
    both = RLCompare(load_config(CONFIG, tiny_settings(source, tmp_path / "run", f"sources=[{other},{source}]")),
                     log=lambda *_: None)
    both.reference("seed-0", "Pong")
    both.reference("seed-7", "Pong")
    assert both.runner.skipped == ["seed-0/eval/reference/Pong"] and both.runner.ran == ["seed-7/eval/reference/Pong"]
    assert {rep.name: rep.seed for rep in both.reps.values()} == {"seed-0": 0, "seed-7": 7}  # replicates differ


def test_a_folder_not_named_by_its_seed_gets_a_fixed_seed_of_its_own():
    assert replicate_seed("seed-12") == 12
    assert replicate_seed("my-run") == replicate_seed("my-run") != replicate_seed("my-run-2")
    assert 0 <= replicate_seed("my-run") < 10_000


def test_the_stage_graph_is_complete_and_acyclic(source, tmp_path):
    cfg = load_config(CONFIG, tiny_settings(source, tmp_path / "run", "games=[Pong,Breakout]"))
    jobs = RLCompare(cfg, log=lambda *_: None).jobs()
    schedule = Schedule(jobs)  # refuses unknown deps and cycles
    keys = set(schedule.jobs)
    for game in GAMES:
        for kind in KINDS:
            assert f"seed-0/eval/{kind}/{game}" in keys and f"seed-0/grams/{kind}/{game}" in keys
            interference = schedule.jobs[f"seed-0/interference/{kind}/{game}"]
            assert f"seed-0/grams/{kind}/{game}" in interference.deps
            for method in cfg.merge.methods:
                merge = schedule.jobs[f"seed-0/merge/{kind}/{game}/{method}"]
                # merged with every other game's routed adapter, the compared one in its game's place
                assert merge.deps == tuple(f"seed-0/adapter/{kind if g == game else 'routed'}/{g}" for g in GAMES)
    assert schedule.jobs["seed-0/adapter/rl-clone/Pong"].deps == ("seed-0/adapter/clone/Pong",)


# -------------------------------------------------------------------- report
def estimate(value, low=None, high=None) -> dict:
    return {"value": value, "low": value - 1 if low is None else low, "high": value + 1 if high is None else high}


def fake_summary() -> dict:
    games, all_games, methods = ["Boxing"], ["Pong", "Boxing"], ["sum", "ilora"]
    own = {"random": {"score": estimate(-2.0), "normalised": estimate(0.0)},
           "expert": {"score": estimate(10.0), "normalised": estimate(1.0)}}
    for k, model in enumerate(("base", *KINDS)):
        own[model] = {"score": estimate(float(k)), "normalised": estimate(k / 10), "margin": {"mean": 0.5 * k, "positive": 0.25}}
    damage = {f"{kind}/Boxing": {"Pong": estimate(-3.0 + k, -4.0 + k, -2.0 + k), "mean": estimate(-3.0 + k, -4.0 + k, -2.0 + k)}
              for k, kind in enumerate(KINDS)}
    general = {"base": {"accuracy": 0.6, "low": 0.5, "high": 0.7, "n": 200, "change": 0.0}}
    general.update({f"{kind}/Boxing": {"accuracy": 0.5 + 0.01 * k, "low": 0.4, "high": 0.6, "n": 200, "change": -0.1 + 0.01 * k}
                    for k, kind in enumerate(KINDS)})
    merge = {f"{kind}/Boxing": {
        "methods": {m: {"score": estimate(1.0), "normalised": estimate(0.2), "retention": estimate(0.5, 0.1, 0.9),
                        "margin": {"mean": -0.25, "positive": 0.4},
                        "general": {"accuracy": 0.58, "low": 0.5, "high": 0.66, "n": 200, "change": -0.02},
                        "output_change": 0.75} for m in methods},
        "others_on_own_rows": 0.9, "own_on_others_rows": 0.3, "own_output": 0.012} for kind in KINDS}
    claim = {f"{kind}/Boxing": {"damage_difference": estimate(1.0 + k, 0.5, 2.0 + k) if k else estimate(-1.0, -2.0, -0.5),
                                "general_difference": 0.01, "own_difference": -3.0} for k, kind in enumerate(("rl-base", "rl-clone"))}
    run = {"replicate": "seed-1", "updates": 32, "frames": 17300, "seconds": 90.0, "return_first": 0.1, "return_last": 0.3,
           "entropy_first": 1.8, "entropy_last": 0.4, "kl_first": 0.0, "kl_last": 0.9,
           "informative_groups_first": 0.4, "informative_groups_last": 0.1}
    return {
        "games": games, "all_games": all_games, "replicates": ["seed-1"], "sources": ["runs/seeds-full/seed-1"],
        "cloned": "plain", "methods": methods, "episodes": {"own": 8, "other": 4, "max_frames": 2000},
        "frames": {"seed-1": {"Boxing": 17292}},
        "rl": {"settings": {"groups": 4, "group_size": 4, "horizon": 8, "learning_rate": 0.002, "epochs": 2, "beta": 0.04,
                            "temperature": 1.0}, "from_clone": {"learning_rate": 0.0002}},
        "notes": ["tried lr 2e-3: collapse"], "own": {"Boxing": own}, "damage": damage, "general": general,
        "merge": merge, "claim": claim, "training": {"rl-base/Boxing": [run], "rl-clone/Boxing": [run]}, "minutes": 12.3,
    }


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The rows of the first Markdown table after ``heading``, cells stripped."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_report_tables_from_a_summary(tmp_path):
    summary = fake_summary()
    text = render_report(summary)
    for heading in ["## Summary", "## 1. Own-game score", "## 2. Damage to the other games", "## 3. General benchmark",
                    "## 4. Merged with the other games", "## 5. Does RL forget less", "## 6. The RL runs", "## Notes"]:
        assert heading in text, heading
    head = table_rows(text, "## Summary")
    assert head[0] == ["Boxing", "cloned", "1.0 [0.0, 2.0]", "0.10 [-0.90, 1.10]", "-3.0 [-4.0, -2.0]", "-0.100",
                       "0.50 [0.10, 0.90]", "0.50 [0.10, 0.90]"]
    assert [r[1] for r in head] == ["cloned", "RL from base", "RL from the clone"]
    own = table_rows(text, "## 1. Own-game score")
    assert [r[1] for r in own] == ["random", "expert", "base", "cloned", "RL from base", "RL from the clone"]
    assert own[3][2] == "1.0 [0.0, 2.0]" and own[3][4] == "0.50 (0.25)"
    damage = table_rows(text, "## 2. Damage")
    assert damage[0] == ["cloned (Boxing)", "-3.0 [-4.0, -2.0]", "—", "-3.0 [-4.0, -2.0]"]
    general = table_rows(text, "## 3. General")
    assert general[0] == ["base", "0.600 [0.500, 0.700]", "200", "+0.000"] and general[1][3] == "-0.100"
    merged = table_rows(text, "## 4. Merged")
    assert len(merged) == len(KINDS) * 2 and merged[0][:4] == ["cloned (Boxing)", "sum", "1.0 [0.0, 2.0]", "0.50 [0.10, 0.90]"]
    assert merged[0][4] == "0.50 (0.25) -> -0.25 (0.40)"
    assert "RL from base vs cloned: damage to the other games -1.0 [-2.0, -0.5]" in text
    assert "-> RL forgets more" in text and "-> RL forgets less" in text
    assert "8 and 4 episodes per cell" in text and "tried lr 2e-3: collapse" in text
    assert "from the clone: learning_rate 0.0002" in text

    write_report(summary, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["minutes"] == 12.3
    assert (tmp_path / "rl_compare.png").stat().st_size > 5000
    assert (tmp_path / "REPORT.md").read_text() == text


def test_report_survives_undefined_estimates():
    summary = fake_summary()
    summary["merge"]["rl-base/Boxing"]["methods"]["sum"]["retention"] = {"value": None, "low": None, "high": None}
    summary["claim"]["rl-base/Boxing"]["damage_difference"] = {"value": None, "low": None, "high": None}
    text = render_report(summary)
    assert "n/a [n/a, n/a]" in text and "-> undefined" in text


def test_difference_is_paired_over_the_same_draws():
    draws = np.arange(10.0)
    a, b = Estimate(5.0, 0.0, 9.0, draws + 2.0), Estimate(3.0, 0.0, 9.0, draws)
    d = difference(a, b)
    assert d.value == 2.0 and d.low == d.high == 2.0  # every draw differs by exactly 2
    nan = difference(a, Estimate(math.nan, math.nan, math.nan, np.full(10, np.nan)))
    assert math.isnan(nan.low)


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_tiny_run_end_to_end_then_cached(source, tmp_path, capsys):
    moved = tmp_path / "moved" / "seed-0"  # its adapters record the base's old path, which exists but is not this one
    shutil.copytree(source, moved)
    settings = tiny_settings(moved, tmp_path / "run")
    assert main(["rl-compare", str(CONFIG), *[a for s in settings for a in ("--set", s)]]) == 0
    report = tmp_path / "run" / "report" / "REPORT.md"
    summary = json.loads((report.parent / "summary.json").read_text())
    assert (report.parent / "rl_compare.png").is_file() and "## 5. Does RL forget less" in report.read_text()
    # the damage cell is the adapter's mean score there minus the base's, from the stages' results
    x = RLCompare(load_config(CONFIG, settings), log=lambda *_: None)

    def played(stage: str, game: str) -> float:
        return float(np.mean(x.runner.result(f"seed-0/{stage}")["play"][game]["scores"]))

    for kind in KINDS:
        expected = played(f"eval/{kind}/Pong", "Breakout") - played("eval/base", "Breakout")
        assert summary["damage"][f"{kind}/Pong"]["Breakout"]["value"] == pytest.approx(expected)
    assert summary["frames"] == {"seed-0": {"Pong": 16}}
    assert all(run["frames"] >= 16 for runs in summary["training"].values() for run in runs)

    again = RLCompare(load_config(CONFIG, settings), log=lambda *_: None)
    again.run()
    assert again.runner.ran == []  # every stage and the report cached
