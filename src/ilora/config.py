"""Typed dataclass configs, read from YAML presets in ``configs/`` and overridden on the CLI.

Every config is a ``@dataclass`` whose fields carry ``metadata={"help": ...}``; the same
help text documents the YAML keys and the ``--set key=value`` overrides. Values are
converted to the declared field types (YAML reads ``1e-3`` as a string) or refused in one
line naming the key, before anything runs.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ilora.errors import IloraError

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with its help text (shown by ``describe`` and ``ilora ... --help``)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help})


@functools.cache
def _validator(tp: Any):
    """pydantic's lax validator for ``tp``: ``"2"`` is an int, ``"1e-3"`` a float, ``"eight"`` neither.

    Numbers are accepted for strings (``--set out=2024``): a YAML scalar that looks numeric
    is read as a number.
    """
    import pydantic

    return pydantic.TypeAdapter(tp, config=pydantic.ConfigDict(coerce_numbers_to_str=True))


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """``value`` as the field type ``tp``, or an ``IloraError`` naming ``where``.

    Nested dataclasses (alone, optional or in a list) go through :func:`from_dict`, so their
    keys are checked and named; every other type through pydantic (:func:`_validator`).
    """
    import pydantic

    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    members = [a for a in args if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and value is not None and len(members) == 1:
        if dataclasses.is_dataclass(members[0]):
            return _coerce(members[0], value, where)
    if origin is list and len(args) == 1 and dataclasses.is_dataclass(args[0]) and isinstance(value, list):
        return [_coerce(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    try:
        return _validator(tp).validate_python(value)
    except pydantic.ValidationError:
        raise IloraError(f"{where} = {value!r}: expected {_type_name(tp)}") from None


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, each value converted to its field's type.

    Raises:
        IloraError: ``data`` is not a mapping, has unknown keys, a value does not convert to
            its field's type, or ``cls``'s own checks refuse it; the message names ``where``
            (and the key).
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise IloraError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise IloraError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except IloraError as err:  # a dataclass's own checks: say which file
        raise IloraError(f"{where}: {err}") from err


def to_dict(obj: Any) -> Any:
    """A dataclass as plain YAML/JSON-able data (Paths become strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["a.b=3", "c=x"]`` -> nested mapping, values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise IloraError(f"--set {pair!r}: expected KEY=VALUE")
        key, raw = pair.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return out


def parse_named_path(value: str) -> tuple[str, Path]:
    """A ``NAME=DIR`` command-line value, or ``DIR`` alone (named after the folder)."""
    name, sep, path = value.partition("=")
    return (name, Path(path)) if sep else (Path(value).name, Path(value))


def deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``new`` wins; nested mappings are merged, not replaced (``{}`` clears)."""
    out = dict(base)
    for k, v in new.items():
        merge = isinstance(v, dict) and v and isinstance(out.get(k), dict)
        out[k] = deep_update(out[k], v) if merge else v
    return out


def read_yaml_mapping(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML preset as a mapping, with ``extends: OTHER.yaml`` resolved.

    ``extends`` names another preset (relative to this file's folder) whose keys this one
    updates as :func:`deep_update` does: a preset states only how it differs from its parent.

    Raises:
        IloraError: The file (or one it extends) is missing, not YAML, not a mapping, or the
            ``extends`` chain loops; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise IloraError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise IloraError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise IloraError(f"{path}: expected a YAML mapping at the top level")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise IloraError(f"{path}: 'extends' must name one YAML file, got {parent!r}")
    parent_path = (path.parent / parent).resolve()
    if parent_path in _seen or parent_path == path.resolve():
        raise IloraError(f"{path}: 'extends: {parent}' loops back to a file already in the chain")
    return deep_update(read_yaml_mapping(parent_path, (*_seen, path.resolve())), data)


def load_yaml(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Read a YAML preset (see :func:`read_yaml_mapping`) into dataclass ``cls``, applying ``--set`` overrides."""
    data = read_yaml_mapping(path)
    return from_dict(cls, deep_update(data, parse_overrides(overrides)), str(path))


def describe(cls: type) -> str:
    """One line per field: name, default and help (for docs and ``--help`` epilogs)."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else "(factory)"
        lines.append(f"  {f.name} = {default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)
