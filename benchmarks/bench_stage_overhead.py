"""What the experiment's scheduler costs per stage: Ray tasks vs the process pool it replaced.

Both executors run the same jobs through :func:`ilora.experiment.schedule.run_jobs`, each job a
cached-stage write (``StageRunner.run``) that does no work, so all the time is the executor's:

- ``start``: from nothing to the first stage done (Ray's worker start-up, or the pool's spawned
  workers; both import ``ilora.experiment.pipeline``, as a real stage does);
- ``per stage``: the wall time per stage of ``--stages`` independent stages over ``--workers``
  slots, times the slots (a slot's time per stage);
- ``chain``: the wall time per stage of a chain of ``--chain`` stages, each reading the one
  before (the latency a stage adds on the critical path).

    python benchmarks/bench_stage_overhead.py              # 2 workers, 40 stages, a chain of 10
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ilora.experiment.ray_runner import RayExecutor
from ilora.experiment.schedule import Job, LocalExecutor, Schedule, run_jobs
from ilora.experiment.stages import RECORD, StageRunner


def empty_stage(run_dir: str, name: str, deps: tuple[str, ...]) -> None:
    """A stage that reads its deps' records and writes nothing but its own."""
    import ilora.experiment.pipeline  # noqa: F401  (what a real stage's worker imports)

    StageRunner(Path(run_dir), log=lambda _: None).run(name, {}, lambda folder: None, deps)


class Host:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def register(self, job: Job, computed_elsewhere: bool = False) -> bool:
        return (self.run_dir / job.key / RECORD).is_file()

    def run_here(self, job: Job) -> None:
        raise AssertionError("every job runs on the executor")

    def remote_call(self, job: Job):
        return empty_stage, (str(self.run_dir), job.key, job.deps)

    def log_path(self, job: Job) -> Path:
        return self.run_dir / "logs" / job.key


def timed_run(executor, jobs: list[Job], workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        outcome = run_jobs(Schedule(jobs), Host(Path(tmp)), lambda: executor, workers, log=lambda _: None)
        assert not outcome.failed, outcome.failed
        return time.perf_counter() - t0


def measure(executor, args) -> dict[str, float]:
    start = timed_run(executor, [Job("first")], args.workers)
    flat = timed_run(executor, [Job(f"s{i}") for i in range(args.stages)], args.workers)
    chain = [Job("c0")] + [Job(f"c{i}", deps=(f"c{i - 1}",)) for i in range(1, args.chain)]
    chained = timed_run(executor, chain, args.workers)
    return {"start": start, "per stage": flat * args.workers / args.stages, "chain": chained / args.chain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stages", type=int, default=40)
    parser.add_argument("--chain", type=int, default=10)
    args = parser.parse_args()
    t0 = time.perf_counter()
    ray = RayExecutor(num_cpus=args.workers)
    init = time.perf_counter() - t0
    rows = {"process pool": measure(LocalExecutor(args.workers), args), "ray": measure(ray, args)}
    print(f"ray.init: {init:.2f} s (once per run, before the first stage that is not cached)")
    print(f"{'executor':<14}{'start (s)':>12}{'per stage (ms)':>16}{'chain (ms/stage)':>18}")
    for name, row in rows.items():
        print(f"{name:<14}{row['start']:>12.2f}{row['per stage'] * 1e3:>16.1f}{row['chain'] * 1e3:>18.1f}")


if __name__ == "__main__":
    main()
