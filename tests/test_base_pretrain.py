"""`ilora base`: pretraining the default VLM, and the shipped checkpoint it produced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ilora.cli import main
from ilora.config import load_yaml
from ilora.experiment.pipeline import builtin_base
from ilora.models.pretrain import BaseConfig, pretrain_base

ROOT = Path(__file__).resolve().parent.parent


def test_short_pretraining_lowers_the_loss(tmp_path):
    config = BaseConfig(general_rows=64, grounding_rows=32, test_rows=18, steps=16, batch_size=8, learning_rate=3e-3)
    record = pretrain_base(config, tmp_path / "base", progress=False)
    losses = [h["loss"] for h in record["loss_log"]]
    assert len(losses) >= 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    saved = json.loads((tmp_path / "base" / "pretrain.json").read_text())
    assert saved["steps_done"] == 16 and set(saved["heldout"]) == {"overall", "per_task"}
    assert (tmp_path / "base" / "model.safetensors").is_file()


def test_shipped_base_answers_general_questions_far_above_chance(capsys, tmp_path):
    """Re-scores the shipped checkpoint on fresh held-out rows (not the numbers it recorded)."""
    out = tmp_path / "scores.json"
    assert main(["eval", "general", "--model", str(builtin_base()), "--rows", "90", "--seed", "7", "--json", str(out)]) == 0
    scores = json.loads(out.read_text())
    overall = scores["overall"]
    assert overall["accuracy"] > 0.4 > 2 * overall["majority_rate"]
    assert scores["per_task"]["atari_game"]["accuracy"] >= 0.8
    assert "overall" in capsys.readouterr().out


def test_base_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    assert main(["base", "--out", str(tmp_path / "exists"), "--set", "steps=1"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_short_budget_reproduces_quality(tmp_path):
    """The shipped base came from configs/base.yaml on a GPU; a CPU budget must reach similar quality."""
    config = load_yaml(BaseConfig, ROOT / "configs" / "base.yaml",
                       ["steps=1500", "batch_size=32", "general_rows=6000", "grounding_rows=3000", "test_rows=600",
                        "dataloader_workers=0", "max_minutes=0"])
    record = pretrain_base(config, tmp_path / "base", progress=False)
    shipped = json.loads((builtin_base() / "pretrain.json").read_text())["heldout"]
    got = record["heldout"]
    assert got["overall"]["accuracy"] >= 0.6 * shipped["overall"]["accuracy"]
    assert got["per_task"]["grounding_relation"]["accuracy"] >= 0.9
    assert got["per_task"]["atari_game"]["accuracy"] >= 0.8
