"""The README's commands, run as a user would, on tiny budgets (issue 16's "done when").

Every command is parsed out of README.md, so a README that drifts from the CLI fails here.
Only budgets change (episodes, steps, rows: :func:`tiny`) and output files are added; no
prompt flag is ever added, so ``play`` shows what the adapter was trained with.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
from pathlib import Path

import pytest

from ilora.cli import main
from ilora.prompt_settings import ROW_LAYOUT, PromptSettings, read_prompt_settings
from ilora.routing.config import BUILTIN_PRESET

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()

# Per command, the budget options and their tiny values (set whether or not the README gives them).
TINY = {
    # Enough task rows that the configs' general rows (1,600) leave some in three batches of 16.
    "collect": {"--episodes": "1", "--max-steps": "300"},
    "general": {"--rows": "24"},
    "experts": {"--episodes": "1", "--random-episodes": "1", "--max-steps": "20"},
    "play": {"--episodes": "1", "--max-frames": "80", "--video-steps": "5"},
    "eval": {"--rows": "8"},
    "grams": {"--rows": "8"},
    "activations": {"--limit": "8"},
}
TINY_SETS = {
    # The first step is warm-up (learning rate 0): three steps change the weights.
    "train": ["training.max_steps=3"],
    "base": ["steps=2", "general_rows=16", "grounding_rows=8", "test_rows=12", "batch_size=4", "dataloader_workers=0"],
}


def section(title: str) -> str:
    """The README text under the ``## `` heading that starts with ``title``, up to the next one."""
    start = README.index(f"\n## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else len(README)]


def commands(text: str) -> list[list[str]]:
    """The ``ilora`` command lines of indented code in ``text`` (continuations joined, comments
    dropped), each without the leading ``ilora``."""
    lines, out = text.splitlines(), []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("    ilora "):
            while line.rstrip().endswith("\\"):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            out.append(shlex.split(line, comments=True)[1:])
        i += 1
    return out


def python_block(text: str, first_line: str) -> str:
    """The indented code block of ``text`` that starts with ``first_line``, dedented."""
    lines = text.splitlines()
    start = lines.index(f"    {first_line}")
    block = []
    for line in lines[start:]:
        if line and not line.startswith("    ") or line.startswith("    ilora "):
            break
        block.append(line[4:])
    return "\n".join(block).strip() + "\n"


def tiny(argv: list[str]) -> list[str]:
    """``argv`` on tiny budgets: budget options replaced or added, nothing else changed."""
    argv = list(argv)
    name = argv[1] if argv[0] in ("analyze", "eval") else argv[0]
    for flag, value in TINY.get(name, {}).items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    for setting in TINY_SETS.get(name, []):
        argv += ["--set", setting]
    return argv


def run(argv: list[str]) -> str:
    """Run one command in this process; its stdout + stderr, which the failure message shows."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, f"ilora {shlex.join(argv)} exited {code}:\n{err.getvalue()[-3000:]}"
    return out.getvalue() + err.getvalue()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder where the README's quick start ran (tiny budgets); yields its folder and outputs."""
    root = tmp_path_factory.mktemp("readme")
    (root / "configs").symlink_to(REPO / "configs")
    previous = os.getcwd()
    os.chdir(root)
    try:
        outputs = {}
        for argv in commands(section("Quick start")):
            if argv[0] == "play":
                argv = [*argv, "--json", "play.json"]  # an output file, not a prompt flag
            outputs[argv[0] + (" " + argv[2] if argv[0] == "collect" else "")] = run(tiny(argv))
        yield root, outputs
    finally:
        os.chdir(previous)


def test_quick_start_plays_the_adapter_with_the_prompt_it_was_trained_on(workspace):
    from datasets import load_from_disk

    from ilora.atari.prompts import parse_action

    root, outputs = workspace
    quick = commands(section("Quick start"))
    assert [a[0] for a in quick] == ["collect", "collect", "general", "train", "play"]
    assert not any(flag in a for a in quick for flag in ("--object-text", "--no-object-text", "--reasoning", "--mode"))

    # collect's defaults: the default experiment's prompt (object text on, direct answers), recorded.
    recorded = read_prompt_settings(root / "data/pong/dataset")
    assert recorded == PromptSettings(("Pong",), object_text=True, reasoning=False, row_layout=ROW_LAYOUT)
    rows = load_from_disk(str(root / "data/pong/dataset"))
    assert set(rows["object_text"]) == {True} and set(rows["reasoning"]) == {False}
    assert all("Relations: " in p for p in rows["prompt"])
    names = ("NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE")
    assert all(a == f"Action: {parse_action(a, names)}" for a in rows["answer"])  # direct answers only

    # train: the builtin preset (no training key but the seed in the config), the record copied.
    adapter = root / "runs/pong"
    assert read_prompt_settings(adapter) == recorded
    trained = json.loads((adapter / "routing_config.json").read_text())
    for key in ("learning_rate", "lora_r", "lora_alpha", "lora_dropout", "eps_lm", "eps_kl", "eps_norm",
                "lr_scheduler_type", "per_device_train_batch_size"):
        assert trained[key] == BUILTIN_PRESET[key], key
    assert "builtin preset" in outputs["train"]
    log = json.loads((adapter / "loss_log.json").read_text())
    assert any("loss_lm" in entry for entry in log)  # task rows were trained on

    # play, given no --game and no prompt flag: the adapter's game and prompt, and no warning.
    settings = json.loads((root / "play.json").read_text())["settings"]
    assert settings["game"] == "Pong" and settings["adapter"] == "runs/pong"
    assert (settings["object_text"], settings["reasoning"], settings["mode"]) == (True, False, "score")
    assert "warning" not in outputs["play"]


def test_a_policy_given_by_flag_collects_a_game_without_an_expert(workspace, monkeypatch):
    from datasets import load_from_disk

    from ilora.atari.experts import EXPERTS

    root, _ = workspace
    monkeypatch.chdir(root)
    text = section("Any game, any policy")
    (root / "my_policy.py").write_text(python_block(text, "# my_policy.py"))
    argvs = commands(text)
    assert [a[0] for a in argvs] == ["collect", "experts", "play"]
    assert all("--policy" in a and "Seaquest" in a for a in argvs) and "Seaquest" not in EXPERTS
    for argv in argvs:
        run(tiny(argv))
    rows = load_from_disk(str(root / "data/seaquest/dataset"))
    assert len(rows) > 0 and set(rows["action"]) <= {"DOWNFIRE", "UPFIRE"}  # the README's rule played
    assert read_prompt_settings(root / "data/seaquest/dataset") == PromptSettings(("Seaquest",), False, False)


def test_other_commands_run_in_order(workspace, monkeypatch):
    root, _ = workspace
    monkeypatch.chdir(root)
    argvs = commands(section("Other commands"))
    assert len(argvs) >= 10
    outputs = [run(tiny(argv)) for argv in argvs]
    # What the commands promise beside exit status 0: the merged model's own card and prompt.
    card = (root / "merged/pb/model/README.md").read_text()
    assert "merged with `ilora`" in card and "runs/pong" in card and "runs/breakout" in card
    assert read_prompt_settings(root / "merged/pb/model").games == ("Pong", "Breakout")
    play = outputs[[a[0] for a in argvs].index("play")]
    assert "object_text=True" in play and "warning" not in play
    assert (root / "runs/pong/grams.safetensors").is_file() and (root / "models/tiny-base/config.json").is_file()
