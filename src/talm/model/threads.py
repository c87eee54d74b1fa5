"""How many threads torch computes with on CPU: never more than the cores this process may use that are idle.

torch's default is one thread per core. On a machine where other processes keep cores busy, that is far from
the best: each operation splits its work over every thread and waits for the slowest, and OpenMP's threads
spin while they wait, so a thread that shares its core with another process slows the whole team (measured on
a 2-core machine under load: 1 thread trained 4-18x faster than 2). So the default is the cores this process may
use (its CPU affinity, shared among the processes of a multi-process run on this machine) less those other
processes keep busy right now, rounded, at least 1. OMP_NUM_THREADS, when set to a positive integer, wins.

"Right now" is a 0.2 s sample of /proc/stat for this process's cores, less this process's own time: the 1-minute
load average still counts work that just ended (a demo's download_data before its training: 1.2-1.5 on an idle
2-core machine, so 1 thread, which trained at 8,400 tokens/s against 2 threads' 12,900). Without /proc (macOS),
the load average it is.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch


def choose_threads(
    cores: int, busy: float, omp: str | None = None, *, measure: str = "busy now"
) -> tuple[int, str]:
    """(threads, why) for a process that may use `cores` cores while other processes keep `busy` of them busy
    (`measure` says how that was measured); `omp`: OMP_NUM_THREADS, which decides when a positive integer."""
    if (asked := omp_threads(omp)) is not None:
        return asked, f"OMP_NUM_THREADS={asked}"
    idle = max(0.0, cores - busy)
    threads = max(1, min(cores, int(idle + 0.5)))
    return threads, f"{cores} core(s) for this process, {busy:.1f} {measure}; OMP_NUM_THREADS=N sets it"


def omp_threads(omp: str | None) -> int | None:
    """OMP_NUM_THREADS's count when it is a positive integer, else None."""
    return int(omp) if omp is not None and omp.strip().isdigit() and int(omp) > 0 else None


def _cpu_jiffies(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies of `cpus` since boot from /proc/stat, or None where there is none."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return (busy, total) if total else None


def _own_jiffies() -> int:
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, every thread of this process


def busy_cores(cpus: set[int], seconds: float = 0.2) -> float | None:
    """How many of `cpus` other processes keep busy, from a `seconds` sample of /proc/stat less this process's
    own time; None without /proc."""
    before = _cpu_jiffies(cpus)
    if before is None:
        return None
    own = _own_jiffies()
    time.sleep(seconds)
    after, own = _cpu_jiffies(cpus), _own_jiffies() - own
    if after is None or after[1] <= before[1]:
        return None
    return len(cpus) * max(0, after[0] - before[0] - own) / (after[1] - before[1])


def cpu_threads(environ: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """`choose_threads` for this process now: its CPU affinity, shared with the other processes of a run
    started by torchrun on this machine (LOCAL_WORLD_SIZE), and how busy other processes keep those cores."""
    omp = environ.get("OMP_NUM_THREADS")
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = max(1, len(cpus) // max(1, int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)))
    if omp_threads(omp) is not None:  # no need to sample the cores
        return choose_threads(cores, 0.0, omp)
    busy = busy_cores(cpus)
    if busy is not None:  # shared among the run's local processes as the cores are
        return choose_threads(cores, busy * cores / len(cpus))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return choose_threads(cores, load, measure="1-minute load average")


def use_cpu_threads(device: torch.device) -> str:
    """Set torch's thread count for computing on `device` (on CPU: `cpu_threads`; elsewhere torch's default,
    the CPU only feeding the accelerator) and say it, for a banner: "threads: N (why)"."""
    if device.type != "cpu":
        return f"threads: {torch.get_num_threads()} (torch's default; the model runs on {device.type})"
    threads, why = cpu_threads()
    torch.set_num_threads(threads)
    return f"threads: {threads} ({why})"
