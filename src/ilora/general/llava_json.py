"""Real general data in LLaVA's conversation format: a JSON list plus an image folder.

Each entry looks like::

    {"id": "0001", "image": "coco/x.jpg" (or a list of paths),
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

Choices (documented, not guessed per entry):

- ``turns="first"`` (default) keeps the first human/gpt exchange of each conversation;
  ``turns="each"`` makes one row per exchange, each with only that exchange's question
  (earlier turns are not carried as context; LLaVA's later turns are mostly independent
  questions about the same image).
- ``<image>`` placeholders are removed from the prompt: in the project's row contract the
  images always come first. An entry must carry either no placeholder or one per image.
- Entries without an image (LLaVA mixes in text-only chat) are skipped and counted in a
  warning; the row contract needs at least one image.
- ``.jsonl`` files (one entry per line) are read too.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

from ilora.errors import IloraError

IMAGE_PLACEHOLDER = "<image>"
HUMAN_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant"}


def read_entries(json_path: Path) -> list[Any]:
    """The raw entries of a ``.json`` list or a ``.jsonl`` file."""
    if not json_path.is_file():
        raise IloraError(f"{json_path}: file not found")
    text = json_path.read_text(encoding="utf-8")
    try:
        if json_path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        raise IloraError(f"{json_path}: not valid JSON ({err})") from err
    if not isinstance(entries, list):
        raise IloraError(f"{json_path}: expected a JSON list of conversations, got {type(entries).__name__}")
    return entries


def exchanges(conversations: Any, where: str) -> list[tuple[str, str]]:
    """The (human text, assistant text) pairs of a conversation, checked for shape and order."""
    if not isinstance(conversations, list) or not conversations:
        raise IloraError(f"{where}: 'conversations' must be a non-empty list")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise IloraError(f"{where}: turn {i} must be an object with 'from' and a string 'value'")
        turns.append((turn["from"], turn["value"]))
    if turns[0][0] == "system":  # some LLaVA variants open with a system turn; it is not a question
        turns = turns[1:]
    if len(turns) < 2 or len(turns) % 2:
        raise IloraError(f"{where}: expected alternating human/gpt turns, got {len(turns)} turn(s)")
    pairs = []
    for (role_q, question), (role_a, answer) in zip(turns[::2], turns[1::2]):
        if role_q not in HUMAN_ROLES or role_a not in ASSISTANT_ROLES:
            raise IloraError(f"{where}: expected a human turn then a gpt turn, got {role_q!r} then {role_a!r}")
        if not answer.strip():
            raise IloraError(f"{where}: empty gpt answer")
        pairs.append((question, answer))
    return pairs


def strip_placeholders(text: str) -> str:
    """The question without ``<image>`` placeholders and the blank lines around them."""
    return re.sub(r"\s*<image>\s*", " ", text).strip()


def open_image(path: Path, where: str) -> Image.Image:
    if not path.is_file():
        raise IloraError(f"{where}: image {path} not found")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise IloraError(f"{where}: image {path} could not be read ({err})") from err


def load_llava_json(
    json_path: str | Path,
    image_folder: str | Path,
    turns: Literal["first", "each"] = "first",
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Rows (the project's row contract) from a LLaVA conversation file and its image folder.

    Args:
        json_path: the ``.json`` list (or ``.jsonl``) of conversations.
        image_folder: folder the entries' ``image`` paths are relative to.
        turns: ``"first"`` exchange per conversation, or ``"each"`` exchange as its own row.
        limit: stop after this many conversations with images (images are loaded eagerly).

    Returns:
        Row dicts with ``source="llava_json"`` and ``task`` from the entry's ``task`` field
        when it has one, else ``"llava"``.

    Raises:
        IloraError: naming the file and entry for malformed entries, missing or
            unreadable images, and placeholder counts that do not match the images.
    """
    json_path, image_folder = Path(json_path), Path(image_folder)
    if turns not in ("first", "each"):
        raise IloraError(f"turns={turns!r}: expected 'first' or 'each'")
    if not image_folder.is_dir():
        raise IloraError(f"{image_folder}: image folder not found")
    rows: list[dict[str, Any]] = []
    text_only = conversations_used = 0
    for index, entry in enumerate(read_entries(json_path)):
        if limit is not None and conversations_used >= limit:
            break
        if not isinstance(entry, dict):
            raise IloraError(f"{json_path}: entry {index} is not an object")
        where = f"{json_path}: entry {index} (id {entry.get('id', '?')!r})"
        pairs = exchanges(entry.get("conversations"), where)
        image_field = entry.get("image")
        if image_field is None:
            text_only += 1
            continue
        names = [image_field] if isinstance(image_field, str) else image_field
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise IloraError(f"{where}: 'image' must be a path or a non-empty list of paths")
        placeholders = sum(q.count(IMAGE_PLACEHOLDER) for q, _ in pairs)
        if placeholders not in (0, len(names)):
            raise IloraError(f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(names)} image(s)")
        images = [open_image(image_folder / name, where) for name in names]
        task = entry["task"] if isinstance(entry.get("task"), str) else "llava"
        for question, answer in pairs if turns == "each" else pairs[:1]:
            prompt = strip_placeholders(question)
            if not prompt:
                raise IloraError(f"{where}: empty human question")
            rows.append(
                {"images": images, "prompt": prompt, "answer": answer.strip(), "task": task, "source": "llava_json"}
            )
        conversations_used += 1
    if text_only:
        warnings.warn(f"{json_path}: skipped {text_only} text-only conversation(s) (no 'image')", stacklevel=2)
    return rows
