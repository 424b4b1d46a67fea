"""File helpers: atomic writes (a folder or file appears complete or not at all), strict JSON, content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ilora.errors import IloraError


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` only if the block succeeds.

    Args:
        out: the final folder.
        overwrite: replace an existing ``out`` (only once the new one is complete); when
            ``False`` an existing ``out`` is an error naming it.

    Yields:
        The temporary folder to write into; it is removed if the block raises.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise IloraError(f"{out}: output already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_dir(out.parent, f".{out.name}.tmp-")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = _new_dir(out.parent, f".{out.name}.old-")
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _new_dir(parent: Path, prefix: str) -> Path:
    # Not tempfile.mkdtemp: its folders are mode 0700 whatever the umask, and the temporary
    # folder becomes the output; a plain mkdir gives the user's usual permissions.
    while True:
        path = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Refuse, before any work, an output file that could not be written: its folder is missing or
    the path is a folder. ``what`` names the option in the one-line error (e.g. ``"--json"``)."""
    path = Path(path)
    if path.is_dir():
        raise IloraError(f"{what} {path}: is a folder, expected a file path")
    if not path.parent.is_dir():
        raise IloraError(f"{what} {path}: folder {path.parent} does not exist")
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a hidden temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def to_json(data: Any, indent: int | None = 1) -> str:
    """Strict JSON text: NaN and ±Inf floats become ``null`` (``json.dumps`` would write invalid ``NaN``)."""
    return json.dumps(_finite_or_none(data), indent=indent, allow_nan=False)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: str | os.PathLike) -> str:
    """Hex SHA-256 over a folder's files: each relative path and its content's sha256, in sorted order."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()
