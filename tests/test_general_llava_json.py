"""Loading LLaVA conversation JSON: the documented turn and placeholder rules, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ilora.errors import IloraError
from ilora.general import load_llava_json


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 10), (255, 0, 0)).save(images / "a.png")
    Image.new("L", (8, 8), 128).save(images / "sub" / "b.png")  # greyscale: must come back RGB
    Image.new("RGBA", (6, 6), (0, 0, 255, 100)).save(images / "c.png")
    (images / "broken.jpg").write_bytes(b"not an image")
    return images


def write(tmp_path: Path, entries, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(entries if isinstance(entries, str) else json.dumps(entries))
    return path


ENTRIES = [
    {
        "id": "one",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "How wide is it?"},
            {"from": "gpt", "value": "20"},
        ],
    },
    {
        "id": "two",
        "image": ["sub/b.png", "c.png"],
        "task": "interleave",
        "conversations": [
            {"from": "human", "value": "<image> <image>\nAre the two images the same?"},
            {"from": "gpt", "value": "no"},
        ],
    },
    {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
]


def test_first_turn_rows(tmp_path, folder):
    path = write(tmp_path, ENTRIES)
    before = path.read_bytes()
    with pytest.warns(UserWarning, match="1 text-only"):
        rows = load_llava_json(path, folder)
    assert path.read_bytes() == before
    assert [(r["prompt"], r["answer"], r["task"], r["source"]) for r in rows] == [
        ("What colour is it?", "Red.", "llava", "llava_json"),
        ("Are the two images the same?", "no", "interleave", "llava_json"),
    ]
    assert [len(r["images"]) for r in rows] == [1, 2]
    assert all(im.mode == "RGB" for r in rows for im in r["images"])
    assert rows[0]["images"][0].size == (20, 10)
    assert tuple(np.asarray(rows[1]["images"][0])[0, 0]) == (128, 128, 128)


def test_each_turn_rows_and_limit(tmp_path, folder):
    path = write(tmp_path, ENTRIES)
    with pytest.warns(UserWarning):
        rows = load_llava_json(path, folder, turns="each")
    assert [r["prompt"] for r in rows] == ["What colour is it?", "How wide is it?", "Are the two images the same?"]
    assert rows[0]["images"] is rows[1]["images"]
    assert len(load_llava_json(path, folder, turns="each", limit=1)) == 2


def test_jsonl_and_system_turn(tmp_path, folder):
    entry = {
        "id": 7,
        "image": "a.png",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "user", "value": "Colour?"},
            {"from": "assistant", "value": "red"},
        ],
    }
    path = write(tmp_path, json.dumps(entry) + "\n\n" + json.dumps(entry) + "\n", name="data.jsonl")
    rows = load_llava_json(path, folder)
    assert [(r["prompt"], r["answer"]) for r in rows] == [("Colour?", "red")] * 2


def conversation(**changes):
    entry = {
        "id": "bad",
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}],
    }
    entry.update(changes)
    return entry


@pytest.mark.parametrize(
    "content, message",
    [
        ("[{", "not valid JSON"),
        ({"id": 1}, "expected a JSON list"),
        (["just a string"], "entry 0 is not an object"),
        ([conversation(image="missing.png")], "missing.png not found"),
        ([conversation(image="broken.jpg")], "broken.jpg could not be read"),
        ([conversation(image=[])], "'image' must be"),
        ([conversation(image=["a.png", "c.png"])], "1 <image> placeholder"),
        ([conversation(conversations=[])], "non-empty list"),
        ([conversation(conversations=[{"from": "human", "value": "Q"}])], "alternating"),
        ([conversation(conversations=[{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}])], "human turn"),
        ([conversation(conversations=[{"from": "human", "value": "Q"}, {"from": "gpt", "value": " "}])], "empty gpt"),
        ([conversation(conversations=[{"from": "human"}, {"from": "gpt", "value": "A"}])], "turn 0"),
        ([conversation(conversations=[{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A"}])], "empty human"),
    ],
)
def test_bad_input_names_the_file_and_problem(tmp_path, folder, content, message):
    path = write(tmp_path, content)
    with pytest.raises(IloraError, match=message) as info:
        load_llava_json(path, folder)
    assert str(path) in str(info.value)


def test_missing_paths_and_bad_options(tmp_path, folder):
    with pytest.raises(IloraError, match="nope.json: file not found"):
        load_llava_json(tmp_path / "nope.json", folder)
    path = write(tmp_path, ENTRIES)
    with pytest.raises(IloraError, match="image folder not found"):
        load_llava_json(path, tmp_path / "no_images")
    with pytest.raises(IloraError, match="turns="):
        load_llava_json(path, folder, turns="all")
