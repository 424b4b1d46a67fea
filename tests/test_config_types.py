"""Config and method-option values are converted to their declared types or refused naming the key.

YAML 1.1 reads ``1e-3`` (no dot) as a string, and ``--set``/``--option`` values are YAML
scalars, so numbers often arrive as strings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from ilora.cli import main
from ilora.config import from_dict, load_yaml, parse_overrides
from ilora.errors import IloraError
from ilora.experiment.config import ExperimentConfig, TrainSettings
from ilora.merge.cli import method_options
from ilora.merge.registry import get_method
from ilora.routing.config import TrainConfig
from ilora.routing.train import routing_config


@pytest.mark.parametrize(
    "key, raw, expected",
    [("learning_rate", "1e-3", 1e-3), ("max_steps", "2", 2), ("lora_r", 8.0, 8), ("lora_alpha", 32, 32.0)],
)
def test_numbers_given_as_strings_are_converted(key, raw, expected):
    value = getattr(from_dict(TrainSettings, {key: raw}), key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "key, raw", [("lora_r", "eight"), ("max_steps", 2.5), ("learning_rate", "fast"), ("lora_parts", 3)]
)
def test_values_of_the_wrong_type_are_refused_naming_the_key(key, raw):
    with pytest.raises(IloraError, match=f"^train.{key} = {raw!r}: expected ") as err:
        from_dict(TrainSettings, {key: raw}, "train")
    assert "\n" not in str(err.value)


def test_yaml_preset_values_are_typed(tmp_path):
    preset = tmp_path / "run.yaml"
    preset.write_text("train: {learning_rate: 1e-3, max_steps: '20'}\nmerge: {keep_sweep: [1e-1, '0.5']}\n")
    config = load_yaml(ExperimentConfig, preset, ["seed=3", "train.eps_kl=1e-2"])
    assert (config.train.learning_rate, config.train.max_steps, config.train.eps_kl) == (1e-3, 20, 1e-2)
    assert config.merge.keep_sweep == [0.1, 0.5] and config.seed == 3
    with pytest.raises(IloraError, match=r"run.yaml.train.lora_r = 'eight': expected int"):
        load_yaml(ExperimentConfig, preset, ["train.lora_r=eight"])


def test_routing_config_values_are_typed():
    args = routing_config({"learning_rate": "1e-3", "max_steps": "2", "lora_r": "4", "eps_kl": "1e-2"})
    assert (args.learning_rate, args.max_steps, args.lora_r, args.eps_kl) == (1e-3, 2, 4, 1e-2)
    with pytest.raises(IloraError, match="^training.lora_r = 'eight': expected int$"):
        routing_config({"lora_r": "eight"})


def test_merge_options_are_typed():
    args = argparse.Namespace(keep=None, density=None, weights=None, seed=None, option=["svd_tol=1e-7"])
    assert get_method("ilora", **method_options(args)).svd_tol == 1e-7
    assert get_method("pcb", **parse_overrides(["ratio=1e-1"])).ratio == 0.1
    with pytest.raises(IloraError, match="^--method ilora.svd_tol = 'tiny': expected float$"):
        get_method("ilora", svd_tol="tiny")


def refused_in_one_line(capsys, argv: list[str], key: str) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize("training", ["{lora_r: eight}", "{learning_rate: fast}", "{max_steps: 2.5}"])
def test_train_refuses_a_mistyped_value_before_loading_anything(tmp_path, capsys, training):
    out = tmp_path / "adapter"
    config = tmp_path / "train.yaml"
    # Neither the model nor the data exist: the refusal must come before either is opened.
    config.write_text(f"model: {tmp_path / 'no-model'}\nout: {out}\ntask_data: [{{path: {tmp_path / 'no-data'}}}]\n"
                      f"training: {training}\n")
    key = "training." + training.strip("{}").split(":")[0]
    refused_in_one_line(capsys, ["train", str(config)], key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.yaml"]  # no <out> and no <out>.run
    assert isinstance(load_yaml(TrainConfig, config).training, dict)


def test_merge_refuses_a_mistyped_option_before_writing(tmp_path, capsys):
    out = tmp_path / "merged"
    refused_in_one_line(capsys, ["merge", "a", "b", "--out", str(out), "--option", "svd_tol=tiny"], "svd_tol")
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("setting, key", [("refit.steps_share=-1", "refit.steps_share"),
                                          ("refit.methods=[regmean]", "refit.methods"),
                                          ("merge.methods=[no_such_method]", "no_such_method")])
def test_experiment_refuses_a_setting_it_cannot_honour_before_any_stage(tmp_path, capsys, setting, key):
    run_dir = tmp_path / "run"
    quick = Path(__file__).resolve().parent.parent / "configs" / "quick.yaml"
    args = ["experiment", str(quick), "--set", f"run_dir={run_dir}", "--set", "refit.steps_share=0.5",
            "--set", setting]
    refused_in_one_line(capsys, args, key)
    assert not run_dir.exists()
