"""Dependency-aware ordering of the experiment's stages over a few worker processes.

Stages run as soon as what they read is finished, not phase by phase: an adapter is played
while other adapters still train, so no core waits at a phase's end for the phase's last,
longest job. Among the jobs that are ready, the one heading the costliest remaining chain
goes first (critical path first: a replicate's chain of sequential trainings starts before
other replicates' independent evaluations, instead of running alone at the end while a core
idles), then an earlier replicate's (a run over seeds finishes replicates in order where it
can), then the costliest job (longest-job-first packs the cores best).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ilora.errors import IloraError

# Rough single-core seconds on the 2-core CPU, measured on the default run (plain adapter:
# 4,000 rows in 92 s, a routed one 2.2x that: more steps, general rows with a KL forward;
# play: ~90 agent steps/s; expert collection and random/expert play: 7,500 steps in 15 s and
# 8,000 in 9 s; 3,300 general rows in 18 s). They order jobs and scale the ETA; the ETA
# itself is rescaled by the throughput seen so far.
TRAIN_ROW_SECONDS = 0.023
ROUTED_COST_FACTOR = 2.2
AGENT_STEP_SECONDS = 0.011
SCRIPTED_STEP_SECONDS = 0.0015
GENERAL_ROW_SECONDS = 0.006
# Not yet measured on the default run (estimates from the agent's step cost): a tuned-merge trial
# scores each game's validation rows under the merge and a selection rule probes every adapter.
TRIAL_ROW_SECONDS = 0.01
SELECTION_COST_FACTOR = 3.0


@dataclass(frozen=True)
class Resources:
    """What one stage holds while it runs (a Ray task's declared resources).

    Attributes:
        cpus: CPU threads.
        gpus: GPUs (fractions share one).
        memory_gb: memory reserved on the node (0: none declared).
    """

    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float = 0.0


@dataclass(frozen=True)
class Job:
    """One stage of the experiment as a unit of scheduling.

    Attributes:
        key: The stage it runs (``"train/routed/Pong"``).
        method: For callers that dispatch by method name (``rl_compare``): the method that runs it.
        args: That method's arguments.
        deps: Keys of the jobs whose stages it reads.
        cost: Estimated seconds: the critical paths that order ready jobs, and the ETA.
        local: Runs in the parent process (quick stages whose models the parent must hold: merges).
        group: Among ready jobs heading equally costly chains, lower groups start first (the
            replicates of a run over seeds).
        spec: The typed stage spec it runs (:mod:`ilora.experiment.plan`).
        resources: What it holds while it runs.
    """

    key: str
    method: str = ""
    args: tuple = ()
    deps: tuple[str, ...] = ()
    cost: float = 1.0
    local: bool = False
    group: int = 0
    spec: Any = None
    resources: Resources = Resources()


class Schedule:
    """The state of a set of jobs: which are done, running, ready.

    Args:
        jobs: Every job; each dependency must be one of them.
        done: Keys already finished (they are not run).

    Raises:
        IloraError: A key is repeated, a dependency is unknown, or the dependencies form a cycle.
    """

    def __init__(self, jobs: Iterable[Job], done: Iterable[str] = ()) -> None:
        self.jobs: dict[str, Job] = {}
        for job in jobs:
            if job.key in self.jobs:
                raise IloraError(f"job {job.key!r} is listed twice")
            self.jobs[job.key] = job
        for job in self.jobs.values():
            missing = [d for d in job.deps if d not in self.jobs]
            if missing:
                raise IloraError(f"job {job.key!r} depends on unknown jobs {missing}")
        self.done: set[str] = set(done) & set(self.jobs)
        self.running: set[str] = set()
        self.failed: set[str] = set()
        self.done_cost = 0.0
        self._check_acyclic()
        self.critical_path = critical_paths(self.jobs)

    def _check_acyclic(self) -> None:
        state: dict[str, int] = {}  # 1: on the current path, 2: finished

        def visit(key: str, path: list[str]) -> None:
            if state.get(key) == 2:
                return
            if state.get(key) == 1:
                raise IloraError(f"jobs depend on one another in a cycle: {' -> '.join(path + [key])}")
            state[key] = 1
            for dep in self.jobs[key].deps:
                visit(dep, path + [key])
            state[key] = 2

        for key in self.jobs:
            visit(key, [])

    @property
    def finished(self) -> bool:
        return len(self.done) == len(self.jobs)

    def ready(self) -> list[Job]:
        """Jobs not started whose dependencies are all done, the one to start first first."""
        jobs = [
            j for k, j in self.jobs.items()
            if k not in self.done and k not in self.running and k not in self.failed and all(d in self.done for d in j.deps)
        ]
        return sorted(jobs, key=lambda j: (-self.critical_path[j.key], j.group, -j.cost))

    def start(self, job: Job) -> None:
        self.running.add(job.key)

    def finish(self, job: Job, computed: bool = True) -> None:
        """Mark ``job`` done; one found cached (``computed=False``) counts for neither throughput nor ETA."""
        self.running.discard(job.key)
        self.done.add(job.key)
        if computed:
            self.done_cost += job.cost

    def fail(self, job: Job) -> None:
        """Mark ``job`` failed: the jobs that read it never become ready, the others go on."""
        self.running.discard(job.key)
        self.failed.add(job.key)

    def blocked(self) -> list[str]:
        """Jobs not done that cannot run: a job they read (directly or not) failed."""
        blocked: set[str] = set()
        changed = True
        while changed:
            changed = False
            for key, job in self.jobs.items():
                if key not in blocked and key not in self.done and any(d in self.failed or d in blocked for d in job.deps):
                    blocked.add(key)
                    changed = True
        return sorted(blocked)

    def remaining_cost(self) -> float:
        return sum(j.cost for k, j in self.jobs.items() if k not in self.done)

    def eta_seconds(self, elapsed: float) -> float | None:
        """Seconds left at the throughput so far (estimated cost done per second), or None before any."""
        if self.done_cost <= 0 or elapsed <= 0:
            return None
        return self.remaining_cost() * elapsed / self.done_cost


def critical_paths(jobs: dict[str, Job]) -> dict[str, float]:
    """Each job's cost plus that of the costliest chain of jobs reading it, directly or not.

    Args:
        jobs: an acyclic job graph, by key.

    Returns:
        For every key, the least estimated time from the job's start to the end of the run
        with unlimited workers (its "bottom level" in list scheduling).
    """
    readers: dict[str, list[str]] = {key: [] for key in jobs}
    for job in jobs.values():
        for dep in job.deps:
            readers[dep].append(job.key)
    paths: dict[str, float] = {}

    def path(key: str) -> float:
        if key not in paths:
            paths[key] = jobs[key].cost + max((path(r) for r in readers[key]), default=0.0)
        return paths[key]

    for key in jobs:
        path(key)
    return paths


class Executor(Protocol):
    """Where jobs that do not run in the scheduling process are computed (:mod:`ilora.experiment.ray_runner`)."""

    def submit(self, fn: Callable[..., Any], args: tuple, resources: Resources) -> Any:
        """Start ``fn(*args)``; returns a handle."""

    def wait(self, handles: list[Any]) -> list[Any]:
        """Block until at least one of ``handles`` is finished; returns the finished ones."""

    def result(self, handle: Any) -> Any:
        """The finished call's return value; raises its error."""

    def close(self) -> None:
        """Release what it started."""


class LocalExecutor:
    """Worker processes of this machine (spawned, reused): ``--executor local``, where Ray cannot
    start (its node must come up within 30 s, which a saturated CPU at low priority does not give).

    Args:
        workers: processes; declared resources are not enforced (each stage takes one).
    """

    def __init__(self, workers: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, fn: Callable[..., Any], args: tuple, resources: Resources) -> Any:
        return self.pool.submit(fn, *args)

    def wait(self, handles: list[Any]) -> list[Any]:
        from concurrent.futures import FIRST_COMPLETED, wait

        return list(wait(handles, return_when=FIRST_COMPLETED)[0])

    def result(self, handle: Any) -> Any:
        return handle.result()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class JobHost(Protocol):
    """What :func:`run_jobs` asks of the jobs' owner (the experiment)."""

    def register(self, job: Job, computed_elsewhere: bool = False) -> bool:
        """Whether ``job``'s stage is cached, its model then registered here; ``computed_elsewhere``:
        the executor just computed it (a forced stage is not forced again)."""

    def run_here(self, job: Job) -> None:
        """Compute ``job`` in this process."""

    def remote_call(self, job: Job) -> tuple[Callable[..., Any], tuple]:
        """The function and arguments that compute ``job`` elsewhere."""

    def log_path(self, job: Job) -> Path:
        """Where ``job``'s output goes."""


@dataclass
class StageFailure:
    """A stage that failed: which, why, and where its output is."""

    stage: str
    error: str
    log: Path


@dataclass
class RunOutcome:
    """What :func:`run_jobs` did: the stages computed, found cached, failed and left unrun."""

    computed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    failed: list[StageFailure] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)


def run_jobs(
    schedule: Schedule, host: JobHost, executor: Callable[[], Executor], slots: int,
    log: Callable[[str], None], label: Callable[[Job], str] = lambda job: job.key,
) -> RunOutcome:
    """Run every job of ``schedule``: cached ones are only registered, local ones (and all of them
    with one slot) computed here, the others by the executor, at most ``slots`` at a time.

    A job that fails is reported (one line naming its log) and the jobs that do not read it go on;
    the jobs that read it are left unrun. One line per finished stage shows the progress.

    Args:
        schedule: the jobs, none running.
        host: registers, computes and names the jobs.
        executor: makes the executor the first time a job must be computed elsewhere (a run that
            is all cached starts nothing).
        slots: jobs computed side by side.
        log: where the progress lines go.
        label: how a progress line names a job.

    Returns:
        What was computed, found cached, failed and left unrun.
    """
    outcome, running, pool, start = RunOutcome(), {}, None, time.time()

    def finished(job: Job) -> None:
        schedule.finish(job)
        outcome.computed.append(job.key)
        elapsed = time.time() - start
        eta = schedule.eta_seconds(elapsed)
        left = f", about {eta / 60:.0f} min left" if eta is not None else ""
        log(f"[{elapsed / 60:5.1f} min] {label(job)} done; {len(schedule.done)}/{len(schedule.jobs)} stages done{left}")

    def failed(job: Job, err: BaseException) -> None:
        schedule.fail(job)
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        outcome.failed.append(StageFailure(job.key, reason, host.log_path(job)))
        log(f"[{(time.time() - start) / 60:5.1f} min] {label(job)} FAILED: {reason} (log: {host.log_path(job)})")

    while True:
        started = False
        for job in schedule.ready():
            if host.register(job):
                schedule.finish(job, computed=False)
                outcome.cached.append(job.key)
            elif job.local or slots <= 1:
                try:
                    host.run_here(job)
                except Exception as err:  # reported; the jobs that do not read it go on
                    failed(job, err)
                else:
                    finished(job)
            elif len(running) < slots:
                pool = pool or executor()
                schedule.start(job)
                fn, args = host.remote_call(job)
                running[pool.submit(fn, args, job.resources)] = job
            else:
                continue
            started = True
        if not running:
            if started:
                continue
            break
        for handle in pool.wait(list(running)):
            job = running.pop(handle)
            try:
                pool.result(handle)
                if not host.register(job, computed_elsewhere=True):
                    raise IloraError("it finished elsewhere but its record does not match")
            except Exception as err:
                failed(job, err)
            else:
                finished(job)
    outcome.blocked = schedule.blocked()
    return outcome
