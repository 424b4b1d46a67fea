"""``ilora select-play`` and ``ilora analyze selection``: inputs checked in one line before any
work, and a run's record of which skills acted."""

from __future__ import annotations

import json

import pytest
import torch
from atari_helpers import spread_observations

import ilora.cli
from ilora.atari.agent import VLMAgent
from ilora.models.load import load_vlm, lora_target_modules

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE = "ilora.routing.select_cli"


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """The commands' module among the CLI's (until ilora/cli.py lists it)."""
    if MODULE not in ilora.cli.COMMAND_MODULES:
        monkeypatch.setattr(ilora.cli, "COMMAND_MODULES", (*ilora.cli.COMMAND_MODULES, MODULE))


@pytest.fixture(scope="module")
def skills(tiny_vlm_dir, tmp_path_factory):
    """Two LoRA adapters of the tiny VLM (random A and B) and a held-out dataset per game."""
    from datasets import Dataset, Features, Image, List, Value
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("select-cli")
    adapters = {}
    for seed, game in enumerate(("Pong", "Breakout")):
        base, _ = load_vlm(tiny_vlm_dir)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_modules(base), init_lora_weights=False)
        torch.manual_seed(seed)
        get_peft_model(base, config).save_pretrained(root / game)
        adapters[game] = root / game
    model, processor = load_vlm(tiny_vlm_dir)
    features = Features({"images": List(Image()), "context": Value("string"), "prompt": Value("string"),
                         "answer": Value("string"), "action": Value("string"), "game": Value("string")})
    for game in ("Pong", "Breakout"):
        rows = VLMAgent(model, processor, game, object_text=True).rows(spread_observations(4, game))
        columns = {key: [row[key] for row in rows] for key in ("images", "context", "prompt")}
        n = len(rows)
        columns |= {"answer": ["Action: NOOP"] * n, "action": ["NOOP"] * n, "game": [game] * n}
        for split, part in (("test", slice(0, 2)), ("val", slice(2, 4))):
            Dataset.from_dict({k: v[part] for k, v in columns.items()}, features=features).save_to_disk(root / f"{game}-{split}")
    return adapters, root


def _adapters(skills) -> list[str]:
    adapters, _ = skills
    return ["--adapters", *(f"{name}={path}" for name, path in adapters.items())]


def test_select_play_records_which_skill_acted(tiny_vlm_dir, skills, tmp_path, capsys):
    out = tmp_path / "play.json"
    argv = ["select-play", "--model", str(tiny_vlm_dir), *_adapters(skills), "--game", "Breakout", "--select", "oracle",
            "--episodes", "1", "--envs", "1", "--max-frames", "40", "--object-text", "--json", str(out)]
    assert ilora.cli.main(argv) == 0
    result = json.loads(out.read_text())
    steps = sum(r["length"] for r in result["records"])
    assert result["settings"]["chosen"] == {"Pong": 0, "Breakout": steps} and steps == 10
    assert result["settings"]["rule"] == "oracle" and "skills chosen        Pong 0.0%, Breakout 100.0%" in capsys.readouterr().out


def test_analyze_selection_trains_the_gate_on_other_rows(tiny_vlm_dir, skills, tmp_path, capsys):
    _, root = skills
    out = tmp_path / "selection.json"
    argv = ["analyze", "selection", "--model", str(tiny_vlm_dir), *_adapters(skills), "--select", "gate",
            "--data", f"Pong={root / 'Pong-test'}", f"Breakout={root / 'Breakout-test'}",
            "--gate-data", f"Pong={root / 'Pong-val'}", f"Breakout={root / 'Breakout-val'}", "--json", str(out)]
    assert ilora.cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["gate"]["rows"] == {"Pong": 2, "Breakout": 2} and result["accuracy"] == 1.0
    assert {g: r["rows"] for g, r in result["games"].items()} == {"Pong": 2, "Breakout": 2}
    assert "overall accuracy 1.000" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--select", "gate", "--game", "Pong"], "--gate-data: one NAME=DIR per skill"),
        (["--select", "gate", "--game", "Pong", "--gate-data", "Pong=/nonexistent"], "missing ['Breakout']"),
        (["--select", "norm", "--game", "Pong", "--gate-data", "Pong=x"], "only used with --select gate"),
        (["--select", "norm"], "--game: name the game to play"),
        (["--select", "oracle", "--game", "Boxing"], "no skill is named Boxing"),
        (["--select", "norm", "--game", "Pong", "--json", "/nonexistent/x.json"], "does not exist"),
        (["--select", "norm", "--game", "Pong", "--adapters", "Pong=/nonexistent"], "not a PEFT adapter folder"),
        (["--select", "norm", "--game", "Pong", "--adapters", "a.b=/nonexistent"], "contain no '.'"),
        (["--select", "norm", "--game", "Pong", "--episodes", "0"], "--episodes 0"),
    ],
)
def test_select_play_refuses_bad_input_in_one_line(tiny_vlm_dir, skills, capsys, extra, message):
    argv = ["select-play", "--model", str(tiny_vlm_dir), *_adapters(skills), *extra]
    assert ilora.cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ilora select-play: error: ") and message in err[0]


def test_analyze_selection_refuses_gate_rows_that_are_the_heldout_rows(tiny_vlm_dir, skills, capsys):
    _, root = skills
    argv = ["analyze", "selection", "--model", str(tiny_vlm_dir), *_adapters(skills), "--select", "gate",
            "--data", f"Pong={root / 'Pong-test'}", "--gate-data", f"Pong={root / 'Pong-test'}", f"Breakout={root / 'Breakout-val'}"]
    assert ilora.cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the same folder as --data" in err[0]
