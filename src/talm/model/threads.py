"""How many threads torch computes with on CPU: never more than the cores this process may use that are idle.

torch's default is one thread per core. On a machine where other processes keep cores busy, that is far from
the best: each operation splits its work over every thread and waits for the slowest, and OpenMP's threads
spin while they wait, so a thread that shares its core with another process slows the whole team (measured on
a 2-core machine under load: 1 thread trained 4-18x faster than 2). So the default is the cores this process may
use (its CPU affinity, shared among the processes of a multi-process run on this machine) less those the
1-minute load average says are busy, rounded, at least 1. OMP_NUM_THREADS, when set to a positive integer, wins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch


def choose_threads(cores: int, load: float, omp: str | None = None) -> tuple[int, str]:
    """(threads, why) for a process that may use `cores` cores while `load` of them are busy on average;
    `omp`: OMP_NUM_THREADS, which decides when it is a positive integer."""
    if omp is not None and omp.strip().isdigit() and int(omp) > 0:
        return int(omp), f"OMP_NUM_THREADS={int(omp)}"
    idle = max(0.0, cores - load)
    threads = max(1, min(cores, int(idle + 0.5)))
    return (
        threads,
        f"{cores} core(s) for this process, 1-minute load average {load:.1f}; OMP_NUM_THREADS=N sets it",
    )


def cpu_threads(environ: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """`choose_threads` for this process now: its CPU affinity, shared with the other processes of a run
    started by torchrun on this machine (LOCAL_WORLD_SIZE), and the 1-minute load average."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = max(1, cores // max(1, int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return choose_threads(cores, load, environ.get("OMP_NUM_THREADS"))


def use_cpu_threads(device: torch.device) -> str:
    """Set torch's thread count for computing on `device` (on CPU: `cpu_threads`; elsewhere torch's default,
    the CPU only feeding the accelerator) and say it, for a banner: "threads: N (why)"."""
    if device.type != "cpu":
        return f"threads: {torch.get_num_threads()} (torch's default; the model runs on {device.type})"
    threads, why = cpu_threads()
    torch.set_num_threads(threads)
    return f"threads: {threads} ({why})"
