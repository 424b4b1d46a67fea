"""Stages as Ray tasks on a local cluster: a worker killed mid-stage, a failing stage, the quick config."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from ilora.experiment.ray_runner import RayExecutor  # noqa: E402
from ilora.experiment.schedule import Job, Resources, Schedule, run_jobs  # noqa: E402
from ilora.experiment.stages import RECORD, StageRunner  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance of two worker CPUs; this module's functions travel by value (the
    workers cannot import a test module)."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield RayExecutor(num_cpus=2)
    ray.shutdown()


def dies_once(run_dir: str, name: str) -> None:
    """A stage whose first attempt kills its own worker halfway through writing its output."""
    attempts = Path(run_dir) / f"{name}.attempts"
    attempt = int(attempts.read_text()) + 1 if attempts.exists() else 1
    attempts.write_text(str(attempt))

    def write(folder: Path):
        (folder / "half").write_text("first half")
        if attempt == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        (folder / "out").write_text("second half")
        return {"attempt": attempt}

    StageRunner(Path(run_dir), log=lambda _: None).run(name, {"n": 1}, write)


def raises(run_dir: str, name: str) -> None:
    raise ValueError(f"{name}: bad input")


def writes(run_dir: str, name: str) -> None:
    StageRunner(Path(run_dir), log=lambda _: None).run(name, {}, lambda folder: (folder / "out").write_text(name) and None)


class StageHost:
    """Jobs whose spec is the function computing their stage in ``run_dir``."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def register(self, job: Job, computed_elsewhere: bool = False) -> bool:
        return (self.run_dir / job.key / RECORD).is_file()

    def run_here(self, job: Job) -> None:
        raise AssertionError("every job runs on Ray here")

    def remote_call(self, job: Job):
        return job.spec, (str(self.run_dir), job.key)

    def log_path(self, job: Job) -> Path:
        return self.run_dir / "logs" / job.key


def niceness() -> int:
    return os.nice(0)


def test_stages_run_at_the_drivers_priority_not_rays_default_nice_15(local_ray):
    assert local_ray.result(local_ray.submit(niceness, (), Resources())) == os.nice(0)


def test_a_killed_worker_is_retried_and_a_failing_stage_blocks_only_its_readers(local_ray, tmp_path):
    jobs = [Job("killed", spec=dies_once), Job("broken", spec=raises), Job("reader", deps=("broken",), spec=writes),
            Job("apart", spec=writes)]
    lines: list[str] = []
    outcome = run_jobs(Schedule(jobs), StageHost(tmp_path), lambda: local_ray, slots=2, log=lines.append)
    assert sorted(outcome.computed) == ["apart", "killed"]
    assert [(f.stage, f.log) for f in outcome.failed] == [("broken", tmp_path / "logs" / "broken")]
    assert "bad input" in outcome.failed[0].error and outcome.blocked == ["reader"]
    record = json.loads((tmp_path / "killed" / RECORD).read_text())
    assert record["result"] == {"attempt": 2}  # Ray ran the stage again after its worker died
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == ["half", "out", RECORD]
    assert not (tmp_path / "reader").exists()
    assert any("broken FAILED" in line for line in lines)


def test_a_worker_killed_without_retries_is_reported_and_leaves_no_stage(tmp_path, local_ray):
    no_retry = RayExecutor(retries=0)  # joins the running instance
    outcome = run_jobs(Schedule([Job("killed", spec=dies_once)]), StageHost(tmp_path), lambda: no_retry, slots=2,
                       log=lambda _: None)
    assert [f.stage for f in outcome.failed] == ["killed"]
    assert not (tmp_path / "killed").exists()  # only a temporary folder beside it: the cache has no such stage
    rerun = run_jobs(Schedule([Job("killed", spec=dies_once)]), StageHost(tmp_path), lambda: local_ray, slots=2,
                     log=lambda _: None)
    assert rerun.computed == ["killed"]
    assert json.loads((tmp_path / "killed" / RECORD).read_text())["result"] == {"attempt": 2}


@pytest.mark.slow
def test_the_quick_config_runs_on_a_two_worker_ray_cluster(tmp_path):
    """A head without CPUs and two one-CPU worker nodes, joined by address (as a cluster is)."""
    from ray.cluster_utils import Cluster

    from ilora.config import load_yaml
    from ilora.experiment.config import ExperimentConfig
    from ilora.experiment.pipeline import ExecutionSettings, run_experiment

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    try:
        config = load_yaml(ExperimentConfig, ROOT / "configs" / "quick.yaml", [f"run_dir={tmp_path / 'run'}"])
        lines: list[str] = []
        report = run_experiment(config, log=lines.append, execution=ExecutionSettings(address=cluster.address))
        assert "## 1. Single-task" in report.read_text()
        stages = {json.loads(p.read_text())["name"] for p in (tmp_path / "run").rglob(RECORD)}
        assert {"train/routed/Pong", "eval/merge/ilora", "report"} <= stages
        assert sum(" done; " in line for line in lines) >= 50  # one line per computed stage
    finally:
        ray.shutdown()
        cluster.shutdown()
