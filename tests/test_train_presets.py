"""`ilora train`'s presets (chosen by the model) and what its data entries accept."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from ilora.cli import main
from ilora.config import from_dict, read_yaml_mapping
from ilora.errors import IloraError
from ilora.models.load import builtin_base
from ilora.prompt_settings import PromptSettings
from ilora.routing.config import BUILTIN_PRESET, PAPER_PRESET, DataSpec
from ilora.routing.train import load_sources, routing_config, task_prompt_settings, training_preset

from routing_helpers import make_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def test_builtin_preset_is_the_default_experiments_train_section():
    """What configs/default.yaml trains with, as the experiment turns it into a RoutingConfig."""
    from ilora.experiment.config import TrainSettings

    train = from_dict(TrainSettings, read_yaml_mapping("configs/default.yaml")["train"], "train")
    expected = {
        "max_steps": train.max_steps, "per_device_train_batch_size": train.batch_size,
        "learning_rate": train.learning_rate, "lora_r": train.lora_r, "lora_alpha": train.lora_alpha,
        "lora_dropout": train.lora_dropout, "eps_lm": train.eps_lm, "eps_kl": train.eps_kl, "eps_norm": train.eps_norm,
        "lr_scheduler_type": "linear",
    }
    assert {k: BUILTIN_PRESET[k] for k in expected} == expected
    args = routing_config(BUILTIN_PRESET)
    assert args.lora_parts == train.lora_parts
    # The experiment warms up over max(1, steps // 20) and logs every max(1, steps // 10) steps.
    assert math.ceil(BUILTIN_PRESET["warmup_steps"] * train.max_steps) in (train.max_steps // 20, train.max_steps // 20 + 1)
    assert BUILTIN_PRESET["logging_steps"] * train.max_steps == train.max_steps // 10


def test_paper_preset_is_spec_and_the_trainers_own_defaults():
    args = routing_config({})
    assert {k: getattr(args, k) for k in PAPER_PRESET} == PAPER_PRESET
    assert (PAPER_PRESET["lora_r"], PAPER_PRESET["lora_alpha"], PAPER_PRESET["eps_norm"]) == (128, 256.0, 2.0)


def test_the_model_chooses_the_preset_and_training_keys_update_it(tmp_path):
    assert training_preset("builtin", {}) == ("builtin", BUILTIN_PRESET)
    assert training_preset(str(builtin_base()), {})[0] == "builtin"
    assert training_preset("llava-hf/llava-interleave-qwen-7b-hf", {}) == ("paper", PAPER_PRESET)
    name, settings = training_preset("builtin", {"lora_r": 4})
    assert settings == {**BUILTIN_PRESET, "lora_r": 4}
    # Epochs without steps: the preset's max_steps would win over them, so it goes.
    _, by_epochs = training_preset("builtin", {"num_train_epochs": 2})
    assert "max_steps" not in by_epochs and by_epochs["num_train_epochs"] == 2
    _, both = training_preset("builtin", {"num_train_epochs": 2, "max_steps": 7})
    assert both["max_steps"] == 7


def test_train_help_shows_real_defaults_and_both_presets(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "(factory)" not in text and "model (required)" in text and "task_data = []" in text
    assert "builtin (the shipped base" in text and "eps_norm=0.01" in text and "lora_r=128" in text


def _collected(root, game: str, n: int, **prompt) -> str:
    """A folder laid out as `ilora collect --out` writes it, with its prompt record."""
    from datasets import Dataset

    (root / "collect_config.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "collect_config.json").write_text("{}")
    Dataset.from_list(make_rows(n, 0)).save_to_disk(str(root / "dataset"))
    PromptSettings((game,), **{"object_text": True, "reasoning": False, **prompt}).write(root / "dataset")
    return str(root)


def test_task_data_takes_the_collect_folder_and_its_prompt(tmp_path):
    pong = _collected(tmp_path / "pong", "Pong", 5)
    breakout = _collected(tmp_path / "breakout", "Breakout", 3)
    sources = load_sources([DataSpec(pong), DataSpec(breakout, size=2)], "task", "task_data")
    assert [len(s.rows) for s in sources] == [5, 3] and sources[1].size == 2
    combined = task_prompt_settings([DataSpec(pong), DataSpec(breakout)])
    assert combined == PromptSettings(("Pong", "Breakout"), True, False)
    reasoning = _collected(tmp_path / "reasoning", "Freeway", 2, reasoning=True)
    with pytest.raises(IloraError, match=r"^task_data: .*pong/dataset and .*reasoning/dataset were prompted "
                                         r"differently \(reasoning=False vs True\)"):
        task_prompt_settings([DataSpec(pong), DataSpec(reasoning)])


def test_task_data_takes_a_llava_json(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "images" / "a.png")
    entries = [{"id": str(i), "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]} for i in range(3)]
    (tmp_path / "chat.json").write_text(json.dumps(entries))
    spec = DataSpec(str(tmp_path / "chat.json"), image_folder=str(tmp_path / "images"))
    (source,) = load_sources([spec], "task", "task_data")
    assert len(source.rows) == 3 and source.rows[0]["answer"] == "red" and source.rows[0]["prompt"] == "What colour?"
    assert task_prompt_settings([spec]) is None  # not a game's rows: nothing recorded
    with pytest.raises(IloraError, match="no such LLaVA-style"):
        load_sources([DataSpec(str(tmp_path / "missing.json"))], "task", "task_data")
    with pytest.raises(IloraError, match="image_folder is for LLaVA"):
        load_sources([DataSpec(str(tmp_path / "images"), image_folder="x")], "task", "task_data")


def test_train_refuses_task_data_of_two_prompts_before_loading_the_model(tmp_path, capsys):
    pong = _collected(tmp_path / "pong", "Pong", 4)
    pixels = _collected(tmp_path / "pixels", "Breakout", 4, object_text=False)
    config = {"model": "builtin", "out": str(tmp_path / "out"), "task_data": [{"path": pong}, {"path": pixels}],
              "general_data": [{"path": pong}]}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()  # the fixtures' own progress bars
    assert main(["train", str(tmp_path / "t.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "object_text=True vs False" in err[0] and "one prompt" in err[0]
    assert not (tmp_path / "out").exists()
