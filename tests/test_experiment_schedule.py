"""The stage scheduler: dependency order, which ready job starts first, refusals, ETA."""

from __future__ import annotations

import pytest

from ilora.errors import IloraError
from ilora.experiment.schedule import Job, Schedule


def jobs() -> list[Job]:
    return [
        Job("data/a", "collect", tier=0, cost=5),
        Job("data/b", "collect", tier=0, cost=9),
        Job("train/short", "train", deps=("data/a",), tier=1, cost=10),
        Job("train/long", "train", deps=("data/a", "data/b"), tier=1, cost=50),
        Job("merge", "merge", deps=("train/short", "train/long"), local=True),
        Job("eval/short", "evaluate", deps=("train/short",), tier=3, cost=20),
        Job("eval/merge", "evaluate", deps=("merge",), tier=3, cost=30),
    ]


def keys(schedule: Schedule) -> list[str]:
    return [j.key for j in schedule.ready()]


def test_ready_jobs_follow_dependencies_tiers_and_cost():
    s = Schedule(jobs())
    assert keys(s) == ["data/b", "data/a"]  # costliest first within a tier
    for key in ("data/a", "data/b"):
        s.finish(s.jobs[key])
    assert keys(s) == ["train/long", "train/short"]
    s.start(s.jobs["train/long"])
    assert keys(s) == ["train/short"]  # a running job is not ready again
    s.finish(s.jobs["train/short"])
    assert keys(s) == ["eval/short"]  # the merge waits for the long training
    s.finish(s.jobs["train/long"])
    assert keys(s) == ["merge", "eval/short"]  # lower tier first, whatever the cost
    for key in ("merge", "eval/short", "eval/merge"):
        s.finish(s.jobs[key])
    assert s.finished and keys(s) == []


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
