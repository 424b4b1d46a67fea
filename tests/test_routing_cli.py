"""`ilora train` and `ilora analyze activations` end to end on saved datasets, and their errors."""

from __future__ import annotations

import json

import pytest
import yaml

from ilora.cli import main

from routing_helpers import make_rows


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved_data(tmp_path_factory):
    from datasets import Dataset

    root = tmp_path_factory.mktemp("data")
    paths = {}
    for name, seed, n_images in (("task", 0, 1), ("general", 1, 2), ("other", 2, 1)):
        paths[name] = root / name
        Dataset.from_list(make_rows(8, seed, n_images=n_images)).save_to_disk(str(paths[name]))
    return paths


def write_config(path, model, out, data, **training):
    config = {
        "model": str(model),
        "out": str(out),
        "task_data": [{"path": str(data["task"])}],
        "general_data": [{"path": str(data["general"]), "size": 4}, {"path": str(data["other"]), "size": 4}],
        "training": {
            "lora_r": 4, "lora_alpha": 8, "max_steps": 3, "per_device_train_batch_size": 4,
            "save_strategy": "no", "disable_tqdm": True, "logging_steps": 1, "use_cpu": True, **training,
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_then_analyze(tiny_vlm_dir, saved_data, tmp_path, capsys):
    out = tmp_path / "adapter"
    cfg = write_config(tmp_path / "train.yaml", tiny_vlm_dir, out, saved_data, learning_rate=1e-2)
    assert main(["train", str(cfg), "--set", "training.eps_kl=0.02"]) == 0
    assert json.loads((out / "routing_config.json").read_text())["eps_kl"] == 0.02
    log = json.loads((out / "loss_log.json").read_text())
    assert len([e for e in log if "loss" in e]) == 3

    report = tmp_path / "activations"
    argv = ["analyze", "activations", "--model", str(tiny_vlm_dir), "--adapter", str(out), "--out", str(report)]
    argv += ["--data", f"task={saved_data['task']}", "--data", f"general={saved_data['general']}", "--data", str(saved_data["other"])]
    assert main(argv) == 0
    table = json.loads((report / "activations.json").read_text())
    assert list(table["data"]) == ["task", "general", "other"]
    for row in table["data"].values():
        assert len(row["layers"]) == 28 and row["average"] > 0
        assert row["average"] == pytest.approx(sum(row["layers"].values()) / 28)
    assert (report / "heatmap.png").stat().st_size > 1000
    assert "general" in capsys.readouterr().out


def test_cli_errors(tiny_vlm_dir, saved_data, tmp_path, capsys):
    cfg = write_config(tmp_path / "plain.yaml", tiny_vlm_dir, tmp_path / "a", saved_data)
    data = yaml.safe_load(cfg.read_text())
    data["general_data"] = []
    cfg.write_text(yaml.safe_dump(data))
    assert main(["train", str(cfg)]) == 2
    assert "no general rows" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main(["train", str(cfg), "--set", "training.eps_klx=0"]) == 2
    assert "eps_klx" in capsys.readouterr().err
    assert main(["train", str(cfg), "--set", f"task_data=[{{path: {tmp_path / 'missing'}}}]"]) == 2
    assert "missing" in capsys.readouterr().err
    argv = ["analyze", "activations", "--model", str(tiny_vlm_dir), "--adapter", str(tmp_path), "--out", str(tmp_path / "r")]
    assert main(argv + ["--data", str(saved_data["task"])]) == 2
    assert "not a PEFT adapter" in capsys.readouterr().err
