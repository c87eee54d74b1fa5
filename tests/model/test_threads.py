"""torch's CPU threads (talm.model.threads): never more than the idle cores this process may use, OMP_NUM_THREADS
when set, and the run's banner says which and why."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from talm.cli import train_model
from talm.model import threads
from talm.model.threads import choose_threads, cpu_threads, use_cpu_threads


@pytest.mark.parametrize(
    ("cores", "load", "expected"),
    [
        (2, 0.0, 2),  # idle: every core
        (2, 0.3, 2),  # a little background work
        (2, 0.8, 1),  # most of a core busy: a team of 2 would wait on the shared core
        (2, 5.5, 1),  # a busy machine (where 2 threads trained 4-18x slower than 1): one thread, never 0
        (16, 4.2, 12),
        (16, 0.0, 16),
        (1, 0.0, 1),
    ],
)
def test_the_default_is_the_idle_cores(cores: int, load: float, expected: int) -> None:
    n, why = choose_threads(cores, load)
    assert n == expected and f"{cores} core(s)" in why and "OMP_NUM_THREADS=N sets it" in why


@pytest.mark.parametrize(("omp", "expected"), [("3", 3), ("1", 1), ("0", 1), ("lots", 1), ("", 1)])
def test_omp_num_threads_wins_when_it_is_a_positive_integer(omp: str, expected: int) -> None:
    n, why = choose_threads(2, 5.0, omp)
    assert n == expected and (why == f"OMP_NUM_THREADS={omp}") == (omp in ("3", "1"))


def test_the_cores_are_this_process_s_shared_among_a_run_s_local_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 0.0, 0.0), raising=False)
    assert cpu_threads({})[0] == 7
    assert cpu_threads({"LOCAL_WORLD_SIZE": "4"})[0] == 1  # 2 cores each, 1 busy
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
