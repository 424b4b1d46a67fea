"""Resumable, cached stages for long experiments.

A stage is a named unit of work (``"train/routed/Pong"``) that writes into its own folder
of the run directory. When it finishes, a ``stage.json`` records the hash of what it was
computed from — its config slice and the fingerprints of the stages it used — and a fresh
fingerprint of its own. A later run skips a stage whose record matches; a stage whose
output was deleted or forced is redone, which gives it a new fingerprint, so exactly the
stages that depend on it are redone too.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ilora.config import to_dict
from ilora.fileio import atomic_dir

RECORD = "stage.json"


class StageNotCached(Exception):
    """Raised by :meth:`StageRunner.run` in check-only mode for a stage that would have to run."""


def config_hash(obj: Any) -> str:
    """A stable hash of JSON-able data; dataclasses anywhere inside count by their fields
    (not by their repr, which would drop ``repr=False`` fields and change with formatting)."""
    blob = json.dumps(to_dict(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class StageRunner:
    """Runs stages in a run folder, skipping those already done with the same inputs.

    Args:
        run_dir: the experiment's folder; each stage writes under ``run_dir / name``.
        force: stage-name prefixes to redo even when cached (``"train"`` redoes every training).
        log: where progress lines go (``print`` by default).
        compute: when False, a stage that is not cached raises :class:`StageNotCached` instead of
            running (the scheduler asks this before sending a stage to a worker process).
    """

    run_dir: Path
    force: tuple[str, ...] = ()
    log: Callable[[str], None] = print
    compute: bool = True
    ran: list[str] = field(default_factory=list)
    redone: set[str] = field(default_factory=set)  # computed in this session (here or by a worker): not forced again
    skipped: list[str] = field(default_factory=list)
    _fingerprints: dict[str, str] = field(default_factory=dict)
    _started: float = field(default_factory=time.time)

    def folder(self, name: str) -> Path:
        return self.run_dir / name

    def fingerprint(self, name: str) -> str:
        """The fingerprint of a stage finished in this run or an earlier one."""
        if name not in self._fingerprints:
            record = self.folder(name) / RECORD
            if not record.is_file():
                raise KeyError(f"stage {name!r} has not run")
            self._fingerprints[name] = json.loads(record.read_text())["fingerprint"]
        return self._fingerprints[name]

    def is_forced(self, name: str) -> bool:
        if name in self.redone:
            return False
        return any(name == f or name.startswith(f.rstrip("/") + "/") for f in self.force)

    def run(self, name: str, config: Any, fn: Callable[[Path], Any], deps: Iterable[str] = ()) -> Path:
        """Run ``fn(folder)`` unless stage ``name`` is cached for this config and these deps.

        Args:
            name: the stage's name and its folder under the run directory.
            config: the JSON-able settings the stage's output depends on.
            fn: writes the stage's artifacts into the folder it is given (a temporary one,
                renamed into place on success, so an interrupted stage leaves nothing behind);
                may return JSON-able data that is kept in the record as ``result``.
            deps: names of earlier stages whose outputs ``fn`` reads.

        Returns:
            The stage's folder.
        """
        deps = sorted(set(deps))
        inputs = config_hash({"config": config, "deps": {d: self.fingerprint(d) for d in deps}})
        out = self.folder(name)
        record = out / RECORD
        if record.is_file() and not self.is_forced(name):
            saved = json.loads(record.read_text())
            if saved.get("inputs") == inputs:
                self._fingerprints[name] = saved["fingerprint"]
                self.skipped.append(name)
                return out
        if not self.compute:
            raise StageNotCached(name)
        elapsed = time.time() - self._started
        self.log(f"[{elapsed:7.1f}s] stage {name} ...")
        t0 = time.time()
        with atomic_dir(out) as tmp:
            result = fn(tmp)
            fingerprint = uuid.uuid4().hex[:16]
            (tmp / RECORD).write_text(
                json.dumps(
                    {
                        "name": name,
                        "inputs": inputs,
                        "fingerprint": fingerprint,
                        "seconds": round(time.time() - t0, 2),
                        "deps": deps,
                        "result": result,
                    },
                    indent=1,
                    default=str,
                )
            )
        self._fingerprints[name] = fingerprint
        self.ran.append(name)
        self.redone.add(name)
        self.log(f"[{time.time() - self._started:7.1f}s] stage {name} done in {time.time() - t0:.1f}s")
        return out

    def all_stages(self) -> list[str]:
        """Stages run or found cached so far in this session, in order."""
        return list(dict.fromkeys(self.skipped + self.ran))

    def result(self, name: str) -> Any:
        """The ``result`` a finished stage returned."""
        return json.loads((self.folder(name) / RECORD).read_text())["result"]
