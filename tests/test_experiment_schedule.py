"""The stage scheduler: dependency order, which ready job starts first, refusals, ETA."""

from __future__ import annotations

from pathlib import Path

import pytest

from ilora.errors import IloraError
from ilora.experiment.schedule import Job, Schedule, critical_paths, run_jobs


def jobs() -> list[Job]:
    return [
        Job("data/a", "collect", cost=5),
        Job("data/b", "collect", cost=9),
        Job("train/short", "train", deps=("data/a",), cost=10),
        Job("train/long", "train", deps=("data/a", "data/b"), cost=50),
        Job("merge", "merge", deps=("train/short", "train/long"), local=True),
        Job("eval/short", "evaluate", deps=("train/short",), cost=20),
        Job("eval/merge", "evaluate", deps=("merge",), cost=30),
    ]


def keys(schedule: Schedule) -> list[str]:
    return [j.key for j in schedule.ready()]


def test_critical_path_is_a_jobs_cost_plus_its_costliest_chain_of_readers():
    assert critical_paths(Schedule(jobs()).jobs) == {
        "eval/merge": 30, "merge": 31, "eval/short": 20, "train/long": 81, "train/short": 41,
        "data/a": 86, "data/b": 90,
    }


def test_ready_jobs_follow_dependencies_and_critical_paths():
    s = Schedule(jobs())
    assert keys(s) == ["data/b", "data/a"]  # the longer chain first
    for key in ("data/a", "data/b"):
        s.finish(s.jobs[key])
    assert keys(s) == ["train/long", "train/short"]
    s.start(s.jobs["train/long"])
    assert keys(s) == ["train/short"]  # a running job is not ready again
    s.finish(s.jobs["train/short"])
    assert keys(s) == ["eval/short"]  # the merge waits for the long training
    s.finish(s.jobs["train/long"])
    assert keys(s) == ["merge", "eval/short"]  # a cheap merge heads a longer chain than the costlier eval
    for key in ("merge", "eval/short", "eval/merge"):
        s.finish(s.jobs[key])
    assert s.finished and keys(s) == []


def test_a_chain_of_trainings_starts_before_a_costlier_job_that_ends_its_chain_and_replicates_go_in_order():
    def replicate(tag: str, group: int) -> list[Job]:
        return [
            Job(f"{tag}/eval", "evaluate", cost=40, group=group),
            Job(f"{tag}/train/1", "train", cost=15, group=group),
            Job(f"{tag}/train/2", "train", deps=(f"{tag}/train/1",), cost=15, group=group),
            Job(f"{tag}/train/3", "train", deps=(f"{tag}/train/2",), cost=15, group=group),
        ]

    s = Schedule(replicate("seed-1", 1) + replicate("seed-0", 0))
    assert keys(s) == ["seed-0/train/1", "seed-1/train/1", "seed-0/eval", "seed-1/eval"]


def test_eta_comes_from_the_throughput_of_computed_jobs_only():
    s = Schedule(jobs())
    assert s.eta_seconds(10.0) is None
    s.finish(s.jobs["data/a"], computed=False)  # found cached: no throughput information
    assert s.eta_seconds(10.0) is None
    s.finish(s.jobs["data/b"])  # cost 9 in 18 s: half speed
    assert s.remaining_cost() == 10 + 50 + 1 + 20 + 30
    assert s.eta_seconds(18.0) == pytest.approx(2 * 111)


def test_bad_job_graphs_are_refused_with_the_job_named():
    with pytest.raises(IloraError, match="'data/a' is listed twice"):
        Schedule(jobs() + [Job("data/a", "collect")])
    with pytest.raises(IloraError, match="'eval/x' depends on unknown jobs \\['train/x'\\]"):
        Schedule([Job("eval/x", "evaluate", deps=("train/x",))])
    with pytest.raises(IloraError, match="cycle: a -> b -> a"):
        Schedule([Job("a", "m", deps=("b",)), Job("b", "m", deps=("a",))])


def test_a_failed_job_blocks_exactly_what_reads_it():
    s = Schedule(jobs())
    for key in ("data/a", "data/b"):
        s.finish(s.jobs[key])
    s.start(s.jobs["train/short"])
    s.fail(s.jobs["train/short"])
    assert keys(s) == ["train/long"]  # independent work goes on
    assert s.blocked() == sorted(["eval/short", "merge", "eval/merge"])  # eval/merge reads it through the merge


class Handle:
    """One call's outcome (a distinct object per call, as a future is)."""

    def __init__(self, error: Exception | None):
        self.error = error


class InlineExecutor:
    """An executor computing each call at submission (the loop's logic without processes)."""

    def __init__(self):
        self.submitted: list[str] = []

    def submit(self, fn, args, resources):
        self.submitted.append(args[0])
        try:
            fn(*args)
        except Exception as err:
            return Handle(err)
        return Handle(None)

    def wait(self, handles):
        return handles[:1]

    def result(self, handle):
        if handle.error is not None:
            raise handle.error


class Host:
    """Jobs whose stage is a set entry; ``broken`` ones raise, ``cached`` ones are done already."""

    def __init__(self, broken=(), cached=()):
        self.done: set[str] = set(cached)
        self.broken, self.here = set(broken), []

    def compute(self, key):
        if key in self.broken:
            raise ValueError(f"{key} is broken")
        self.done.add(key)

    def register(self, job, computed_elsewhere=False):
        return job.key in self.done

    def run_here(self, job):
        self.here.append(job.key)
        self.compute(job.key)

    def remote_call(self, job):
        return self.compute, (job.key,)

    def log_path(self, job):
        return Path("logs") / job.key


def test_run_jobs_reports_a_failure_with_its_log_and_runs_what_does_not_read_it():
    host, executor, lines = Host(broken={"train/short"}, cached={"data/a"}), InlineExecutor(), []
    outcome = run_jobs(Schedule(jobs()), host, lambda: executor, slots=2, log=lines.append)
    assert outcome.cached == ["data/a"]
    assert [f.stage for f in outcome.failed] == ["train/short"]
    assert outcome.failed[0].log == Path("logs/train/short") and "broken" in outcome.failed[0].error
    assert sorted(outcome.computed) == ["data/b", "train/long"]
    assert outcome.blocked == ["eval/merge", "eval/short", "merge"]
    assert host.here == []  # the merge (local) never became ready
    assert sum("FAILED" in line and "logs/train/short" in line for line in lines) == 1
    assert sum(" done; " in line for line in lines) == len(outcome.computed)


def test_run_jobs_computes_local_jobs_here_and_the_rest_on_the_executor():
    host, executor = Host(), InlineExecutor()
    outcome = run_jobs(Schedule(jobs()), host, lambda: executor, slots=2, log=lambda _: None)
    assert host.here == ["merge"]
    assert sorted(executor.submitted) == sorted(k for k in host.done if k != "merge")
    assert not outcome.failed and not outcome.blocked and len(outcome.computed) == len(jobs())
    serial = Host()
    run_jobs(Schedule(jobs()), serial, lambda: pytest.fail("one slot: no executor"), slots=1, log=lambda _: None)
    assert sorted(serial.here) == sorted(j.key for j in jobs())
