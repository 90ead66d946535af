"""What confines a worker process: memory, CPU priority and cores (set in the child before exec), threads and
the network (set by the worker itself, ``worker.py``).

Enforced: the address-space limit (``RLIMIT_AS``: an allocation beyond it fails with MemoryError in the worker,
never touching the controller), the nice value, the CPUs it may run on (``sched_setaffinity``, where the
kernel allows it), the threads torch and the BLAS libraries start, death with the controller (PR_SET_PDEATHSIG)
and no network (an audit hook refusing every socket connection and name lookup).
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass

from controller.processes import die_with_parent

__all__ = ["WorkerLimits", "preexec_for", "thread_env"]


@dataclass(frozen=True)
class WorkerLimits:
    memory_mb: int = 0  # 0: no limit
    threads: int = 1
    nice: int = 10

    def cpus(self) -> set[int] | None:
        """The CPUs the worker is pinned to: the last ``threads`` this process may use (None: all)."""
        try:
            allowed = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return None
        if self.threads >= len(allowed):
            return None
        return set(allowed[-self.threads :])


def preexec_for(limits: WorkerLimits) -> Callable[[], None]:
    """The ``preexec_fn`` of a worker: runs in the child between fork and exec (only system calls)."""
    cpus = limits.cpus()

    def setup() -> None:
        die_with_parent()
        if limits.memory_mb > 0:
            size = limits.memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (size, size))
        if limits.nice > 0:
            os.nice(limits.nice)
        if cpus is not None:
            with contextlib.suppress(OSError):  # a cgroup or container may forbid it
                os.sched_setaffinity(0, cpus)

    return setup


def thread_env(threads: int) -> dict[str, str]:
    """Environment that keeps the numeric libraries to ``threads`` threads and every library off the network."""
    n = str(max(1, threads))
    return {
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
