"""The input contract of every command (issue 15), walked through the real CLI.

A bad input is refused before any work: exit status 2, one stderr line naming the file or
key, no traceback, nothing created and no input changed. Each case below is one user report.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from ilora.atari.collect import CollectConfig
from ilora.cli import main
from ilora.config import to_dict
from ilora.fileio import atomic_dir, file_sha256
from ilora.models.load import builtin_base

from merge_helpers import build_tiny_lm, make_adapter
from routing_helpers import make_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def copy_adapter(src: Path, dst: Path, edit_tensors=None) -> Path:
    shutil.copytree(src, dst)
    if edit_tensors is not None:
        tensors = load_file(dst / "adapter_model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def set_nan(tensors: dict) -> None:
    tensors[sorted(tensors)[0]][0, 0] = float("nan")


def truncate(path: Path) -> Path:
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return path


def as_pickled_bin(path: Path) -> Path:
    weights = path / "adapter_model.safetensors"
    torch.save(load_file(weights), path / "adapter_model.bin")
    weights.unlink()
    return path


def train_config(path: Path, model: str, out: Path, data: Path) -> Path:
    config = {"model": model, "out": str(out), "task_data": [{"path": str(data)}], "general_data": [{"path": str(data)}],
              "training": {"max_steps": 1, "lora_r": 4, "use_cpu": True, "save_strategy": "no"}}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """Inputs of every case, in one folder whose every byte the cases compare before and after."""
    from datasets import Dataset

    root = tmp_path_factory.mktemp("contract")
    z = {"root": root, "out": root / "out"}
    z["out"].mkdir()
    z["a"] = make_adapter(builtin_base(), root / "a", seed=1, r=4, alpha=8, targets=["q_proj", "v_proj"])
    z["b"] = make_adapter(builtin_base(), root / "b", seed=2, r=4, alpha=8, targets=["q_proj", "v_proj"])
    z["a_copy"] = copy_adapter(z["a"], root / "a_copy")
    z["nan"] = copy_adapter(z["a"], root / "nan", set_nan)
    z["truncated"] = truncate(copy_adapter(z["a"], root / "truncated"))
    z["bin"] = as_pickled_bin(copy_adapter(z["a"], root / "bin"))
    z["lm"] = build_tiny_lm(root / "lm")  # a base of other names and shapes
    z["lm_adapter"] = make_adapter(z["lm"], root / "lm_adapter", seed=3, r=4, targets=["q_proj", "v_proj"])
    z["data"] = root / "data"
    Dataset.from_list(make_rows(4, 0)).save_to_disk(str(z["data"]))
    z["trained"] = root / "trained"
    z["trained"].mkdir()
    (z["trained"] / "adapter_config.json").write_text("{}")
    z["train_missing_model"] = train_config(root / "missing_model.yaml", "models/tiny", z["out"] / "t", z["data"])
    z["train_existing_out"] = train_config(root / "existing_out.yaml", "builtin", z["trained"], z["data"])
    # A finished collection of 3 Pong episodes (only what the resume logic reads).
    z["collected"] = root / "collected"
    (z["collected"] / "collect_config.json").parent.mkdir()
    settings = to_dict(CollectConfig(game="Pong", episodes=3, max_steps=30))
    (z["collected"] / "collect_config.json").write_text(json.dumps(settings))
    for index in range(3):
        episode = z["collected"] / "episodes" / f"episode_{index:05d}"
        episode.mkdir(parents=True)
        (episode / "summary.json").write_text("{}")
    return z


PLAY = "play --game Pong --episodes 1 --max-frames 40"
# (case, command line, words the one error line must contain); {name} is a path from ``zoo``.
CASES = [
    ("play: missing local model", f"{PLAY} --model models/tiny", ["models/tiny", "no such model folder"]),
    ("eval: missing local model", "eval general --model models/tiny --rows 4", ["models/tiny", "no such model folder"]),
    ("train: missing local model", "train {train_missing_model}", ["models/tiny", "no such model folder"]),
    ("merge: missing --base", "merge {a} --base models/tiny --save-model --out {out}/m", ["models/tiny", "no such model folder"]),
    ("play: NaN adapter", f"{PLAY} --model builtin --adapter {{nan}}", ["{nan}", "NaN"]),
    ("eval: NaN adapter", "eval general --model builtin --adapter {nan} --rows 4", ["{nan}", "NaN"]),
    ("play: truncated adapter", f"{PLAY} --model builtin --adapter {{truncated}}", ["{truncated}", "corrupt safetensors"]),
    ("play: adapter of another base", f"{PLAY} --model builtin --adapter {{lm_adapter}}", ["{lm_adapter}", "not in the base model"]),
    ("play: .bin adapter", f"{PLAY} --model builtin --adapter {{bin}}", ["adapter_model.bin", "not read"]),
    ("merge: .bin adapter", "merge {a} {bin} --out {out}/m", ["adapter_model.bin", "not read"]),
    ("merge: --base of another shape", "merge {a} --base {lm} --save-model --out {out}/m", ["{a}", "{lm}", "base model"]),
    ("merge: peft:svd, base of another shape", "merge {a} {b} --method peft:svd --base {lm} --out {out}/m", ["{a}", "{lm}"]),
    ("merge: same adapter twice", "merge {a} {a} --out {out}/m", ["{a}", "same folder"]),
    ("merge: same weights twice", "merge {a} {a_copy} --out {out}/m", ["{a_copy}", "{a}", "identical weights"]),
    ("merge: --weights not numbers", "merge {a} {b} --weights 1,x --out {out}/m", ["--weights", "1,x"]),
    ("collect: game without expert", "collect --game Seaquest --episodes 1 --out {out}/c", ["Seaquest", "object_text"]),
    ("collect: game without expert, no object text", "collect --game Seaquest --no-object-text --episodes 1 --out {out}/c",
     ["Seaquest", "no scripted expert"]),
    ("collect: fewer episodes than collected", "collect --game Pong --episodes 2 --max-steps 30 --out {collected}",
     ["{collected}", "--overwrite"]),
    ("train: existing out", "train {train_existing_out}", ["{trained}", "--overwrite"]),
    ("play: --json in a missing folder", f"{PLAY} --model builtin --json {{out}}/no/such/r.json", ["--json", "does not exist"]),
    ("eval: --json in a missing folder", "eval general --model builtin --rows 4 --json {out}/no/such/r.json",
     ["--json", "does not exist"]),
]


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file and folder under ``folders``, files with their sha256."""
    tree = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            tree[str(path)] = "dir" if path.is_dir() else file_sha256(path)
    return tree


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse refuses before ``main`` returns
        return exit_.code


@pytest.mark.parametrize(("command", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(zoo, capsys, monkeypatch, command, needles):
    monkeypatch.chdir(zoo["root"])  # "models/tiny" is relative, and does not exist there
    argv = command.format(**zoo).split()
    before = snapshot(zoo["root"], builtin_base())
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"ilora {argv[0]}" in lines[0] and "error:" in lines[0], lines[0]
    for needle in needles:
        assert needle.format(**zoo) in lines[0], lines[0]
    assert snapshot(zoo["root"], builtin_base()) == before


def test_object_text_without_ram_reader_is_refused_before_playing():
    from ilora.atari.collect import collect_dataset
    from ilora.atari.experts import RandomPolicy
    from ilora.errors import IloraError

    with pytest.raises(IloraError, match="object_text needs a RAM reader and Seaquest"):
        collect_dataset("Seaquest", 1, policy=RandomPolicy(["NOOP"]), object_text=True, progress=False)


def test_play_json_is_strict_json(tmp_path, capsys):
    out = tmp_path / "play.json"
    assert main([*PLAY.split(), "--model", "builtin", "--json", str(out)]) == 0
    capsys.readouterr()
    payload = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"{out} holds {name}"))
    assert payload["summary"]["std"] is None  # one episode: no spread
    assert payload["settings"]["model"] == "builtin"


def test_output_folders_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "made") as tmp:
            (tmp / "file.txt").write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "made").stat().st_mode & 0o777 == 0o755


def test_python_dash_m_and_version_work_like_the_console_script():
    import subprocess
    import sys

    from ilora import __version__

    out = subprocess.run([sys.executable, "-m", "ilora", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"ilora {__version__}"
