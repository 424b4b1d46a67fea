"""The prompt record that travels from collected data to adapters, merged models and play, and
policies given by name."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from ilora.atari.evaluate import play_prompt, recorded_prompt
from ilora.atari.games import DEFAULT_FRAME_SKIP, get_game
from ilora.cli import main
from ilora.errors import IloraError
from ilora.fileio import file_sha256
from ilora.models.load import builtin_base
from ilora.prompt_settings import (
    PROMPT_SETTINGS_FILE,
    RECORD_FRAME_SKIP,
    ROW_LAYOUT,
    PromptSettings,
    combine_prompt_settings,
    read_prompt_settings,
)

from merge_helpers import make_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

PONG = PromptSettings(("Pong",), object_text=True, reasoning=False)


def test_record_defaults_are_the_games_and_collects():
    from ilora.atari import collect

    assert RECORD_FRAME_SKIP == DEFAULT_FRAME_SKIP
    assert collect.ROW_LAYOUT is ROW_LAYOUT and collect.PromptSettings is PromptSettings
    config = collect.CollectConfig(game="Breakout")
    assert collect.prompt_settings_of(config) == PromptSettings(("Breakout",), True, False, DEFAULT_FRAME_SKIP, ROW_LAYOUT)


def test_record_round_trips_and_malformed_ones_are_named(tmp_path):
    path = PONG.write(tmp_path)
    assert path == tmp_path / PROMPT_SETTINGS_FILE and read_prompt_settings(tmp_path) == PONG
    assert read_prompt_settings(tmp_path / "elsewhere") is None
    path.write_text("{not json")
    with pytest.raises(IloraError, match=f"^{tmp_path / PROMPT_SETTINGS_FILE}: not a JSON"):
        read_prompt_settings(tmp_path)
    path.write_text(json.dumps({"games": ["Pong"], "object_text": "maybe", "reasoning": False}))
    with pytest.raises(IloraError, match="object_text"):
        read_prompt_settings(tmp_path)


def test_combining_keeps_every_game_once_and_refuses_two_prompts():
    breakout = dataclasses.replace(PONG, games=("Breakout", "Pong"))
    assert combine_prompt_settings([("a", PONG), ("b", None), ("c", breakout)]).games == ("Pong", "Breakout")
    assert combine_prompt_settings([("a", None)]) is None
    with pytest.raises(IloraError, match=r"^a and c were prompted differently \(frame_skip=4 vs 2\)$"):
        combine_prompt_settings([("a", PONG), ("c", dataclasses.replace(PONG, frame_skip=2))])


@pytest.mark.parametrize(
    ("recorded", "flags", "expected", "warned"),
    [
        # No record: the plain defaults (pixels only, direct answers scored); generate asks for reasoning.
        (None, {"game": "Pong"}, ("Pong", False, False, "score"), []),
        (None, {"game": "Pong", "mode": "generate"}, ("Pong", False, True, "generate"), []),
        (None, {"game": "Pong", "reasoning": True}, ("Pong", False, True, "generate"), []),
        # A record: its game and prompt, no flag needed, no warning.
        (PONG, {}, ("Pong", True, False, "score"), []),
        (dataclasses.replace(PONG, reasoning=True), {}, ("Pong", True, True, "generate"), []),
        (PONG, {"mode": "generate"}, ("Pong", True, False, "generate"), []),
        # Flags against the record: played as asked, each warned once.
        (PONG, {"object_text": False}, ("Pong", False, False, "score"), ["object_text=True"]),
        (PONG, {"game": "Breakout"}, ("Breakout", True, False, "score"), ["trained on Pong"]),
        (dataclasses.replace(PONG, reasoning=True), {"mode": "score"}, ("Pong", True, False, "score"), ["reasoning"]),
    ],
)
def test_play_takes_its_prompt_from_the_record(recorded, flags, expected, warned):
    prompt = play_prompt(recorded, "runs/a", **flags)
    assert (prompt.game, prompt.object_text, prompt.reasoning, prompt.mode) == expected
    assert len(prompt.warnings) == len(warned) and all(w in n for w, n in zip(warned, prompt.warnings))


@pytest.mark.parametrize(
    ("recorded", "flags", "message"),
    [
        (dataclasses.replace(PONG, row_layout=ROW_LAYOUT - 1), {}, "runs/a/prompt_settings.json: trained on rows of layout"),
        (dataclasses.replace(PONG, frame_skip=2), {}, "runs/a/prompt_settings.json: trained on frames 2 apart"),
        (dataclasses.replace(PONG, games=("Pong", "Breakout")), {},
         "--game: name the game to play (runs/a was trained on Pong, Breakout)"),
        (None, {}, "--game: name the game to play"),
    ],
)
def test_play_refuses_what_it_cannot_reproduce(recorded, flags, message):
    with pytest.raises(IloraError, match=re.escape(message)):
        play_prompt(recorded, "runs/a", **flags)


def test_a_model_and_an_adapter_of_two_prompts_are_refused(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "adapter").mkdir()
    PONG.write(tmp_path / "model")
    assert recorded_prompt(str(tmp_path / "model"), None) == (PONG, str(tmp_path / "model"))
    assert recorded_prompt("builtin", None) == (None, "")
    dataclasses.replace(PONG, object_text=False).write(tmp_path / "adapter")
    with pytest.raises(IloraError, match="prompted differently"):
        recorded_prompt(str(tmp_path / "model"), str(tmp_path / "adapter"))


POLICIES = '''
class WithGame:
    def __init__(self, game):
        self.names = game.action_names
    def __call__(self, observation):
        return self.names[-1]

class WithoutGame:
    def __call__(self, observation):
        return 0

def rule(observation):
    return "NOOP"

not_callable = 3
'''


@pytest.mark.parametrize(("name", "action"), [("WithGame", "LEFTFIRE"), ("WithoutGame", 0), ("rule", "NOOP")])
def test_policies_by_name(tmp_path, monkeypatch, name, action):
    from ilora.atari.experts import load_policy

    (tmp_path / "user_policies.py").write_text(POLICIES)
    monkeypatch.chdir(tmp_path)
    for spec in (f"user_policies:{name}", f"user_policies.py:{name}"):
        assert load_policy(spec, "Pong")(None) == action


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("user_policies:not_callable", "int is not callable"),
        ("user_policies:missing", "has no attribute 'missing'"),
        ("no_such_module:X", "cannot import no_such_module"),
        ("gone.py:X", "no file gone.py"),
        ("greedy", "expected expert, random or module:Name"),
    ],
)
def test_bad_policy_names_are_one_line(tmp_path, monkeypatch, spec, message):
    from ilora.atari.experts import load_policy

    (tmp_path / "user_policies.py").write_text(POLICIES)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IloraError, match=message):
        load_policy(spec, "Pong")


def test_builtin_policy_names():
    from ilora.atari.experts import PongExpert, RandomPolicy, load_policy

    assert isinstance(load_policy("expert", "Pong"), PongExpert)
    assert isinstance(load_policy("random", "Seaquest"), RandomPolicy)
    assert load_policy("random", "Seaquest").action_names == get_game("Seaquest").action_names
    with pytest.raises(IloraError, match="no scripted expert for Seaquest.*--policy random"):
        load_policy("expert", "Seaquest")


def test_random_collection_is_resumable(tmp_path):
    """The random policy is seeded per episode, like the environment: a resumed collection is the
    uninterrupted one."""
    import shutil

    from datasets import load_from_disk

    from ilora.atari.collect import CollectConfig, collect_to_disk

    config = CollectConfig(game="Seaquest", episodes=2, max_steps=25, policy="random", object_text=False)
    collect_to_disk(config, tmp_path / "a", progress=False)
    collect_to_disk(config, tmp_path / "b", progress=False)
    shutil.rmtree(tmp_path / "b" / "episodes" / "episode_00000")
    collect_to_disk(config, tmp_path / "b", progress=False)
    first, resumed = (load_from_disk(str(tmp_path / x / "dataset")) for x in "ab")
    assert first["action"] == resumed["action"] and len(set(first["action"])) > 1
    assert read_prompt_settings(tmp_path / "a" / "dataset") == PromptSettings(("Seaquest",), False, False)


def test_reasoning_needs_a_policy_that_gives_it(tmp_path):
    from ilora.atari.collect import collect_dataset

    with pytest.raises(IloraError, match="gave no reasoning text"):
        collect_dataset("Seaquest", 1, policy="random", object_text=False, reasoning=True, max_steps=20, progress=False)


@pytest.fixture(scope="module")
def prompted_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompted")
    targets = ["q_proj", "v_proj"]
    pong = make_adapter(builtin_base(), root / "pong", seed=1, r=4, alpha=8, targets=targets)
    breakout = make_adapter(builtin_base(), root / "breakout", seed=2, r=4, alpha=8, targets=targets)
    pixels = make_adapter(builtin_base(), root / "pixels", seed=3, r=4, alpha=8, targets=targets)
    PONG.write(pong)
    dataclasses.replace(PONG, games=("Breakout",)).write(breakout)
    dataclasses.replace(PONG, games=("Freeway",), object_text=False).write(pixels)
    return root


def test_merge_refuses_inputs_of_two_prompts(prompted_adapters, capsys):
    root = prompted_adapters
    assert main(["merge", str(root / "pong"), str(root / "pixels"), "--out", str(root / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "object_text=True vs False" in err[0] and not (root / "refused").exists()


def test_merged_model_has_its_own_card_and_its_inputs_prompt(prompted_adapters, capsys):
    root = prompted_adapters
    out = root / "merged"
    argv = ["merge", str(root / "pong"), str(root / "breakout"), "--out", str(out), "--base", "builtin",
            "--save-model", "--export-lora", "4", "--keep", "0.5"]
    assert main(argv) == 0
    model = out / "model"
    card = (model / "README.md").read_text()
    assert card != (builtin_base() / "README.md").read_text()
    assert "merged with `ilora`" in card and '"keep": 0.5' in card
    for name in ("pong", "breakout"):
        assert f"`{root / name}`" in card and file_sha256(root / name / "adapter_model.safetensors") in card
    record = json.loads((model / "ilora_merge_record.json").read_text())
    assert record["method"] == "ilora" and set(record["modules"]) and not (model / "merge_record.json").exists()
    both = dataclasses.replace(PONG, games=("Pong", "Breakout"))
    assert read_prompt_settings(model) == both == read_prompt_settings(out / "lora_rank4")
    assert recorded_prompt(str(model), None)[0] == both  # what `ilora play --model merged/model` reads
    # A merged state passes its inputs' prompt on to the next merge.
    assert main(["merge", str(out), str(root / "pixels"), "--out", str(root / "refused2")]) == 2
    assert "prompted differently" in capsys.readouterr().err
    from ilora.merge.export import merged_prompt_settings

    assert merged_prompt_settings([str(out)]) == both
    assert Path(out / "merge_record.json").is_file()
