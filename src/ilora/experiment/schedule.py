"""Dependency-aware ordering of the experiment's stages over a few worker processes.

Stages run as soon as what they read is finished, not phase by phase: an adapter is played
while other adapters still train, so no core waits at a phase's end for the phase's last,
longest job (on 2 cores that idled one core for minutes per phase). Among the jobs that are
ready, lower tiers go first (data before training before evaluation: earlier tiers unlock
more work) and, within a tier, the costliest (longest-job-first packs the cores best). Replicates
of a run over seeds are groups: an earlier replicate's ready jobs go before a later one's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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
class Job:
    """One stage of the experiment as a unit of scheduling.

    Attributes:
        key: The stage it runs (``"train/routed/Pong"``).
        method: The :class:`~ilora.experiment.pipeline.Experiment` method that runs it.
        args: That method's arguments.
        deps: Keys of the jobs whose stages it reads.
        tier: Among ready jobs, lower tiers start first.
        cost: Estimated seconds: longest first within a tier, and the ETA.
        local: Runs in the parent process (quick stages whose models the parent must hold: merges).
        group: Among ready jobs, lower groups start first, before tiers: the replicates of a run
            over seeds finish one after another, so an interrupted run has whole replicates.
    """

    key: str
    method: str
    args: tuple = ()
    deps: tuple[str, ...] = ()
    tier: int = 0
    cost: float = 1.0
    local: bool = False
    group: int = 0


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
        self.done_cost = 0.0
        self._check_acyclic()

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
            if k not in self.done and k not in self.running and all(d in self.done for d in j.deps)
        ]
        return sorted(jobs, key=lambda j: (j.group, j.tier, -j.cost))

    def start(self, job: Job) -> None:
        self.running.add(job.key)

    def finish(self, job: Job, computed: bool = True) -> None:
        """Mark ``job`` done; one found cached (``computed=False``) counts for neither throughput nor ETA."""
        self.running.discard(job.key)
        self.done.add(job.key)
        if computed:
            self.done_cost += job.cost

    def remaining_cost(self) -> float:
        return sum(j.cost for k, j in self.jobs.items() if k not in self.done)

    def eta_seconds(self, elapsed: float) -> float | None:
        """Seconds left at the throughput so far (estimated cost done per second), or None before any."""
        if self.done_cost <= 0 or elapsed <= 0:
            return None
        return self.remaining_cost() * elapsed / self.done_cost
