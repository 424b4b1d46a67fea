"""The built-in general vision-language data: scene questions and Atari frame questions.

Row contract (shared by the whole project): a dict with

- ``images``: list of PIL RGB images (1, or 2 for the two-image ``compare`` family);
  the images conceptually come before the prompt,
- ``prompt``: the user text, ``answer``: the short assistant text (exact-match scored),
- ``task``: the question family (``count``, ``color``, ``shape``, ``position``, ``compare``,
  ``atari_game``, ``atari_brightness``), ``source``: ``scenes`` / ``atari_frames`` / ``llava_json``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from ilora.config import field
from ilora.errors import IloraError
from ilora.general.atari_frames import (
    ATARI_FAMILIES,
    DEFAULT_GAMES,
    FrameSampling,
    atari_prompt_vocabulary,
    interleaved_frames,
)
from ilora.general.scenes import SCENE_FAMILIES, scene_prompt_vocabulary
from ilora.general.splits import Split, check_split, content_key, family_rng, split_of

Row = dict[str, Any]
ALL_FAMILIES: tuple[str, ...] = (*SCENE_FAMILIES, *ATARI_FAMILIES)
SCENE_ONLY: tuple[str, ...] = tuple(SCENE_FAMILIES)
# Give up on a family when this many drawn questions in a row were unusable (duplicate,
# other split, or a scene that cannot carry the question): the space is exhausted.
MAX_CONSECUTIVE_MISSES = 10_000


@dataclass
class GeneralDataConfig:
    """What the general-data generator draws (the row count, seed and split are call arguments)."""

    families: list[str] = field(
        default_factory=lambda: list(ALL_FAMILIES), help="question families to mix, equally often"
    )
    image_size: int = field(96, help="side of the square scene images in pixels (Atari frames stay 210x160)")
    max_objects: int = field(6, help="most shapes in one scene (1..16)")
    games: list[str] = field(
        default_factory=lambda: list(DEFAULT_GAMES), help="ALE games whose frames the Atari families show"
    )
    frames_per_episode: int = field(16, help="Atari frames kept per random-policy episode")


@dataclass(frozen=True)
class Example:
    """A generated row with the content key that decided its split."""

    key: str
    row: Row


def family_quotas(n: int, families: list[str]) -> dict[str, int]:
    """Split ``n`` rows over ``families`` as evenly as possible (earlier families get the remainder)."""
    return {f: n // len(families) + (i < n % len(families)) for i, f in enumerate(families)}


def validate_config(cfg: GeneralDataConfig) -> None:
    unknown = [f for f in cfg.families if f not in ALL_FAMILIES]
    if unknown or not cfg.families:
        raise IloraError(f"families={cfg.families}: unknown or empty; known: {list(ALL_FAMILIES)}")
    if len(set(cfg.families)) != len(cfg.families):
        raise IloraError(f"families={cfg.families}: listed twice")
    if not 1 <= cfg.max_objects <= 16:
        raise IloraError(f"max_objects={cfg.max_objects}: expected 1..16 (one object per cell of a 4x4 grid)")
    if cfg.image_size < 16:
        raise IloraError(f"image_size={cfg.image_size}: expected at least 16 pixels")


def scene_examples(family: str, n: int, seed: int, split: Split, cfg: GeneralDataConfig) -> list[Example]:
    """``n`` distinct rows of one scene family whose content keys fall in ``split``."""
    make_question = SCENE_FAMILIES[family]
    rng = family_rng(seed, "scenes", family)
    seen: set[str] = set()
    out: list[Example] = []
    misses = 0
    while len(out) < n:
        question = make_question(rng, cfg.max_objects)
        key = None
        if question is not None:
            key = content_key((family, question.prompt, tuple(s.coarse for s in question.scenes)))
        if key is None or key in seen or split_of(key) != split:
            misses += 1
            if misses > MAX_CONSECUTIVE_MISSES:
                raise IloraError(
                    f"family {family!r}: found only {len(out)} distinct {split} rows of {n} requested "
                    f"with max_objects={cfg.max_objects}; ask for fewer rows or allow more objects"
                )
            continue
        misses = 0
        seen.add(key)
        row = {
            "images": [s.render(cfg.image_size) for s in question.scenes],
            "prompt": question.prompt,
            "answer": question.answer,
            "task": family,
            "source": "scenes",
        }
        out.append(Example(key, row))
    return out


def atari_examples(quotas: dict[str, int], seed: int, split: Split, cfg: GeneralDataConfig) -> list[Example]:
    """Rows of the Atari families, all asked about one shared stream of frames."""
    remaining = {f: n for f, n in quotas.items() if n > 0}
    if not remaining:
        return []
    sampling = FrameSampling(frames_per_episode=cfg.frames_per_episode)
    frames = interleaved_frames(cfg.games, seed, split, sampling)
    out: list[Example] = []
    misses = 0
    try:
        while remaining:
            frame = next(frames)
            image = None
            asked = False
            for family in list(remaining):
                qa = ATARI_FAMILIES[family](frame)
                if qa is None:
                    continue
                asked = True
                if image is None:
                    image = Image.fromarray(frame.pixels, "RGB")
                prompt, answer = qa
                key = content_key((family, prompt, frame.game, frame.digest))
                row = {"images": [image], "prompt": prompt, "answer": answer, "task": family, "source": "atari_frames"}
                out.append(Example(key, row))
                remaining[family] -= 1
                if remaining[family] == 0:
                    del remaining[family]
            misses = 0 if asked else misses + 1
            if misses > MAX_CONSECUTIVE_MISSES:
                raise IloraError(f"families {sorted(remaining)}: no frame of games {cfg.games} can carry them")
    finally:
        frames.close()
    return out


def generate_examples(
    n: int, seed: int, split: str = "train", config: GeneralDataConfig | None = None, progress: bool = False
) -> list[Example]:
    """``n`` general rows with their content keys, deterministic in (n, seed, split, config).

    Families get equal shares of ``n``; each scene family has its own random stream, so
    the rows of one family do not change when another is added. The rows are shuffled
    (with ``seed``) so that any prefix mixes all families. Train and test never share a
    content key (see ``ilora.general.splits``).
    """
    cfg = config or GeneralDataConfig()
    split = check_split(split)
    validate_config(cfg)
    if n < 0 or seed < 0:
        raise IloraError(f"n={n}, seed={seed}: expected non-negative integers")
    quotas = family_quotas(n, cfg.families)
    examples: list[Example] = []
    scene_families = [f for f in cfg.families if f in SCENE_FAMILIES]
    for family in tqdm(scene_families, desc=f"general {split} scenes", disable=not progress):
        examples += scene_examples(family, quotas[family], seed, split, cfg)
    examples += atari_examples({f: quotas[f] for f in cfg.families if f in ATARI_FAMILIES}, seed, split, cfg)
    order = family_rng(seed, "order", split).permutation(len(examples))
    return [examples[i] for i in order]


def generate_general_rows(
    n: int,
    seed: int,
    split: str = "train",
    families: list[str] | tuple[str, ...] | None = None,
    image_size: int | None = None,
    config: GeneralDataConfig | None = None,
    progress: bool = False,
) -> list[Row]:
    """``n`` general rows (see the module docstring for the row contract).

    Args:
        n: number of rows, shared equally by the families.
        seed: any non-negative integer; equal arguments give identical rows and pixels.
        split: ``"train"`` or ``"test"``; the two never share a question about the same content.
        families: question families to mix; overrides ``config.families`` when given.
        image_size: side of the scene images; overrides ``config.image_size`` when given.
        config: the generator settings (default ``GeneralDataConfig()``: all families, 96 px).
        progress: show a tqdm bar.

    Returns:
        A list of row dicts.
    """
    cfg = dataclasses.replace(config or GeneralDataConfig())
    if families is not None:
        cfg.families = list(families)
    if image_size is not None:
        cfg.image_size = image_size
    return [e.row for e in generate_examples(n, seed, split, cfg, progress)]


def rows_to_dataset(rows: list[Row]):
    """A ``datasets.Dataset`` of rows with typed columns (images decode back to PIL RGB)."""
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    features = Features(
        {
            "images": List(ImageFeature()),
            "prompt": Value("string"),
            "answer": Value("string"),
            "task": Value("string"),
            "source": Value("string"),
        }
    )
    columns = {name: [row[name] for row in rows] for name in features}
    return Dataset.from_dict(columns, features=features)


def generate_general(
    n: int,
    seed: int,
    split: str = "train",
    families: list[str] | tuple[str, ...] | None = None,
    image_size: int | None = None,
    config: GeneralDataConfig | None = None,
    progress: bool = False,
):
    """``generate_general_rows`` as a ``datasets.Dataset`` (same arguments)."""
    return rows_to_dataset(generate_general_rows(n, seed, split, families, image_size, config, progress))


WORD = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")


def split_words(text: str) -> list[str]:
    """The word-level pieces of a text: letter runs, single digits, single punctuation marks."""
    return WORD.findall(text)


def general_vocabulary(games: list[str] | tuple[str, ...] = DEFAULT_GAMES) -> list[str]:
    """Every word, digit and punctuation mark the generator can emit, sorted (case kept).

    Pieces are as cut by ``split_words``; ``games`` are the Atari games asked about.
    """
    texts = scene_prompt_vocabulary() + atari_prompt_vocabulary(games)
    return sorted({w for text in texts for w in split_words(text)})
