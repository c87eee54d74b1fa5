"""torch's CPU threads (talm.model.threads): never more than the idle cores this process may use, OMP_NUM_THREADS
when set, and the run's banner says which and why."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from talm.cli import train_model
from talm.model import threads
from talm.model.threads import busy_cores, choose_threads, cpu_threads, use_cpu_threads


@pytest.mark.parametrize(
    ("cores", "load", "expected"),
    [
        (2, 0.0, 2),  # idle: every core
        (2, 0.3, 2),  # a little background work
        (2, 0.8, 1),  # most of a core busy: a team of 2 would wait on the shared core
        (2, 2.0, 1),  # a busy machine (where 2 threads trained 4-18x slower than 1): one thread, never 0
        (16, 4.2, 12),
        (16, 0.0, 16),
        (1, 0.0, 1),
    ],
)
def test_the_default_is_the_idle_cores(cores: int, load: float, expected: int) -> None:
    n, why = choose_threads(cores, load)
    assert n == expected and f"{cores} core(s)" in why and "OMP_NUM_THREADS=N sets it" in why


@pytest.mark.skipif(
    not Path("/proc/stat").exists(), reason="no /proc/stat on this OS (the load average is used)"
)
def test_cores_busy_now_are_measured_less_this_process_s_own_work() -> None:
    """A core kept busy by another process counts, this process's own spinning does not; work that already ended
    (which the 1-minute load average still counts) does not either."""
    import subprocess
    import sys
    import threading

    cpus = os.sched_getaffinity(0)
    before = busy_cores(cpus, seconds=0.5)
    if before > 0.3:  # other work would hide (or mimic) the spinner's and the other process's
        pytest.skip(f"the machine is busy with other work ({before:.1f} cores): this measures an idle one")
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        assert busy_cores(cpus, seconds=0.5) < 0.6  # our own thread's work is not another process's
    finally:
        stop.set()
        spinner.join()
    other = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        threads_now = [busy_cores(cpus, seconds=0.5) for _ in range(2)]
        assert max(threads_now) > 0.7  # one core kept busy by another process
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize(("omp", "expected"), [("3", 3), ("1", 1), ("0", 1), ("lots", 1), ("", 1)])
def test_omp_num_threads_wins_when_it_is_a_positive_integer(omp: str, expected: int) -> None:
    n, why = choose_threads(2, 5.0, omp)
    assert n == expected and (why == f"OMP_NUM_THREADS={omp}") == (omp in ("3", "1"))


def test_the_cores_are_this_process_s_shared_among_a_run_s_local_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(threads, "busy_cores", lambda cpus: 1.0)
    assert cpu_threads({})[0] == 7
    assert cpu_threads({"LOCAL_WORLD_SIZE": "4"})[0] == 2  # 2 cores each, a quarter of the busy one
    monkeypatch.setattr(threads, "busy_cores", lambda cpus: None)  # no /proc: the load average
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 0.0, 0.0), raising=False)
    assert cpu_threads({}) == (
        5,
        "8 core(s) for this process, 3.0 1-minute load average; OMP_NUM_THREADS=N sets it",
    )
    assert cpu_threads({"OMP_NUM_THREADS": "5"}) == (5, "OMP_NUM_THREADS=5")


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_training_uses_and_announces_the_choice(
    tiny_data: Path, in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys, restore_threads
) -> None:
    monkeypatch.setattr(threads, "cpu_threads", lambda: (1, "a test's choice"))
    torch.set_num_threads(2)
    args = [
        "-n",
        "t",
        "-d",
        str(tiny_data),
        "--device",
        "cpu",
        "--model.n_layer",
        "1",
        "--model.d_model",
        "32",
    ]
    args += ["--model.n_head", "2", "--model.context_length", "16", "--batch-size", "2", "--max-steps", "1"]
    train_model.main([*args, "--eval-every", "1", "--eval-tokens", "64", "--save-every", "1"])
    assert "threads: 1 (a test's choice)" in capsys.readouterr().err.splitlines()
    assert torch.get_num_threads() == 1
    assert use_cpu_threads(torch.device("meta")).startswith("threads: 1 (torch's default")
