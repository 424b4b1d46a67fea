"""Training on a base with other adapters folded in, and continuing from a saved adapter."""

from __future__ import annotations

import json

import pytest
import torch
from routing_helpers import make_rows, random_lora_vlm, routing_args
from safetensors.torch import load_file

from ilora.fileio import file_sha256
from ilora.routing.train import train_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


def saved_adapter(tiny_vlm_dir, folder, seed):
    """A LoRA adapter with nonzero B (it changes the model's outputs)."""
    random_lora_vlm(tiny_vlm_dir, seed)[0].save_pretrained(folder)
    return folder


def first_step(out):
    return next(e for e in json.loads((out / "loss_log.json").read_text()) if "loss" in e)


def test_kl_reference_is_the_folded_base(tiny_vlm_dir, tmp_path):
    other = saved_adapter(tiny_vlm_dir, tmp_path / "other", seed=1)
    task, general = make_rows(4, 0), make_rows(4, 1)
    args = routing_args(tmp_path, max_steps=1, learning_rate=0.0)
    # A fresh LoRA (B = 0) on the folded base: the model equals its reference, so KL and norm are 0.
    folded = train_adapter(tiny_vlm_dir, [task], [general], args, tmp_path / "folded", fold_adapters=[other])
    step = first_step(folded)
    assert step["loss_kl"] == pytest.approx(0.0, abs=1e-7) and step["loss_norm"] == 0.0
    # The same weights as a trainable adapter on the plain base: its reference lacks them.
    unfolded = train_adapter(tiny_vlm_dir, [task], [general], args, tmp_path / "init", init_adapter=other)
    step = first_step(unfolded)
    assert step["loss_kl"] > 1e-4 and step["loss_norm"] > 0
    record = json.loads((folded / "trained_on.json").read_text())
    assert record["folded"] == [{"path": str(other), "sha256": file_sha256(other / "adapter_model.safetensors")}]
    assert record["init"] is None


def test_init_adapter_continues_from_its_weights(tiny_vlm_dir, tmp_path):
    start = saved_adapter(tiny_vlm_dir, tmp_path / "start", seed=2)
    task, general = make_rows(4, 0), make_rows(4, 1)
    # lr 0: the saved adapter is the one it started from, whatever rank the config names.
    args = routing_args(tmp_path, max_steps=1, learning_rate=0.0, lora_r=8)
    out = train_adapter(tiny_vlm_dir, [task], [general], args, tmp_path / "out", init_adapter=start)
    before, after = load_file(start / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "trained_on.json").read_text())["init"]["sha256"] == file_sha256(start / "adapter_model.safetensors")
    # lr > 0: it moves from there.
    args = routing_args(tmp_path, max_steps=1, learning_rate=1e-2)
    moved = load_file(train_adapter(tiny_vlm_dir, [task], [general], args, tmp_path / "moved", init_adapter=start)
                      / "adapter_model.safetensors")
    assert any(not torch.equal(before[k], moved[k]) for k in before if "lora_B" in k)


@pytest.mark.parametrize("key", ["fold_adapters", "init_adapter"])
def test_train_refuses_a_bad_adapter_before_training(tiny_vlm_dir, tmp_path, capsys, key):
    from ilora.cli import main

    (tmp_path / "data").mkdir()
    not_adapter = tmp_path / "empty"
    not_adapter.mkdir()
    value = [str(not_adapter)] if key == "fold_adapters" else str(not_adapter)
    config = {"model": str(tiny_vlm_dir), "out": str(tmp_path / "out"), "task_data": [{"path": str(tmp_path / "data")}],
              key: value}
    (tmp_path / "train.yaml").write_text(json.dumps(config))
    assert main(["train", str(tmp_path / "train.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and "not a PEFT adapter" in err[0]
    assert not (tmp_path / "out").exists()
