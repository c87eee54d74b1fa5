"""FSDP (2 processes, gloo, CPU) trains like DDP and like one process with the same global batch, with AdamW and
with Muon; across two torchrun "nodes" as on one; and its sharded checkpoints resume on another process count
(2 -> 1, 1 -> 2) with the data order continuing exactly, as whole checkpoints resume under FSDP and DDP. Its model,
built on the meta device and initialised shard by shard, is GPT(config)'s to the bit; Muon splits its
orthogonalisation over the processes (FSDP and DDP) and updates the same bits.

Tolerance: every run here is float32 on CPU, and the runs differ only in how the gradient of a step is summed
(two micro-batches accumulated on one process, or two processes' gradients averaged by an all-reduce or a
reduce-scatter), so losses agree to float32 rounding (~1e-7 relative per step); rel 1e-4 leaves room for that
to grow over the steps and still fails on any real difference (a wrong shard or batch moves the loss by >1e-2).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from talm.train.checkpoint import SHARDS, load_model, load_trainer_state
from talm.train.metrics import read_metrics
from talm.train.run import train_model

WORKER = Path(__file__).with_name("dist_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def flags(parallel: str, optim: str = "adamw", **train: Any) -> dict[str, Any]:
    """A tiny run: 256 tokens per step (2 micro-batches of 4 x 32 on one process, 1 on each of two); the lr
    constant after warmup (wsd without decay), so raising --max-steps on resume continues the same run."""
    return {
        "model": {"context_length": 32, "n_layer": 2, "d_model": 64, "n_head": 2},
        # grad_clip below the gradient norm (~0.8 at the start): clipping over sharded gradients is exercised
        "optim": {"name": optim, "warmup_steps": 2, "schedule": "wsd", "decay_fraction": 0.0, "grad_clip": 0.3},
        "train": {
            "device": "cpu", "parallel": parallel, "batch_size": 4, "tokens_per_step": 256, "max_steps": 4,
            "log_every": 1, "eval_every": 4, "save_every": 4, "eval_tokens": 544,  # 17 windows: 9 + 8 per rank
        } | train,
    }  # fmt: skip


def launch(
    jobs: list[tuple[str, dict[str, Any]]],
    data: Path,
    cwd: Path,
    *launcher: str,
    checks: list[dict] = (),
    **job: Any,
) -> subprocess.Popen:
    """torchrun of dist_worker.py over `jobs` (name, flags) and `checks`; `job`'s keys go into every run's job."""
    jobs_file = cwd / f"jobs-{os.getpid()}-{len(list(cwd.glob('jobs-*')))}.json"
    runs = [{"name": n, "data": str(data), "flags": f, **job} for n, f in jobs]
    jobs_file.write_text(json.dumps(runs + list(checks)))
    launcher = launcher or ("--standalone", "--nproc-per-node", "2")
    return subprocess.Popen(
        [*TORCHRUN, *launcher, str(WORKER), str(jobs_file)],
        cwd=cwd, env=ENV, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers (their own session)
        raise
    assert proc.returncode == 0, err[-3000:]
    return err


def losses(model_dir: Path, key: str = "train_loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(model_dir) if key in r}


def same_curve(a: Path, b: Path, steps: range) -> None:
    for key in ("train_loss", "val_loss"):
        la, lb = losses(a, key), losses(b, key)
        shared = [s for s in steps if s in la]
        assert shared and all(s in lb for s in shared), (key, la, lb)
        assert [lb[s] for s in shared] == pytest.approx([la[s] for s in shared], rel=1e-4, abs=1e-6), key


CHECKS = ("meta_init", "muon_split")  # dist_worker.py's checks, run in the same launch


@pytest.fixture(scope="module")
def two_process(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One 2-process launch: DDP and FSDP with AdamW and with Muon, an FSDP run stopped at step 2, and the
    worker's checks (their results in cwd/checks/CHECK-RANK.json)."""
    cwd = tmp_path_factory.mktemp("two_process")
    jobs = [(f"{p}-{o}", flags(p, o)) for o in ("adamw", "muon") for p in ("ddp", "fsdp")]
    jobs.append(("r2", flags("fsdp", max_steps=2)))
    (cwd / "checks").mkdir()
    checks = [{"check": check, "out": str(cwd / "checks")} for check in CHECKS]
    return cwd, finish(launch(jobs, tiny_data, cwd, checks=checks))


def check_results(cwd: Path, check: str) -> list[dict[str, Any]]:
    """What each of the two ranks saw in dist_worker.py's `check`."""
    return [json.loads((cwd / "checks" / f"{check}-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_fsdp_builds_the_model_sharded_with_the_weights_of_one_process(two_process: tuple[Path, str]) -> None:
    """Built on the meta device, sharded, then initialised shard by shard: the gathered weights are GPT(config)'s
    with the same seed to the bit (llama and GPT-2 families), the RoPE tables (not saved, recomputed) too, the
    RNG is left where GPT() leaves it, and each process holds only its half of the rows."""
    for rank in check_results(two_process[0], "meta_init"):
        for family in ("llama", "gpt2"):
            seen = rank[family]
            assert seen["differ"] == [] and seen["rope_same"] and seen["rng_after_same"], (family, seen)
            assert seen["local_rows"] * 2 == seen["rows"], seen


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_muon_splits_the_orthogonalisation_and_updates_the_same_bits(
    mode: str, two_process: tuple[Path, str]
) -> None:
    """Three steps of Muon over FSDP's sharded matrices, or as a DDP run builds it, give the very weights of Muon
    over the whole ones on one process, while the two processes split Newton-Schulz: together they orthogonalise
    exactly the matrices one process does, none twice, each its share of every same-shape stack; per projection,
    q, k, v and gate, up are matrices of their own; with uneven shards too (5 and 1 rows over 2 processes)."""
    ranks = check_results(two_process[0], "muon_split")
    for case, share in (("gpt", 4), ("gpt_projections", 7), ("odd", None)):
        seen = [rank[f"{mode}-{case}"] for rank in ranks]
        for rank in seen:
            assert rank["differ"] == [] and len(rank["moved"]) == rank["matrices"], (case, rank)
        for step, one_process in enumerate(seen[0]["all"]):
            mine = [rank["orthogonalised"][step] for rank in seen]
            assert sorted(map(tuple, mine[0] + mine[1])) == sorted(map(tuple, one_process)), (case, step)
            assert [len(m) for m in mine] == ([share, share] if share else [2, 1]), (case, step, mine)
    # the whole matrices, one of each stack of two: gate_up (256 x 32), down (32 x 128), qkv (96 x 32), proj
    first = ranks[0][f"{mode}-gpt"]["orthogonalised"][0]
    assert sorted(tuple(m[:2]) for m in first) == [(32, 32), (32, 128), (96, 32), (256, 32)]
    # per projection, half of each stack: 2 of gate, up (128 x 32); 4 of q, k, v, proj (32 x 32); 1 of down
    first = ranks[0][f"{mode}-gpt_projections"]["orthogonalised"][0]
    assert sorted(tuple(m[:2]) for m in first) == [(32, 32)] * 4 + [(32, 128)] + [(128, 32)] * 2


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_fsdp_matches_ddp_and_one_process(
    optim: str, two_process: tuple[Path, str], tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd, stderr = two_process
    assert "parallel: fsdp (as asked, 2 process(es))" in stderr and "parallel: ddp (as asked" in stderr
    monkeypatch.chdir(cwd)
    train_model(f"one-{optim}", tiny_data, overrides=flags("auto", optim))  # 1 process, 2 micro-steps
    models = cwd / "models"
    same_curve(models / f"one-{optim}", models / f"fsdp-{optim}", range(1, 5))
    same_curve(models / f"ddp-{optim}", models / f"fsdp-{optim}", range(1, 5))
    assert losses(models / f"fsdp-{optim}")[4] < losses(models / f"fsdp-{optim}")[1]  # it learns
    # The sharded checkpoint: DCP's shards and a whole model.safetensors every reader loads as it is.
    latest = models / f"fsdp-{optim}" / "latest"
    shards = sorted(p.name for p in (latest / SHARDS).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    whole, _ = load_model(latest)
    one, _ = load_model(models / f"one-{optim}" / "latest")
    # Summation order only, amplified by the optimizers' normalisations: AdamW moves an element whose gradient is
    # noise-sized (a rare token's embedding row) by up to its lr (6e-4) either way, and Muon per projection
    # normalises each of q, k, v alone, so k's and v's small gradients' noise reaches their updates (bf16
    # Newton-Schulz on CPUs with native bf16): up to 7e-4 measured after 4 steps. A shard gathered wrongly would
    # differ by the weights' own size (~0.02-0.1); the curves above agree to 1e-4.
    for (name, a), b in zip(whole.state_dict().items(), one.state_dict().values(), strict=True):
        assert (a - b).abs().max().item() < 2e-3, name
    assert len(load_trainer_state(latest)["rng"]) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_match_one_node(two_process: tuple[Path, str], tiny_data: Path, tmp_path: Path) -> None:
    """Two torchrun launchers of one process each, meeting at a c10d rendezvous on 127.0.0.1, as two machines
    would (sharing the file system, as docs/scaling.md asks), train as one launcher of two processes."""
    cwd, _ = two_process
    rendezvous = ("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d")
    endpoint = ("--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "talm-test")
    jobs = [("nodes", flags("fsdp"))]
    nodes = [launch(jobs, tiny_data, tmp_path, *rendezvous, *endpoint, "--node-rank", str(r)) for r in (0, 1)]
    stderr = "".join(finish(node, timeout=150) for node in nodes)
    assert stderr.count("parallel: fsdp (as asked, 2 process(es))") == 1  # rank 0's banner
    same_curve(cwd / "models" / "fsdp-adamw", tmp_path / "models" / "nodes", range(1, 5))


@pytest.mark.slow
def test_checkpoints_reshard_across_process_counts(
    two_process: tuple[Path, str], tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each resumed run (steps 3-4) repeats the uninterrupted one-process run's losses and ends at the same place
    of the data: 2 -> 1 (FSDP on a world of one, and without FSDP), 1 -> 2 (FSDP, a whole checkpoint under
    FSDP, DDP)."""
    cwd, _ = two_process
    monkeypatch.chdir(cwd)
    models = cwd / "models"
    train_model("whole", tiny_data, overrides=flags("auto"))
    # 2 -> 1: r2 stopped at step 2 on two FSDP processes (the module's launch)
    shutil.copytree(models / "r2", models / "r2-plain")
    train_model("r2", tiny_data, overrides=flags("fsdp"))
    train_model("r2-plain", tiny_data, overrides=flags("auto"))
    # 1 -> 2: stopped at step 2 on one process (FSDP on a world of one; no wrapper), resumed on two
    train_model("r1", tiny_data, overrides=flags("fsdp", max_steps=2))
    train_model("w1", tiny_data, overrides=flags("auto", max_steps=2))
    shutil.copytree(models / "w1", models / "w1-ddp")
    assert (models / "r1" / "latest" / SHARDS).is_dir() and not (models / "w1" / "latest" / SHARDS).exists()
    stderr = finish(
        launch([("r1", flags("fsdp")), ("w1", flags("fsdp")), ("w1-ddp", flags("ddp"))], tiny_data, cwd)
    )
    assert stderr.count("resuming models/") == 3
    whole_loader = load_trainer_state(models / "whole" / "latest")["loader"]
    for name in ("r2", "r2-plain", "r1", "w1", "w1-ddp"):
        same_curve(models / "whole", models / name, range(3, 5))
        assert sorted(losses(models / name)) == list(range(1, 5)), name
        assert load_trainer_state(models / name / "latest")["loader"] == whole_loader, name


@pytest.mark.slow
def test_fsdp_samples_and_scores_tasks_without_the_ranks_diverging(tiny_data: Path, tmp_path: Path) -> None:
    """--sample-every and --eval-tasks under FSDP: every rank takes part in every forward pass of the sharded
    model (the same number of them, whatever tokens each rank's sampling picks), so the run ends, with the
    samples and the task scores in metrics.jsonl. Rank 1's sampling here picks <|endoftext|> every time: a
    generation that stopped there would leave rank 0 waiting in its next forward pass (the launch times out)."""
    from conftest import BASE_TOKENIZER
    from fixtures.task_copies import write_all_tasks

    from talm.tokenizer.api import Tokenizer

    tasks = write_all_tasks(tmp_path / "tasks")
    extra = {"sample_every": 2, "sample_tokens": 12, "sample_prompts": ["To be", "KING"]}
    extra |= {
        "eval_every": 2,
        "eval_tasks": ["arc_easy"],
        "eval_tasks_dir": str(tasks),
        "eval_tasks_limit": 3,
    }
    eot = Tokenizer.from_file(BASE_TOKENIZER).eot_id
    err = finish(launch([("s", flags("fsdp", **extra))], tiny_data, tmp_path, eot_on_rank1=eot), timeout=240)
    assert "parallel: fsdp (as asked, 2 process(es))" in err
    evals = [r for r in read_metrics(tmp_path / "models" / "s") if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(len(r["samples"]) == 2 and "arc_easy/acc" in r for r in evals)
    assert all(s["greedy"] and s["sampled"] for r in evals for s in r["samples"])  # rank 0's, not cut
