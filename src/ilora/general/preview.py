"""A contact sheet of rows (images with their prompt and answer) as one PNG, to look at the data."""

from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

TILE_HEIGHT = 128  # every image is scaled to this height, keeping its aspect ratio
CAPTION_LINES = 4
LINE_HEIGHT = 12
PAD = 6


def row_tile(row: dict[str, Any], width: int) -> Image.Image:
    """One row: its images side by side, then ``prompt -> answer [task]`` wrapped below."""
    tile = Image.new("RGB", (width, TILE_HEIGHT + CAPTION_LINES * LINE_HEIGHT + PAD), "white")
    x = 0
    for image in row["images"]:
        scaled = image.resize((max(1, round(image.width * TILE_HEIGHT / image.height)), TILE_HEIGHT), Image.NEAREST)
        tile.paste(scaled, (x, 0))
        x += scaled.width + 2
    caption = f"{row['prompt']} -> {row['answer']} [{row['task']}]"
    lines = textwrap.wrap(caption, width=max(10, width // 6))[:CAPTION_LINES]
    draw = ImageDraw.Draw(tile)
    for i, line in enumerate(lines):
        draw.text((2, TILE_HEIGHT + 2 + i * LINE_HEIGHT), line, fill="black")
    return tile


def save_contact_sheet(rows: list[dict[str, Any]], path: str | Path, columns: int = 4) -> Path:
    """Write ``rows`` as a grid PNG at ``path`` (atomically: a temp file in the same folder, then renamed).

    Args:
        rows: rows of the project's row contract.
        path: the ``.png`` to write; its folder must exist.
        columns: tiles per grid row.

    Returns:
        The written path.
    """
    path = Path(path)
    widest = max(sum(round(im.width * TILE_HEIGHT / im.height) + 2 for im in r["images"]) for r in rows)
    tiles = [row_tile(r, widest) for r in rows]
    rows_of_tiles = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * (widest + PAD), rows_of_tiles * (tiles[0].height + PAD)), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * (widest + PAD), (i // columns) * (tile.height + PAD)))
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        sheet.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
