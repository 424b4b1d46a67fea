"""The skill library's folder, its atomic changes, its lock and its operation log.

A library is a folder::

    DIR/library.json          the current state (the commit point): base model, merge settings,
                              the skills in the order they were added, the merged state's folder
    DIR/oplog.jsonl           one JSON line per operation: what it read (paths and sha256),
                              how the merged state was made (folded, subtracted, rebuilt)
    DIR/skills/NAME/adapter/  the skill's PEFT LoRA adapter (a copy), with grams.safetensors when
                              added with Grams and the adapter's trained_on.json / routing_config.json
    DIR/skills/NAME/heldout/  the skill's held-out rows (a copy; ``datasets.load_from_disk``)
    DIR/merged/op-NNNNNN/     the merged state of every skill (an ``ilora merge`` output folder,
                              named after the operation that wrote it)
    DIR/.lock                 held (``fcntl.flock``) while a command changes or composes the library

A change writes every new piece into a new folder (``fileio.atomic_dir``: a temporary folder
renamed into place), then replaces ``library.json`` in one rename. A change that fails or is
interrupted before that rename removes what it wrote, so the folder is as it was; one killed
outright leaves folders that no ``library.json`` names, which the next change deletes (and the
log line of a change killed after its rename, which the next change writes from
``library.json``'s ``last_op``). Readers (``SkillLibrary``) read ``library.json`` only.

The merged state is always what ``build`` makes from the skills in order: with an iterative
method (one that takes a merged state as an input), the first two skills merged together and
each later one folded into the result, as ``ilora experiment``'s iterative merges do; otherwise
one merge of every skill. ``add`` folds the new skill in where that is the next step of the
build, and ``remove`` subtracts the skill where the method is linear in its inputs; anything
else rebuilds.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ilora.config import field, from_dict, to_dict
from ilora.errors import IloraError
from ilora.fileio import (
    atomic_dir,
    atomic_write_text,
    file_sha256,
    folder_sha256,
    to_json,
)
from ilora.models.adapter import ADAPTER_WEIGHTS

LIBRARY_FILE = "library.json"
OPLOG_FILE = "oplog.jsonl"
LOCK_FILE = ".lock"
SKILLS_DIR = "skills"
MERGED_DIR = "merged"
LIBRARY_FORMAT = "ilora-skill-library"
LIBRARY_VERSION = 1
SKILL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Files an adapter folder may carry about its training, kept with the skill's adapter.
ADAPTER_NOTES = ("trained_on.json", "routing_config.json")
# Methods whose ΔW is Σ_i w_i ΔW_i: removing a skill is the same merge with its weight -1.
# (``sum`` is linear too, but subtracting would keep the removed factors beside their negation
# and raise the stored rank; rebuilding its factored sum is exact and as cheap.)
SUBTRACTABLE = ("task_arithmetic",)


@dataclass
class MergeSettings:
    """How the library merges its skills into one weight delta."""

    method: str = field("ilora", help="merge method (`ilora merge --list-methods`)")
    options: dict[str, Any] = field(default_factory=dict, help="the method's options, e.g. {keep: 0.8}")
    iterative: bool = field(
        True, help="fold each new skill into the merged state (methods that take one); false: one merge of every skill"
    )


@dataclass(frozen=True)
class Skill:
    """One skill of a library; ``SkillLibrary.skills()`` gives the paths resolved (absolute)."""

    name: str = field(help="the skill's name (letters, digits, '_', '-', '.')")
    adapter: Path = field(help="its PEFT LoRA adapter folder")
    adapter_sha256: str = field(help="sha256 of the adapter's adapter_model.safetensors")
    added: str = field(help="when it was added (UTC, ISO 8601)")
    data: dict[str, Any] = field(
        default_factory=dict,
        help="data settings: heldout_source, heldout_rows, heldout_sha256; trained_on (the adapter's trained_on.json)",
    )
    heldout: Path | None = field(None, help="its held-out rows (datasets.load_from_disk folder), if given")
    grams: Path | None = field(None, help="the adapter's input Grams (grams.safetensors), if added with them")
    scores: dict[str, Any] | None = field(None, help="its single-task scores (e.g. the summary of `ilora play --json`)")


@dataclass
class LibraryState:
    """``library.json``: the library as of its last operation (skill paths relative to the folder)."""

    base: str = field(help="the base model every skill is an adapter of ('builtin', a folder or a cached hub id)")
    merge: MergeSettings = field(default_factory=MergeSettings, help="how the merged state is made")
    skills: list[Skill] = field(default_factory=list, help="the skills, in the order they were added")
    merged: str | None = field(None, help="the merged state's folder, relative (none while the library is empty)")
    ops: int = field(0, help="operations so far (the last one's seq)")
    last_op: dict[str, Any] | None = field(None, help="the log entry of the operation that wrote this state")
    format: str = field(LIBRARY_FORMAT, help="file format")
    version: int = field(LIBRARY_VERSION, help="format version")


def merge_settings(method: str, options: dict[str, Any] | None = None, iterative: bool | None = None) -> MergeSettings:
    """Checked merge settings for a library.

    Args:
        method: a registered merge method.
        options: its options (``weights`` excluded: a library merges every skill at weight 1;
            ``ilora library compose`` fits weights).
        iterative: fold new skills into the merged state; ``None``: wherever the method takes a
            merged state as an input.

    Returns:
        The settings.

    Raises:
        IloraError: unknown method or option, a value of the wrong type, ``weights``, or
            ``iterative`` for a method that takes adapters only.
    """
    from ilora.merge.registry import get_method, method_class

    options = dict(options or {})
    if "weights" in options:
        raise IloraError("--option weights: a library merges every skill at weight 1 (compose fits weights)")
    get_method(method, **options)
    accepts_merged = method_class(method).accepts_merged
    if iterative and not accepts_merged:
        raise IloraError(f"--iterative: --method {method} takes LoRA adapters only, so it cannot fold skills in")
    return MergeSettings(method, options, accepts_merged if iterative is None else iterative)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _described(path: Path) -> dict[str, str]:
    """An operation's input as the log records it: its absolute path and content hash."""
    sha = folder_sha256(path) if path.is_dir() else file_sha256(path)
    return {"path": str(path.resolve()), "sha256": sha}


def read_state(root: Path) -> LibraryState:
    """``root/library.json``, checked (format, version, keys and types, the files it names).

    Raises:
        IloraError: naming the folder or file and the problem.
    """
    from ilora.models.adapter import read_json_object

    path = root / LIBRARY_FILE
    if not root.is_dir():
        raise IloraError(f"{root}: no such library folder (make one with `ilora library init {root} --base MODEL`)")
    if not path.is_file():
        raise IloraError(f"{root}: no {LIBRARY_FILE}, not a skill library (make one with `ilora library init`)")
    data = read_json_object(path)
    if data.get("format") != LIBRARY_FORMAT:
        raise IloraError(f"{path}: format {data.get('format')!r} is not {LIBRARY_FORMAT!r}")
    if data.get("version") != LIBRARY_VERSION:
        raise IloraError(f"{path}: version {data.get('version')!r}; this ilora reads version {LIBRARY_VERSION}")
    state = from_dict(LibraryState, data, str(path))
    names = [s.name for s in state.skills]
    for i, skill in enumerate(state.skills):
        if names.index(skill.name) != i:
            raise IloraError(f"{path}: skill {skill.name!r} is listed twice")
        if not (root / skill.adapter).is_dir():
            raise IloraError(f"{path}: skills[{i}] ({skill.name}): adapter folder {root / skill.adapter} is missing")
    if (state.merged is None) != (not state.skills):
        raise IloraError(f"{path}: merged is {state.merged!r} with {len(state.skills)} skill(s)")
    if state.merged is not None and not (root / state.merged).is_dir():
        raise IloraError(f"{path}: merged state folder {root / state.merged} is missing")
    return state


def init_library(folder: str | os.PathLike, base: str, settings: MergeSettings | None = None) -> SkillLibrary:
    """Make an empty library folder.

    Args:
        folder: the new library folder (must not exist).
        base: the base model of its skills: ``builtin``, a model folder or a cached hub id.
        settings: how skills are merged (default: I-LoRA, iterative; see ``merge_settings``).

    Returns:
        The library.
    """
    from ilora.models.load import BUILTIN_BASE, model_weight_shapes, resolve_model_path

    root = Path(folder)
    if root.exists():
        raise IloraError(f"{root}: already exists; init makes a new library folder")
    model_weight_shapes(resolve_model_path(base))  # a base whose config cannot be read is refused now
    recorded = base if base == BUILTIN_BASE or not Path(base).exists() else str(Path(base).resolve())
    settings = settings or merge_settings("ilora")
    entry = {"seq": 1, "op": "init", "time": _now(), "base": recorded, "merge": to_dict(settings)}
    with atomic_dir(root, overwrite=False) as tmp:
        for sub in (SKILLS_DIR, MERGED_DIR):
            (tmp / sub).mkdir()
        (tmp / LOCK_FILE).touch()
        state = LibraryState(base=recorded, merge=settings, ops=1, last_op=entry)
        (tmp / LIBRARY_FILE).write_text(to_json(to_dict(state)) + "\n")
        (tmp / OPLOG_FILE).write_text(json.dumps(entry) + "\n")
    return SkillLibrary(root)


class SkillLibrary:
    """A skill library folder (see the module docstring for its layout).

    Reading (``skills``, ``merged_state``, ``operations``) needs no lock; ``add``, ``remove``
    and ``build`` take the library's lock and refuse to run beside another change.

    Args:
        folder: the library folder.

    Raises:
        IloraError: not a library, or its ``library.json`` is bad (naming the key).
    """

    def __init__(self, folder: str | os.PathLike):
        self.root = Path(folder)
        self.state = read_state(self.root)

    # ------------------------------------------------------------------ reading
    @property
    def base(self) -> str:
        """The base model as recorded (``builtin``, an absolute folder or a hub id)."""
        return self.state.base

    @property
    def settings(self) -> MergeSettings:
        return self.state.merge

    def skills(self) -> list[Skill]:
        """The skills in the order they were added, with absolute paths."""
        return [self._resolved(s) for s in self.state.skills]

    def skill(self, name: str) -> Skill:
        """The skill called ``name``."""
        for skill in self.skills():
            if skill.name == name:
                return skill
        known = ", ".join(s.name for s in self.state.skills) or "none"
        raise IloraError(f"{self.root}: no skill named {name!r} (skills: {known})")

    def merged_state(self) -> Path | None:
        """The merged state's folder (``ilora.merge.load_merged_state`` reads it); ``None`` when empty.

        The next change replaces it (a new folder) and deletes this one: read it under ``reading()``.
        """
        return None if self.state.merged is None else self.root / self.state.merged

    def operations(self) -> list[dict[str, Any]]:
        """Every operation's log entry, oldest first (with the last one even if its log line was lost)."""
        lines = (self.root / OPLOG_FILE).read_text().splitlines() if (self.root / OPLOG_FILE).is_file() else []
        entries = []
        for number, line in enumerate(lines, 1):
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise IloraError(f"{self.root / OPLOG_FILE}: line {number} is not JSON ({err})") from err
        last = self.state.last_op
        if last is not None and (not entries or entries[-1].get("seq", 0) < last["seq"]):
            entries.append(last)
        return entries

    def _resolved(self, skill: Skill) -> Skill:
        return replace(
            skill,
            adapter=self.root / skill.adapter,
            heldout=None if skill.heldout is None else self.root / skill.heldout,
            grams=None if skill.grams is None else self.root / skill.grams,
        )

    def reading(self) -> contextlib.AbstractContextManager[None]:
        """Hold the library's lock shared while a long read (compose) needs its files: changes are refused meanwhile."""
        return self._locked(shared=True)

    # ------------------------------------------------------------------ changing
    def add(
        self,
        name: str,
        adapter: str | os.PathLike,
        heldout: str | os.PathLike | None = None,
        grams: bool = False,
        scores: str | os.PathLike | None = None,
    ) -> dict[str, Any]:
        """Add a skill and fold it into the merged state (or rebuild it, where that is the method's way).

        Args:
            name: the new skill's name.
            adapter: its PEFT LoRA adapter folder (copied into the library).
            heldout: a ``datasets.save_to_disk`` folder of its held-out rows (copied).
            grams: also keep the adapter's ``grams.safetensors`` (``ilora grams``; data-aware merges need it).
            scores: a JSON file of its single-task scores (an ``ilora play --json`` result keeps its summary).

        Returns:
            The operation's log entry (``how``: ``folded`` or ``rebuilt``, and ``why``).
        """
        from ilora.merge.io import LoraAdapter

        started = time.monotonic()
        with self._locked():
            self._refresh()
            adapter = Path(adapter)
            inputs = self._check_new_skill(name, adapter, heldout, grams, scores)
            settings = self.settings
            folded = settings.iterative and len(self.state.skills) >= 2
            with self._undo_on_failure() as created:
                skill_dir = self.root / SKILLS_DIR / name
                created.append(skill_dir)
                skill = self._write_skill(skill_dir, name, adapter, heldout, grams, scores, inputs)
                skills = [*self.state.skills, skill]
                out = self._merged_folder()
                created.append(self.root / out)
                if folded:
                    merge_inputs = [self.merged_state(), LoraAdapter(self.root / skill.adapter)]
                    self._merge(merge_inputs, settings, self.root / out, progress=True)
                    how, why = "folded", f"{settings.method} folds a new skill into the merged state"
                else:
                    self._build(skills, settings, self.root / out)
                    how, why = "rebuilt", self._why_rebuilt(settings, len(skills))
                entry = self._entry("add", started, how, why, settings, out, skills, skill=name, inputs=inputs)
                self._commit(replace(self.state, skills=skills, merged=out), entry)
            self._after_commit(entry)
        return entry

    def remove(self, name: str) -> dict[str, Any]:
        """Take a skill out: subtract it where the method is linear in its inputs, else rebuild.

        Args:
            name: the skill.

        Returns:
            The operation's log entry (``how``: ``subtracted``, ``rebuilt`` or ``emptied``, and ``why``).
        """
        from ilora.merge.io import LoraAdapter

        started = time.monotonic()
        with self._locked():
            self._refresh()
            removed = self.skill(name)
            skills = [s for s in self.state.skills if s.name != name]
            settings = self.settings
            inputs = {"adapter": _described(removed.adapter / ADAPTER_WEIGHTS)}
            with self._undo_on_failure() as created:
                out = None
                if not skills:
                    how, why = "emptied", "no skill is left"
                else:
                    out = self._merged_folder()
                    created.append(self.root / out)
                    if settings.method in SUBTRACTABLE:
                        inputs["merged"] = _described(self.merged_state() / "merge_record.json")
                        subtract = [self.merged_state(), LoraAdapter(removed.adapter)]
                        self._merge(subtract, settings, self.root / out, weights=[1.0, -1.0], progress=True)
                        how, why = "subtracted", f"{settings.method} is linear in its inputs: state - skill"
                    else:
                        self._build(skills, settings, self.root / out)
                        how, why = "rebuilt", self._why_removal_rebuilt(settings)
                entry = self._entry("remove", started, how, why, settings, out, skills, skill=name, inputs=inputs)
                self._commit(replace(self.state, skills=skills, merged=out), entry)
            self._after_commit(entry, removed_skill=self.root / SKILLS_DIR / name)
        return entry

    def build(self, settings: MergeSettings | None = None) -> dict[str, Any]:
        """Rebuild the merged state from every skill.

        Args:
            settings: new merge settings (kept for later changes; see ``merge_settings``);
                ``None``: the current ones.

        Returns:
            The operation's log entry.
        """
        started = time.monotonic()
        with self._locked():
            self._refresh()
            settings = settings or self.settings
            self._check_settings(settings, self.state.skills)
            skills = self.state.skills
            with self._undo_on_failure() as created:
                out = None
                if skills:
                    out = self._merged_folder()
                    created.append(self.root / out)
                    self._build(skills, settings, self.root / out)
                why = "merge settings set; no skill yet" if not skills else self._why_rebuilt(settings, len(skills))
                entry = self._entry("build", started, "rebuilt" if skills else "emptied", why, settings, out, skills)
                self._commit(replace(self.state, merge=settings, merged=out), entry)
            self._after_commit(entry)
        return entry

    # ------------------------------------------------------------------ locking, committing
    @contextlib.contextmanager
    def _locked(self, shared: bool = False) -> Iterator[None]:
        """Hold the library's lock (``flock``: released by the kernel even if the process is killed).

        Args:
            shared: a read that must not overlap a change (compose); changes take it exclusively.
        """
        path = self.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise IloraError(
                    f"{self.root}: another `ilora library` command is using this library (lock {path}); "
                    "run one change at a time"
                ) from None
            yield
        finally:
            os.close(fd)

    def _refresh(self) -> None:
        """Under the lock: reread the state (another change may have committed since), delete what
        a killed change left and write its missing log line."""
        self.state = read_state(self.root)
        keep = {s.name for s in self.state.skills}
        current = None if self.state.merged is None else Path(self.state.merged).name
        leftovers = [p for p in (self.root / SKILLS_DIR).iterdir() if p.name not in keep]
        leftovers += [p for p in (self.root / MERGED_DIR).iterdir() if p.name != current]
        leftovers += [p for p in [self.root / f".{LIBRARY_FILE}.tmp"] if p.exists()]  # atomic_write_text's
        for path in leftovers:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        logged = self.operations()
        if logged and self.state.last_op is not None and logged[-1] is self.state.last_op:
            self._append_log(self.state.last_op)

    @contextlib.contextmanager
    def _undo_on_failure(self) -> Iterator[list[Path]]:
        """Yield a list of the paths a change creates; if the change fails before its commit, they are deleted."""
        created: list[Path] = []
        seq = self.state.ops + 1
        try:
            yield created
        except BaseException:
            # Interrupted just after library.json was replaced, the change has happened: keep its folders.
            committed = json.loads((self.root / LIBRARY_FILE).read_text()).get("ops") == seq
            for path in [] if committed else created:
                shutil.rmtree(path, ignore_errors=True)
            raise

    def _commit(self, state: LibraryState, entry: dict[str, Any]) -> None:
        """Replace ``library.json`` (one rename): the change has happened."""
        state = replace(state, ops=entry["seq"], last_op=entry)
        atomic_write_text(self.root / LIBRARY_FILE, to_json(to_dict(state)) + "\n")
        self.previous, self.state = self.state, state

    def _after_commit(self, entry: dict[str, Any], removed_skill: Path | None = None) -> None:
        self._append_log(entry)
        if self.previous.merged is not None and self.previous.merged != self.state.merged:
            shutil.rmtree(self.root / self.previous.merged)
        if removed_skill is not None:
            shutil.rmtree(removed_skill)

    def _append_log(self, entry: dict[str, Any]) -> None:
        with open(self.root / OPLOG_FILE, "a") as fh:
            fh.write(json.dumps(entry) + "\n")

    def _merged_folder(self) -> str:
        return f"{MERGED_DIR}/op-{self.state.ops + 1:06d}"

    def _entry(
        self,
        op: str,
        started: float,
        how: str,
        why: str,
        settings: MergeSettings,
        merged: str | None,
        skills: list[Skill],
        **details: Any,
    ) -> dict[str, Any]:
        record = None if merged is None else _described(self.root / merged / "merge_record.json")
        return {
            "seq": self.state.ops + 1,
            "op": op,
            "time": _now(),
            **details,
            "how": how,
            "why": why,
            "merge": to_dict(settings),
            "merged": merged,
            "merged_record_sha256": None if record is None else record["sha256"],
            "skills": [s.name for s in skills],
            "seconds": round(time.monotonic() - started, 3),
        }

    # ------------------------------------------------------------------ checking inputs
    def _check_new_skill(
        self,
        name: str,
        adapter: Path,
        heldout: str | os.PathLike | None,
        grams: bool,
        scores: str | os.PathLike | None,
    ) -> dict[str, dict[str, str]]:
        """Refuse a bad name, adapter, held-out folder, Grams or scores file before anything is written.

        Returns:
            The inputs as the log records them (path and sha256 each).
        """
        from ilora.merge.engine import check_compatible
        from ilora.merge.grams import load_grams
        from ilora.merge.io import LoraAdapter
        from ilora.merge.registry import method_class
        from ilora.models.adapter import (
            ADAPTER_CONFIG,
            check_lora_adapter,
            check_modules_fit,
            read_json_object,
        )
        from ilora.models.load import model_weight_shapes, resolve_model_path

        if not SKILL_NAME.fullmatch(name):
            raise IloraError(
                f"skill name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
            )
        if any(s.name == name for s in self.state.skills):
            raise IloraError(f"{self.root}: already has a skill named {name!r} (remove it first to replace it)")
        if not adapter.is_dir():
            raise IloraError(f"{adapter}: no such adapter folder")
        modules = check_lora_adapter(adapter)
        check_modules_fit(modules, model_weight_shapes(resolve_model_path(self.base)), adapter, self.base)
        new = LoraAdapter(adapter)
        inputs = {"adapter": _described(new.weights_file), "adapter_config": _described(adapter / ADAPTER_CONFIG)}
        for skill in self.skills():
            if skill.adapter_sha256 == inputs["adapter"]["sha256"]:
                raise IloraError(f"{new.weights_file}: the same weights as skill {skill.name!r}; a skill is added once")
        check_compatible([LoraAdapter(s.adapter) for s in self.skills()] + [new])
        if grams:
            inputs["grams"] = _described(load_grams(adapter).path)
        elif method_class(self.settings.method).needs_grams:
            raise IloraError(
                f"{adapter}: the library merges with {self.settings.method}, which needs the adapter's Grams; "
                f"measure them (`ilora grams {adapter} --data ...`) and add it with --grams"
            )
        if heldout is not None:
            from ilora.routing.cli import saved_rows

            saved_rows("--data", str(heldout), sys.maxsize)
            inputs["heldout"] = _described(Path(heldout))
        if scores is not None:
            read_json_object(Path(scores))
            inputs["scores"] = _described(Path(scores))
        return inputs

    def _check_settings(self, settings: MergeSettings, skills: list[Skill]) -> None:
        """Refuse settings ``merge_settings`` would refuse, or that the skills cannot be merged with
        (a data-aware method and a skill without Grams)."""
        from ilora.merge.registry import method_class

        merge_settings(settings.method, settings.options, settings.iterative)
        if method_class(settings.method).needs_grams:
            for skill in skills:
                if skill.grams is None:
                    raise IloraError(
                        f"--method {settings.method}: skill {skill.name!r} has no Grams "
                        "(remove it, add it again with --grams)"
                    )

    # ------------------------------------------------------------------ writing skills, merging
    def _write_skill(
        self,
        skill_dir: Path,
        name: str,
        adapter: Path,
        heldout: str | os.PathLike | None,
        grams: bool,
        scores: str | os.PathLike | None,
        inputs: dict[str, dict[str, str]],
    ) -> Skill:
        """Copy the skill's files into ``skill_dir`` (atomically) and return its record (relative paths)."""
        from datasets import load_from_disk

        from ilora.merge.grams import GRAMS_FILE
        from ilora.models.adapter import ADAPTER_CONFIG, read_json_object

        relative = skill_dir.relative_to(self.root)
        data: dict[str, Any] = {}
        with atomic_dir(skill_dir, overwrite=False) as tmp:
            (tmp / "adapter").mkdir()
            names = [ADAPTER_CONFIG, ADAPTER_WEIGHTS] + ([GRAMS_FILE] if grams else [])
            names += [n for n in ADAPTER_NOTES if (adapter / n).is_file()]
            for file in names:
                shutil.copyfile(adapter / file, tmp / "adapter" / file)
            sha = file_sha256(tmp / "adapter" / ADAPTER_WEIGHTS)
            if sha != inputs["adapter"]["sha256"]:
                raise IloraError(f"{adapter / ADAPTER_WEIGHTS}: changed while it was being added; add it again")
            if (adapter / "trained_on.json").is_file():
                data["trained_on"] = read_json_object(adapter / "trained_on.json")
            if heldout is not None:
                shutil.copytree(heldout, tmp / "heldout")
                data.update(
                    heldout_source=inputs["heldout"]["path"],
                    heldout_rows=len(load_from_disk(str(tmp / "heldout"))),
                    heldout_sha256=folder_sha256(tmp / "heldout"),
                )
        score_record = None
        if scores is not None:
            loaded = read_json_object(Path(scores))
            score_record = loaded["summary"] if isinstance(loaded.get("summary"), dict) else loaded
        return Skill(
            name=name,
            adapter=relative / "adapter",
            adapter_sha256=sha,
            added=_now(),
            data=data,
            heldout=None if heldout is None else relative / "heldout",
            grams=relative / "adapter" / GRAMS_FILE if grams else None,
            scores=score_record,
        )

    def _merge(
        self,
        inputs: list,
        settings: MergeSettings,
        out: Path | None,
        weights: list[float] | None = None,
        progress: bool = False,
    ):
        """``merge_adapters`` with the library's settings (and base, for methods that need it).

        Args:
            inputs: adapters and/or one merged state (folders or open), in order.
            settings: the merge settings.
            out: the folder to write; ``None`` keeps the result in memory (a step of a build).
            weights: per-input weights (a subtraction); ``None``: the method's default.
            progress: a progress bar over modules.

        Returns:
            The ``MergedState``.
        """
        from ilora.merge.engine import merge_adapters
        from ilora.merge.registry import method_class
        from ilora.models.load import resolve_model_path

        options = dict(settings.options) if weights is None else {**settings.options, "weights": weights}
        base = resolve_model_path(self.base) if method_class(settings.method).needs_base else None
        return merge_adapters(inputs, settings.method, base=base, out=out, progress=progress, **options)

    def _build(self, skills: list[Skill], settings: MergeSettings, out: Path) -> None:
        """The merged state of ``skills`` as ``build`` defines it (see the module docstring), written to ``out``."""
        from tqdm.auto import tqdm

        from ilora.merge.io import LoraAdapter

        adapters = [LoraAdapter(self.root / s.adapter) for s in skills]
        if not settings.iterative or len(adapters) <= 2:
            self._merge(adapters, settings, out, progress=True)
            return
        state = self._merge(adapters[:2], settings, None)
        for adapter in tqdm(adapters[2:], desc=f"fold skills ({settings.method})", unit="skill"):
            last = adapter is adapters[-1]
            state = self._merge([state, adapter], settings, out if last else None)

    @staticmethod
    def _why_rebuilt(settings: MergeSettings, n_skills: int) -> str:
        if not settings.iterative:
            return f"{settings.method} merges every skill at once"
        if n_skills == 1:
            return "the first skill, merged alone"
        if n_skills == 2:
            return "an iterative build merges its first two skills together"
        return "rebuilt by folding every skill in, in order"

    @staticmethod
    def _why_removal_rebuilt(settings: MergeSettings) -> str:
        if settings.method == "sum":
            return "sum rebuilt from the remaining skills: exact, and keeps the stored rank theirs"
        return f"{settings.method} is not linear in its inputs: rebuilt from the remaining skills"

