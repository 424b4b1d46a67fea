"""``ilora tune-merge``: the best setting is never worse than the default, a killed search resumes
to the record of an uninterrupted one, the Q-learning update is the textbook one, bad inputs
exit 2 before any work."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from ilora.cli import main
from ilora.experiment import tune_merge as tm
from ilora.fileio import file_sha256
from ilora.models.load import builtin_base

from merge_helpers import make_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = {"ilora": {"keep": [0.4, 0.8]}, "ties": {"density": [0.3, 0.6]}}
SMALL = ["--set", "methods=[ilora,ties]", "--set", f"options={json.dumps(OPTIONS)}", "--set", "weights=[0.5,1.0]",
         "--set", "rows=6", "--set", "general_rows=6", "--set", "tpe.startup_trials=2"]


def small_settings(**changes) -> tm.TuneSettings:
    small = dict(methods=["ilora", "ties"], options=OPTIONS, weights=[0.5, 1.0], rows=6, general_rows=6,
                 tpe=tm.TPESettings(startup_trials=2))
    return tm.TuneSettings(**{**small, **changes})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Two tiny adapters on the shipped base, each game's held-out rows and general rows, on disk and in memory."""
    from datasets import load_from_disk

    from ilora.atari.collect import collect_dataset
    from ilora.general.data import generate_general

    root = tmp_path_factory.mktemp("tune")
    z = {"root": root}
    z["a"] = make_adapter(builtin_base(), root / "a", seed=1, r=4, alpha=8, targets=["q_proj", "v_proj"])
    z["b"] = make_adapter(builtin_base(), root / "b", seed=2, r=4, alpha=8, targets=["q_proj", "v_proj"])
    for game in ("Pong", "Breakout"):
        collect_dataset(game, 1, seed=3, max_steps=12, progress=False, reasoning=False).save_to_disk(str(root / game))
    generate_general(6, 0, "test", image_size=32).save_to_disk(str(root / "general"))
    z["heldout"] = {g: load_from_disk(str(root / g)) for g in ("Pong", "Breakout")}
    z["general"] = load_from_disk(str(root / "general"))
    return z


def records(out: Path, strategy: str) -> list[dict]:
    return tm.read_trials(out / f"trials-{strategy}.jsonl")


def without_seconds(trials: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in trials]


@pytest.fixture(scope="module")
def searched(inputs) -> Path:
    """One search through the CLI, both strategies, 5 trials each."""
    out = inputs["root"] / "searched"
    argv = ["tune-merge", str(inputs["a"]), str(inputs["b"]), "--base", "builtin", "--data",
            f"Pong={inputs['root'] / 'Pong'}", "--data", f"Breakout={inputs['root'] / 'Breakout'}",
            "--general", str(inputs["root"] / "general"), "--trials", "5", "--strategy", "qlearning",
            "--strategy", "tpe", "--objective", "min", "--out", str(out), *SMALL]
    assert main(argv) == 0
    return out


def test_best_beats_or_ties_the_default_and_replays(inputs, searched):
    from ilora.merge.io import LoraAdapter, load_merged_state

    references = json.loads((searched / tm.SEARCH_RECORD).read_text())["references"]
    best = yaml.safe_load((searched / tm.BEST_RECORD).read_text())
    everything = []
    for strategy in ("qlearning", "tpe"):
        trials = records(searched, strategy)
        assert len(trials) == 5
        # Trial 0 is the default: the first method with its default options.
        assert trials[0]["setting"] == {"method": "ilora", "options": {"keep": 0.8}}
        assert max(r["objective"] for r in trials) >= trials[0]["objective"]
        for r in trials:
            for game in ("Pong", "Breakout"):
                assert r["rewards"][game] == pytest.approx(r["scores"][game]["score"] - references["skills"][game]["score"])
            assert r["rewards"]["general"] == pytest.approx(r["scores"]["general"]["accuracy"] - references["general"]["accuracy"])
            assert r["objective"] == min(r["rewards"].values())
        everything += trials
    assert best["objective"] == max(r["objective"] for r in everything) >= best["default_objective"]
    assert (searched / tm.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # best.yaml's command writes the best merge; on the base it scores what the search recorded.
    argv = shlex.split(best["command"])
    assert argv[:2] == ["ilora", "merge"] and main(argv[1:]) == 0
    state = load_merged_state(searched / "merged")
    assert state.meta["method"] == best["method"]
    assert {k: state.meta["options"][k] for k in best["options"]} == best["options"]
    winner = next(r for r in records(searched, best["strategy"]) if r["trial"] == best["trial"])
    scorer = tm.MergeScorer([LoraAdapter(inputs["a"]), LoraAdapter(inputs["b"])], str(builtin_base()),
                            inputs["heldout"], inputs["general"], small_settings())
    scorer.set_delta(state)
    replayed = scorer.skill_scores(["Pong", "Breakout"])
    for game, score in replayed.items():
        assert score["agreement"] == winner["scores"][game]["agreement"]
        assert score["margin"] == pytest.approx(winner["scores"][game]["margin"], rel=1e-4, abs=1e-4)


class Killed(Exception):
    pass


def kill_after(monkeypatch, strategy: str, trials: int) -> None:
    """Kill the search once ``strategy``'s record holds ``trials`` trials (as a killed process would stop)."""
    write = tm.atomic_write_text

    def write_then_die(path, text):
        write(path, text)
        if Path(path).name == f"trials-{strategy}.jsonl" and text.count("\n") == trials:
            raise Killed

    monkeypatch.setattr(tm, "atomic_write_text", write_then_die)


def test_killed_search_resumes_to_the_uninterrupted_record(inputs, tmp_path, monkeypatch):
    def search(out: Path, resume: bool = False):
        return tm.tune_merge([inputs["a"], inputs["b"]], "builtin", inputs["heldout"], out, small_settings(trials=6),
                             inputs["general"], resume=resume, progress=False)

    search(tmp_path / "once")
    resumed = tmp_path / "resumed"
    for strategy, trials in (("qlearning", 2), ("tpe", 3)):
        with monkeypatch.context() as patch:
            kill_after(patch, strategy, trials)
            with pytest.raises(Killed):
                search(resumed, resume=resumed.exists())
        assert len(records(resumed, strategy)) == trials
        for name in ("qlearning", "tpe"):  # what was recorded is a prefix of the uninterrupted record
            partial = without_seconds(records(resumed, name))
            assert partial == without_seconds(records(tmp_path / "once", name))[: len(partial)]
        assert not (resumed / tm.BEST_RECORD).exists()
    search(resumed, resume=True)
    for strategy in ("qlearning", "tpe"):
        assert without_seconds(records(resumed, strategy)) == without_seconds(records(tmp_path / "once", strategy))
    assert yaml.safe_load((resumed / tm.BEST_RECORD).read_text())["objective"] == \
        yaml.safe_load((tmp_path / "once" / tm.BEST_RECORD).read_text())["objective"]


def test_q_update_on_two_states_by_hand():
    a, b = (0,), (1,)
    to_b, to_a = (0, 1), (0, 0)
    q: dict = {}
    # Q(a,→b) = 0 + 0.5 (1 + 0.9·0 − 0) = 0.5
    assert tm.q_update(q, a, to_b, 1.0, b, [to_a], alpha=0.5, gamma=0.9) == pytest.approx(0.5)
    # Q(b,→a) = 0 + 0.5 (0 + 0.9·Q(a,→b) − 0) = 0.225
    assert tm.q_update(q, b, to_a, 0.0, a, [to_b], alpha=0.5, gamma=0.9) == pytest.approx(0.225)
    # Q(a,→b) = 0.5 + 0.5 (1 + 0.9·0.225 − 0.5) = 0.85125
    assert tm.q_update(q, a, to_b, 1.0, b, [to_a], alpha=0.5, gamma=0.9) == pytest.approx(0.85125)
    assert q == {(a, to_b): pytest.approx(0.85125), (b, to_a): pytest.approx(0.225)}


def test_strategies_stay_in_the_space_and_q_learning_steps_to_neighbours(tmp_path):
    """A toy reward (no model): every proposal is a setting of the space; Q-learning changes one choice per step."""
    settings = small_settings(trials=12, methods=["ilora", "ties", "task_arithmetic"])
    space = tm.SearchSpace(settings, n_inputs=2)
    assert [d.name for d in space.dims] == ["method", "ilora.keep", "ties.density", "weight.0", "weight.1"]
    assert space.dims[1].values == (0.4, 0.8) and space.dims[2].values == (0.3, 0.5, 0.6)  # ties' default 0.5 added
    assert space.dims[3].values == (0.5, 1.0)

    def toy(setting):
        rewards = {"x": -abs(setting["options"].get("density", 0.0) - 0.6) - sum(setting["options"].get("weights", [0]))}
        return {"rewards": rewards, "objective": tm.objective_of(rewards, "min")}

    for name, search in tm.SEARCHES.items():
        trials = tm.run_search(search(space, settings), space, toy, 12, tmp_path / f"{name}.jsonl", {}, progress=False)
        for before, after in zip(trials, trials[1:]):
            assert after["setting"] == space.setting(tuple(after["state"]))
            if name == "qlearning":
                changed = [d for d, (x, y) in enumerate(zip(before["state"], after["state"])) if x != y]
                assert changed == [after["move"][0]]
                assert changed == [0] or abs(before["state"][changed[0]] - after["state"][changed[0]]) == 1


def snapshot(*folders: Path) -> dict[str, str]:
    return {str(p): "dir" if p.is_dir() else file_sha256(p) for f in folders for p in sorted(f.rglob("*"))}


# (case, changes to the good command line, words the one error line must contain): ``adapters`` and
# ``data`` replace those arguments, ``args`` are appended (a later option wins); {x} is a path from ``inputs``.
BAD = [
    ("missing adapter", {"adapters": ["{root}/nope", "{b}"]}, ["{root}/nope", "no such"]),
    ("same adapter twice", {"adapters": ["{a}", "{a}"]}, ["{a}", "same folder"]),
    ("fewer --data than adapters", {"data": ["Pong={root}/Pong"]}, ["2 adapters", "1 --data"]),
    ("unknown game", {"data": ["Pongg={root}/Pong", "Breakout={root}/Breakout"]}, ["Pongg", "unknown game"]),
    ("missing data folder", {"data": ["Pong={root}/none", "Breakout={root}/Breakout"]},
     ["{root}/none", "datasets.save_to_disk"]),
    ("general rows as held-out rows", {"data": ["Pong={root}/general", "Breakout={root}/Breakout"]},
     ["{root}/general", "action"]),
    ("held-out rows as general rows", {"args": ["--general", "{root}/Pong"]}, ["{root}/Pong", "task"]),
    ("unknown method", {"args": ["--set", "methods=[ilora,nope]"]}, ["nope", "not a merge method"]),
    ("unknown option", {"args": ["--set", "options.ilora.density=[0.5]"]}, ["options.ilora.density", "no option"]),
    ("option value refused", {"args": ["--set", "options.ties.density=[1.5]"]}, ["options.ties.density", "1.5"]),
    ("option value of the wrong type", {"args": ["--set", "options.ilora.keep=[x]"]}, ["options.ilora.keep", "'x'"]),
    ("no trials", {"args": ["--trials", "0"]}, ["trials", "at least 1"]),
    ("bad objective", {"args": ["--set", "objective=max"]}, ["objective", "max"]),
    ("bad epsilon", {"args": ["--set", "qlearning.epsilon=2"]}, ["qlearning.epsilon", "2"]),
    ("missing config", {"args": ["--config", "{root}/none.yaml"]}, ["{root}/none.yaml", "not found"]),
    ("missing base", {"args": ["--base", "models/none"]}, ["models/none", "no such model folder"]),
    ("resume without record", {"args": ["--resume", "--out", "{root}/fresh"]}, ["--resume", "nothing to resume"]),
    ("out not empty", {"args": ["--out", "{root}/searched"]}, ["{root}/searched", "--resume"]),
    ("resume a changed space", {"args": ["--resume", "--out", "{root}/searched", "--set", "weights=[0.5,1.5]"]},
     ["search.json", "differs at space"]),
]


@pytest.mark.parametrize("case, changes, words", BAD, ids=[c[0] for c in BAD])
def test_bad_input_exits_2_before_any_work(inputs, searched, case, changes, words, capsys):
    paths = {k: str(v) for k, v in inputs.items() if isinstance(v, Path)}
    fill = lambda items: [x.format(**paths) for x in items]  # noqa: E731
    adapters = fill(changes.get("adapters", ["{a}", "{b}"]))
    data = fill(changes.get("data", ["Pong={root}/Pong", "Breakout={root}/Breakout"]))
    argv = ["tune-merge", *adapters, "--base", "builtin", *(x for d in data for x in ("--data", d)),
            "--general", paths["root"] + "/general", "--trials", "5", "--out", paths["root"] + "/new", *SMALL,
            *fill(changes.get("args", []))]
    before = snapshot(inputs["root"])
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for word in fill(words):
        assert word in err, err
    assert snapshot(inputs["root"]) == before
    assert not (inputs["root"] / "new").exists() and not (inputs["root"] / "fresh").exists()
