"""YAML presets: ``extends``, overrides, and errors that name the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from ilora.config import load_yaml, read_yaml_mapping
from ilora.errors import IloraError
from ilora.experiment.config import ExperimentConfig

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_extends_updates_the_parent_key_by_key(tmp_path):
    write(tmp_path / "parent.yaml", "seed: 1\ntrain: {max_steps: 10, batch_size: 4}\nablations: {variants: {}}\n")
    (tmp_path / "sub").mkdir()
    child = write(tmp_path / "sub" / "child.yaml",
                  "extends: ../parent.yaml\ntrain: {max_steps: 20}\nablations: {variants: {kl: {eps_kl: 1.0}}}\n")
    data = read_yaml_mapping(child)
    assert data == {
        "seed": 1, "train": {"max_steps": 20, "batch_size": 4}, "ablations": {"variants": {"kl": {"eps_kl": 1.0}}}
    }
    config = load_yaml(ExperimentConfig, child, ["seed=3"])
    assert (config.seed, config.train.max_steps, config.train.batch_size) == (3, 20, 4)


def test_the_shipped_ablation_preset_is_the_default_plus_ablations():
    default = load_yaml(ExperimentConfig, ROOT / "configs" / "default.yaml")
    ablations = load_yaml(ExperimentConfig, ROOT / "configs" / "ablations.yaml")
    assert default.ablations.variants == {}
    assert ablations.ablations.variants
    # Every other setting is the default's: its run reuses the default run's stages.
    for key in ("run_dir", "seed", "games", "base", "data", "train", "merge", "eval"):
        assert getattr(ablations, key) == getattr(default, key), key
    weights = {(w.get("eps_kl", 0.0), w.get("eps_norm", 0.0)) for w in ablations.ablations.variants.values()}
    assert (default.train.eps_kl, default.train.eps_norm) not in weights  # the main routed adapters are not retrained


@pytest.mark.parametrize(
    "files, message",
    [
        ({"a.yaml": "extends: missing.yaml\n"}, "missing.yaml: config file not found"),
        ({"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\n"}, "b.yaml: 'extends: a.yaml' loops back"),
        ({"a.yaml": "extends: [b.yaml]\n"}, "a.yaml: 'extends' must name one YAML file"),
        ({"a.yaml": "extends: b.yaml\n", "b.yaml": "- 1\n"}, "b.yaml: expected a YAML mapping"),
    ],
)
def test_bad_extends_names_the_file(tmp_path, files, message):
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(IloraError, match=message):
        read_yaml_mapping(tmp_path / "a.yaml")
