"""The built-in general data: determinism, held-out split, answers true to the drawn scenes."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
from PIL import Image

from ilora.errors import IloraError
from ilora.general import (
    SCENE_ONLY,
    GeneralDataConfig,
    generate_examples,
    generate_general_rows,
    general_vocabulary,
    rows_to_dataset,
    split_words,
)
from ilora.general.preview import TILE_HEIGHT, save_contact_sheet
from ilora.general.scenes import (
    BACKGROUND,
    COLORS,
    GRID,
    SCENE_FAMILIES,
    SHAPES,
    Scene,
    SceneObject,
    perturb_scene,
)
from ilora.general.splits import split_of

GAMES = ["Pong", "Breakout"]
ATARI = ["atari_game", "atari_brightness"]


def pixels_digest(row: dict) -> str:
    return hashlib.sha1(b"".join(np.asarray(im).tobytes() for im in row["images"])).hexdigest()


@pytest.fixture(scope="module")
def mixed_rows() -> list[dict]:
    cfg = GeneralDataConfig(families=[*SCENE_ONLY, *ATARI], games=GAMES, image_size=64)
    return generate_general_rows(70, seed=5, config=cfg)


def test_same_seed_gives_identical_rows_and_pixels(mixed_rows):
    cfg = GeneralDataConfig(families=[*SCENE_ONLY, *ATARI], games=GAMES, image_size=64)
    again = generate_general_rows(70, seed=5, config=cfg)
    assert [(r["prompt"], r["answer"], r["task"]) for r in again] == [
        (r["prompt"], r["answer"], r["task"]) for r in mixed_rows
    ]
    assert [pixels_digest(r) for r in again] == [pixels_digest(r) for r in mixed_rows]
    other = generate_general_rows(70, seed=6, config=cfg)
    assert [pixels_digest(r) for r in other] != [pixels_digest(r) for r in mixed_rows]


def test_rows_follow_the_contract(mixed_rows):
    counts = {}
    for row in mixed_rows:
        counts[row["task"]] = counts.get(row["task"], 0) + 1
        assert set(row) == {"images", "prompt", "answer", "task", "source"}
        assert row["answer"] and row["prompt"].endswith("?")
        assert all(im.mode == "RGB" for im in row["images"])
        if row["task"] == "compare":
            assert len(row["images"]) == 2
        else:
            assert len(row["images"]) == 1
        if row["source"] == "scenes":
            assert all(im.size == (64, 64) for im in row["images"])
        else:
            assert row["source"] == "atari_frames" and row["images"][0].size == (160, 210)
    # 70 rows over 7 families: equal shares
    assert counts == {f: 10 for f in [*SCENE_ONLY, *ATARI]}
    assert {r["answer"] for r in mixed_rows if r["task"] == "atari_game"} == set(GAMES)


def test_train_and_test_never_share_a_question():
    cfg = GeneralDataConfig(families=list(SCENE_ONLY), max_objects=4)
    train = generate_examples(1500, seed=0, split="train", config=cfg)
    test = generate_examples(1500, seed=1, split="test", config=cfg)
    train_keys, test_keys = {e.key for e in train}, {e.key for e in test}
    assert len(train_keys) == len(train) and len(test_keys) == len(test)  # no duplicates inside a split
    assert not train_keys & test_keys
    assert {split_of(k) for k in train_keys} == {"train"} and {split_of(k) for k in test_keys} == {"test"}
    seen = {(pixels_digest(e.row), e.row["prompt"]) for e in train}
    assert not any((pixels_digest(e.row), e.row["prompt"]) in seen for e in test)


def test_atari_splits_use_disjoint_episodes_and_frames():
    cfg = GeneralDataConfig(families=["atari_game"], games=GAMES)
    train = generate_examples(48, seed=0, split="train", config=cfg)
    test = generate_examples(48, seed=0, split="test", config=cfg)
    assert not {e.key for e in train} & {e.key for e in test}
    assert not {pixels_digest(e.row) for e in train} & {pixels_digest(e.row) for e in test}


def test_adding_a_family_leaves_the_others_rows_unchanged():
    alone = generate_general_rows(20, seed=2, families=["count"])
    mixed = generate_general_rows(40, seed=2, families=["count", "compare"])
    assert sorted(r["prompt"] + r["answer"] for r in alone) == sorted(
        r["prompt"] + r["answer"] for r in mixed if r["task"] == "count"
    )


# An independent reading of every prompt template, answered from the scene spec alone.
def derived_answer(scenes: tuple[Scene, ...], prompt: str) -> str:
    objs = scenes[0].objects

    def find(name: str) -> SceneObject:
        color, shape = name.split()
        (match,) = [o for o in objs if o.color == color and o.shape == shape]
        return match

    if m := re.fullmatch(r"How many (?:(\w+) )?(\w+)s are there\?", prompt):
        color, noun = m.groups()
        return str(sum((noun == "object" or o.shape == noun) and color in (None, o.color) for o in objs))
    if m := re.fullmatch(r"What color is the (\w+)\?", prompt):
        (match,) = [o for o in objs if o.shape == m[1]]
        return match.color
    if m := re.fullmatch(r"What shape is the (\w+) object\?", prompt):
        (match,) = [o for o in objs if o.color == m[1]]
        return match.shape
    if m := re.fullmatch(r"Where is the (\w+ \w+)\?", prompt):
        o = find(m[1])
        return ("top" if o.row < GRID / 2 else "bottom") + "-" + ("left" if o.col < GRID / 2 else "right")
    if m := re.fullmatch(r"Is the (\w+ \w+) left or right of the (\w+ \w+)\?", prompt):
        a, b = find(m[1]), find(m[2])
        assert a.col != b.col
        return "left" if a.col < b.col else "right"
    if m := re.fullmatch(r"Is the (\w+ \w+) above or below the (\w+ \w+)\?", prompt):
        a, b = find(m[1]), find(m[2])
        assert a.row != b.row
        return "above" if a.row < b.row else "below"
    if prompt == "Are the two images the same?":
        return "yes" if scenes[0] == scenes[1] else "no"
    if m := re.fullmatch(r"Which image has more (?:(\w+) )?(\w+)s, the first or the second\?", prompt):
        color, noun = m.groups()
        n = [
            sum((noun == "object" or o.shape == noun) and color in (None, o.color) for o in s.objects) for s in scenes
        ]
        assert n[0] != n[1]
        return "first" if n[0] > n[1] else "second"
    raise AssertionError(f"no reading for prompt {prompt!r}")


@pytest.mark.parametrize("family", list(SCENE_FAMILIES))
def test_answers_are_true_to_the_scene_spec(family):
    rng = np.random.default_rng(11)
    asked = 0
    answers = set()
    while asked < 300:
        question = SCENE_FAMILIES[family](rng, 6)
        if question is None:
            continue
        asked += 1
        assert question.answer == derived_answer(question.scenes, question.prompt)
        assert len(question.scenes) == (2 if family == "compare" else 1)
        answers.add(question.answer)
        for scene in question.scenes:  # one object per cell, at most max_objects
            assert 1 <= len(scene.objects) <= 6
            assert len({(o.row, o.col) for o in scene.objects}) == len(scene.objects)
    assert len(answers) > 1  # the family is not a constant


def test_count_answers_cover_zero_to_max():
    rng = np.random.default_rng(0)
    answers = {SCENE_FAMILIES["count"](rng, 5).answer for _ in range(400)}
    assert answers == {str(i) for i in range(6)}


def test_rendering_puts_each_colour_where_the_spec_says():
    scene = Scene(
        (
            SceneObject("circle", "red", 0, 0, size=0.6, dx=0.1, dy=-0.1),
            SceneObject("square", "blue", 1, 3, size=0.85),
            SceneObject("triangle", "yellow", 3, 2, size=0.55, dx=-0.2, dy=0.2),
        )
    )
    size = 96
    pixels = np.asarray(scene.render(size))
    assert pixels.shape == (size, size, 3) and pixels.dtype == np.uint8
    cell = size / GRID
    for o in scene.objects:
        x, y = int((o.col + 0.5 + o.dx) * cell), int((o.row + 0.5 + o.dy) * cell)
        assert tuple(pixels[y, x]) == COLORS[o.color]
    for r, c in scene.free_cells():
        assert tuple(pixels[int((r + 0.5) * cell), int((c + 0.5) * cell)]) == BACKGROUND
    # the drawn area of each colour sits inside its object's cell
    for o in scene.objects:
        ys, xs = np.nonzero((pixels == COLORS[o.color]).all(-1))
        assert ys.min() >= o.row * cell - 1 and ys.max() <= (o.row + 1) * cell
        assert xs.min() >= o.col * cell - 1 and xs.max() <= (o.col + 1) * cell
    assert scene.count(color="red") == 1 and scene.count(shape="square", color="red") == 0
    assert [o.quadrant for o in scene.objects] == ["top-left", "top-right", "bottom-right"]


def test_perturbed_scene_always_differs_coarsely():
    rng = np.random.default_rng(3)
    scene = Scene(tuple(SceneObject(s, "green", 0, i) for i, s in enumerate(SHAPES)))
    for _ in range(50):
        assert perturb_scene(rng, scene).coarse != scene.coarse


def test_vocabulary_covers_every_generated_word(mixed_rows):
    vocabulary = set(general_vocabulary(GAMES))
    more = generate_general_rows(700, seed=9, families=list(SCENE_ONLY))
    for row in mixed_rows + more:
        assert set(split_words(row["prompt"] + " " + row["answer"])) <= vocabulary
    assert len(vocabulary) < 100  # small and closed
    assert "red" in vocabulary and "Pong" in vocabulary and "?" in vocabulary


def test_dataset_round_trip_keeps_pixels(mixed_rows):
    rows = mixed_rows[:12]
    dataset = rows_to_dataset(rows)
    assert len(dataset) == 12 and set(dataset.column_names) == {"images", "prompt", "answer", "task", "source"}
    for row, back in zip(rows, dataset):
        assert back["prompt"] == row["prompt"] and back["answer"] == row["answer"]
        assert [im.mode for im in back["images"]] == ["RGB"] * len(row["images"])
        assert pixels_digest(back) == pixels_digest(row)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"families": ["count", "nope"]}, "unknown"),
        ({"split": "val"}, "split"),
        ({"config": GeneralDataConfig(max_objects=0)}, "max_objects"),
        ({"config": GeneralDataConfig(families=["atari_game"], games=["NotAGame"])}, "NotAGame"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    args = {"n": 4, "seed": 0, **kwargs}
    with pytest.raises(IloraError, match=message):
        generate_general_rows(**args)


def test_exhausted_question_space_is_an_error_not_a_hang():
    # one object per scene: only 5 colours x 3 shapes x 16 cells distinct colour questions
    cfg = GeneralDataConfig(families=["color"], max_objects=1)
    with pytest.raises(IloraError, match="distinct"):
        generate_examples(400, seed=0, config=cfg)


def test_contact_sheet_is_written_atomically(tmp_path, mixed_rows):
    out = save_contact_sheet(mixed_rows[:6], tmp_path / "sheet.png", columns=3)
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.png"]
    with Image.open(out) as sheet:
        assert sheet.mode == "RGB" and sheet.height > 2 * TILE_HEIGHT
