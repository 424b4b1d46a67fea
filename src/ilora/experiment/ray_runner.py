"""Stages as Ray tasks: on this machine by default, on an existing cluster with an address.

``ray.init()`` starts a local Ray instance with one CPU per experiment worker (``workers``), so
``ilora experiment CONFIG`` runs on a laptop with nothing else to set up; with ``--address`` or
``RAY_ADDRESS`` the same config runs on a running cluster whose nodes see the run folder at the
same path (the stage cache is content-addressed there, and every stage writes into a temporary
folder renamed into place, so a task killed mid-stage leaves no partial stage behind). A task
whose worker dies is retried by Ray; an error raised by the stage is not (it would fail again).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ilora.experiment.schedule import Resources

# A worker killed mid-stage (out of memory, a lost node) is retried this many times.
WORKER_DEATH_RETRIES = 2


class RayExecutor:
    """Runs functions as Ray tasks with declared resources.

    Args:
        address: a running cluster (``auto``, ``ray://host:port``, ``host:port``); ``None``:
            ``RAY_ADDRESS`` when set, else a new local instance.
        num_cpus: CPUs of a new local instance (ignored on a cluster, which declares its own).
        retries: how many times a task whose worker died is run again.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None, retries: int = WORKER_DEATH_RETRIES):
        import ray

        self.ray = ray
        self.retries = retries
        self._remote: dict[Callable, Any] = {}
        self.started = not ray.is_initialized()  # a local instance of its own, shut down by close()
        if self.started:
            address = address or os.environ.get("RAY_ADDRESS")
            # The worker's output goes to each stage's log; the terminal keeps one line per stage.
            options: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False, "configure_logging": False}
            if address:
                ray.init(address=address, **options)
            else:
                # Ray starts task workers at nice 15 (to keep a driver responsive); here a stage is the work
                # itself, and at nice 15 it starves behind any other process on the machine.
                ray.init(num_cpus=num_cpus, _system_config={"worker_niceness": 0}, **options)

    def submit(self, fn: Callable[..., Any], args: tuple, resources: Resources) -> Any:
        """Start ``fn(*args)`` as a task holding ``resources``; returns its object reference."""
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(fn)
        options: dict[str, Any] = {"num_cpus": resources.cpus, "num_gpus": resources.gpus, "max_retries": self.retries}
        if resources.memory_gb > 0:
            options["memory"] = int(resources.memory_gb * 2**30)
        return self._remote[fn].options(**options).remote(*args)

    def capacity(self, resources: Resources) -> int:
        """How many tasks holding ``resources`` the cluster runs at once (at least one)."""
        total = self.ray.cluster_resources()
        fits = [total.get("CPU", 1) / resources.cpus] + ([total.get("GPU", 0) / resources.gpus] if resources.gpus else [])
        return max(1, int(min(fits)))

    def close(self) -> None:
        """Shut down the local instance this executor started (one it joined keeps running)."""
        if self.started:
            self.ray.shutdown()

    def wait(self, handles: list[Any]) -> list[Any]:
        done, _ = self.ray.wait(handles, num_returns=1)
        return done

    def result(self, handle: Any) -> Any:
        return self.ray.get(handle)
