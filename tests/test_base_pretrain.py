"""`ilora base`: pretraining the default VLM, and the shipped checkpoint it produced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ilora.cli import main
from ilora.config import load_yaml
from ilora.models.load import builtin_base
from ilora.base.pretrain import BaseConfig, pretrain_base

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
    """The shipped base came from configs/base.yaml on a GPU (8,000 steps x 64); this reruns the
    same command on a CPU budget of 600 steps x 32 (~20 min on one core of a 2-core CPU) and
    checks it reaches the shipped model's quality where that budget allows.

    Measured with exactly these settings (`ilora base --config configs/base.yaml --set steps=600
    ...`, 2026-11-29): overall 0.502 (shipped 0.590), grounding_relation 0.962, atari_game 0.553
    (shipped 0.988; naming the game from one frame needs the long GPU budget), majority rates
    0.06 / 0.15 / 0.06.
    """
    config = load_yaml(BaseConfig, ROOT / "configs" / "base.yaml",
                       ["steps=600", "batch_size=32", "general_rows=6000", "grounding_rows=3000", "test_rows=600",
                        "dataloader_workers=0", "max_minutes=0"])
    record = pretrain_base(config, tmp_path / "base", progress=False)
    shipped = json.loads((builtin_base() / "pretrain.json").read_text())["heldout"]
    got = record["heldout"]
    assert got["overall"]["accuracy"] >= 0.8 * shipped["overall"]["accuracy"]
    assert got["per_task"]["grounding_relation"]["accuracy"] >= 0.9
    game = got["per_task"]["atari_game"]
    assert game["accuracy"] >= max(0.4, 5 * game["majority_rate"])


def test_spread_embeddings_separates_only_the_given_rows():
    import torch

    from ilora.models.load import load_vlm
    from ilora.base.pretrain import action_token_ids, spread_embeddings

    model, processor = load_vlm(builtin_base())
    ids = action_token_ids(processor.tokenizer)
    assert len(ids) >= 6 and len(set(ids)) == len(ids)
    weight = model.get_input_embeddings().weight
    before = weight.detach().clone()
    # Collapse the rows first, as pretraining had left them.
    with torch.no_grad():
        weight[ids] = before[ids].mean(0) + 0.01 * torch.randn(len(ids), weight.shape[1])
    collapsed = weight[ids].detach().clone()
    max_cos = spread_embeddings(model, ids, seed=0)
    after = weight.detach()
    unit = torch.nn.functional.normalize(after[ids], dim=-1)
    assert max_cos == pytest.approx(float((unit @ unit.T).fill_diagonal_(-1).max()), abs=1e-6)
    assert max_cos < 0.8
    others = torch.ones(len(after), dtype=torch.bool)
    others[ids] = False
    assert torch.equal(after[others], before[others])
    offsets = (after[ids] - collapsed.mean(0)).norm(dim=-1)  # offsets of the rows' mean norm from their mean
    assert torch.allclose(offsets, collapsed.norm(dim=-1).mean().expand_as(offsets), rtol=1e-4)
    assert model.get_output_embeddings().weight.data_ptr() == weight.data_ptr()  # tied: the head moved too
    # Deterministic under the seed.
    with torch.no_grad():
        weight[ids] = collapsed
    spread_embeddings(model, ids, seed=0)
    assert torch.equal(weight[ids], after[ids])


def test_shipped_base_has_spread_action_embeddings():
    import torch

    from ilora.models.load import load_vlm
    from ilora.base.pretrain import action_token_ids

    model, processor = load_vlm(builtin_base())
    rows = model.get_input_embeddings().weight[action_token_ids(processor.tokenizer)].detach()
    unit = torch.nn.functional.normalize(rows, dim=-1)
    assert float((unit @ unit.T).fill_diagonal_(-1).max()) < 0.6
