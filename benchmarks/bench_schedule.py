"""How long a finished run would take under two orders of its ready stages, from its own stage times.

Replays every stage of a finished experiment run (each replicate of a ``seeds`` config) on
``--workers`` slots with the run's measured stage seconds (``stage.json``), exactly as
:func:`ilora.experiment.schedule.run_jobs` dispatches them: quick stages marked ``local`` run
in the scheduling process, which starts nothing else meanwhile; the others go to the first free
slot. Two orders of the ready stages are compared:

- ``critical path first``: the scheduler's (:meth:`ilora.experiment.schedule.Schedule.ready`);
- ``replicate by replicate``: the order it replaced: an earlier replicate's stages first, then
  data < training < Grams and references < play < analyses, then the costliest.

Stage times measured on a busy machine replay as they were; the floor is the summed stage time
over the slots.

    python benchmarks/bench_schedule.py configs/seeds.yaml runs/seeds-timing
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from ilora.config import load_yaml
from ilora.experiment.config import ExperimentConfig
from ilora.experiment.pipeline import Experiment, replicate_configs
from ilora.experiment.plan import (
    AdapterSpec,
    Activations,
    EvalSpec,
    Grams,
    Interference,
    Reference,
    Selection,
    TunedMerge,
)
from ilora.experiment.schedule import Job, Schedule


def previous_tier(job: Job) -> int:
    """The tier the replaced order gave a stage (lower first)."""
    match job.spec:
        case AdapterSpec():
            return 1
        case Grams() | Reference() | TunedMerge():
            return 2
        case EvalSpec() | Selection():
            return 3
        case Activations() | Interference():
            return 4
    return 0  # data and merges


def replay(schedule: Schedule, seconds: dict[str, float], slots: int, order: Callable[[Schedule], list[Job]]) -> float:
    """Wall seconds of running ``schedule`` with the measured ``seconds`` per stage, dispatched as
    ``run_jobs`` does: one pass over the ready stages starts what it can, then waits for one."""
    now, running = 0.0, {}  # key -> finish time
    while not schedule.finished:
        started = False
        for job in order(schedule):
            if job.local:  # computed by the scheduling process: nothing else starts meanwhile
                now += seconds[job.key]
                schedule.finish(job)
            elif len(running) < slots:
                schedule.start(job)
                running[job.key] = now + seconds[job.key]
            else:
                continue
            started = True
        if not started:
            key = min(running, key=running.get)
            now = max(now, running.pop(key))
            schedule.finish(schedule.jobs[key])
    return now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the experiment config the run was made with")
    parser.add_argument("run_dir", help="the finished run's folder")
    parser.add_argument("--workers", type=int, default=2, help="slots (the config's workers)")
    args = parser.parse_args()

    config = load_yaml(ExperimentConfig, args.config, [f"run_dir={args.run_dir}"])
    jobs, seconds = [], {}
    for group, replicate in enumerate(replicate_configs(config)):
        tag = f"{replicate.run_dir}:"
        for job in Experiment(replicate).jobs():
            record = Path(replicate.run_dir) / job.key / "stage.json"
            if not record.is_file():
                raise SystemExit(f"{record}: missing (the run is not finished)")
            keyed = dataclasses.replace(job, key=tag + job.key, deps=tuple(tag + d for d in job.deps), group=group)
            jobs.append(keyed)
            seconds[keyed.key] = json.loads(record.read_text())["seconds"]

    orders = {
        "critical path first": lambda s: s.ready(),
        "replicate by replicate": lambda s: sorted(s.ready(), key=lambda j: (j.group, previous_tier(j), -j.cost)),
    }
    total = sum(seconds.values())
    print(f"{len(jobs)} stages, {total / 60:.1f} min of stage time; floor on {args.workers} workers: "
          f"{total / 60 / args.workers:.1f} min")
    for name, order in orders.items():
        print(f"{name:>24}: {replay(Schedule(jobs), seconds, args.workers, order) / 60:.1f} min")


if __name__ == "__main__":
    main()
