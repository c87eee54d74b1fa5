"""The training loop: metrics, checkpoints, resume, divergence, Ctrl-C."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from talm.errors import TalmError
from talm.model.config import ModelConfig
from talm.model.gpt import GPT
from talm.train.checkpoint import load_model, load_trainer_state, read_meta
from talm.train.config import RunConfig
from talm.train.loop import Trainer
from talm.train.metrics import read_metrics
from talm.train.run import resolve_run

TINY = {"vocab_size": 1024, "n_layer": 2, "n_head": 2, "d_model": 64, "context_length": 32}
TRAIN_KEYS = {"step", "tokens", "time", "train_loss", "lr", "tokens_per_s"}
EVAL_KEYS = {"step", "tokens", "time", "val_loss", "val_ppl", "val_bpb"}


def run_config(data: Path, **train) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {k: v for k, v in TINY.items() if k != "vocab_size"},
            "optim": {"lr": 3e-3, "warmup_steps": 2},
            "train": {"max_steps": 6, "batch_size": 4, "eval_every": 3, "save_every": 2, "log_every": 1}
            | {"eval_tokens": 256, "device": "cpu"}
            | train,
            "data": {"dir": str(data)},
        }
    )


def test_training_run_writes_metrics_and_checkpoints(tiny_data: Path, in_tmp: Path) -> None:
    trainer = Trainer(run_config(tiny_data), "models/m")
    result = trainer.run()
    assert result.step == 6 and result.tokens_seen == 6 * 4 * 32
    records = read_metrics("models/m")
    train = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert all(set(r) == TRAIN_KEYS for r in train) and [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(set(r) == EVAL_KEYS for r in evals) and [r["step"] for r in evals] == [3, 6]
    assert [r["tokens"] for r in train] == [128 * s for s in range(1, 7)]
    assert train[-1]["train_loss"] < train[0]["train_loss"]
    ev = evals[-1]
    assert ev["val_ppl"] == pytest.approx(math.exp(ev["val_loss"]))
    data_meta = json.loads((tiny_data / "meta.json").read_text())
    val = next(s for s in data_meta["shards"] if s["split"] == "val")
    assert ev["val_bpb"] == pytest.approx(ev["val_loss"] / math.log(2) * val["tokens"] / val["bytes"])

    meta = read_meta("models/m/latest")
    assert meta["step"] == 6 and meta["tokens_seen"] == 768
    assert meta["config"]["model"]["vocab_size"] == 1024 and meta["config"]["train"]["max_steps"] == 6
    assert meta["tokenizer"]["file"] == "tokenizer.json" and meta["val_loss"] == pytest.approx(ev["val_loss"])
    assert Path("models/m/tokenizer.json").read_bytes() == Path(data_meta["tokenizer"]["path"]).read_bytes()
    best = read_meta("models/m/best")
    assert best["val_loss"] == min(r["val_loss"] for r in evals)
    state = load_trainer_state("models/m/latest")
    assert state["step"] == 6 and state["loader"]["cursor"] == 6 * 4 and len(state["rng"]) == 1
    model, _ = load_model("models/m/latest")  # the trained weights, not the initial ones, were saved
    for (name, saved), trained in zip(
        model.state_dict().items(), trainer.model.state_dict().values(), strict=True
    ):
        assert torch.equal(saved, trained), name
    x = torch.randint(0, 1024, (2, 32))
    assert torch.equal(model(x)[0], trainer.model.eval()(x)[0])
    assert not torch.equal(
        model.state_dict()["tok_emb.weight"], GPT(ModelConfig(**TINY)).state_dict()["tok_emb.weight"]
    )


def test_resume_config_and_architecture_check(tiny_data: Path, in_tmp: Path) -> None:
    Trainer(run_config(tiny_data), "models/m").run()
    layers = [{"train": {"max_steps": 8}, "data": {"dir": str(tiny_data)}}]
    cfg, resume_from = resolve_run("models/m", layers)
    assert resume_from == Path("models/m/latest") and cfg.model.d_model == 64 and cfg.train.max_steps == 8
    cfg, resume_from = resolve_run("models/m", [{"model": {"d_model": 32}}])
    with pytest.raises(TalmError, match=r"another architecture \(d_model 64 -> 32\)"):
        Trainer(cfg, "models/m", resume_from=resume_from)  # resume.plan_resume, before anything is built
    cfg, resume_from = resolve_run("models/m", [{"model": {"d_model": 32, "n_head": 2}}], restart=True)
    assert resume_from is None and cfg.model.d_model == 32
    result = Trainer(
        resolve_run("models/m", layers)[0], "models/m", resume_from=Path("models/m/latest")
    ).run()
    assert result.step == 8
    steps = [r["step"] for r in read_metrics("models/m") if "train_loss" in r]
    assert steps == list(range(1, 9))


class Sabotage(torch.nn.Module):
    """Wraps the model: after `calls` forward passes, does `action` (poison the loss or send Ctrl-C)."""

    def __init__(self, model: torch.nn.Module, calls: int, action: str) -> None:
        super().__init__()
        self.model, self.calls, self.action, self.n = model, calls, action, 0

    def forward(self, x, y):
        self.n += 1
        logits, loss = self.model(x, y)
        if self.n > self.calls:
            if self.action == "nan":
                loss = loss * float("nan")
            elif self.n == self.calls + 1:
                os.kill(os.getpid(), signal.SIGINT)
        return logits, loss


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data: Path, in_tmp: Path) -> None:
    trainer = Trainer(run_config(tiny_data, max_steps=10, eval_every=100), "models/m")
    trainer.net = Sabotage(trainer.model, calls=5, action="nan")
    with pytest.raises(TalmError, match="diverged at step 6"):
        trainer.run()
    assert read_meta("models/m/latest")["step"] == 4
    model, _ = load_model("models/m/latest")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_stats_are_read_only_on_log_eval_and_save_steps_and_a_divergence_between_reads_is_still_caught(
    tiny_data: Path, in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reading a step's stats waits for the device, so the loop reads them only when it logs, evaluates or saves
    # (here every 4th step); a NaN at step 6 is found at the read of step 8, before step 8's save.
    reads: list[list[int]] = []
    real = Trainer.read_stats
    monkeypatch.setattr(
        Trainer,
        "read_stats",
        lambda tr, pending: (reads.append([s for s, _ in pending]), real(tr, pending))[1],
    )
    trainer = Trainer(
        run_config(tiny_data, max_steps=10, log_every=4, save_every=4, eval_every=100), "models/m"
    )
    trainer.net = Sabotage(trainer.model, calls=5, action="nan")
    trainer.precision.peak_flops = 1e9  # as on a GPU of the peak table: each log record then carries the MFU
    with pytest.raises(TalmError, match="diverged at step 6"):
        trainer.run()
    assert reads == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert read_meta("models/m/latest")["step"] == 4
    (record,) = [r for r in read_metrics("models/m") if "train_loss" in r]
    fpt = trainer.model.flops_per_token(trainer.cfg.model.context_length)
    assert record["step"] == 4 and record["mfu"] == pytest.approx(
        record["tokens_per_s"] * fpt / 1e9, abs=1e-4
    )


def test_mfu_is_logged_against_the_gpu_peak_and_left_out_where_the_peak_is_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from talm.train import precision

    cuda = torch.device("cuda", 0)
    for name, tflops in [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
                         ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA L4", 121), ("NVIDIA L40S", 362)]:  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d, n=name: n)
        assert precision.peak_flops(cuda, torch.bfloat16) == tflops * 1e12, name
    assert precision.peak_flops(cuda, None) is None  # float32 (TF32) is not the figure MFU is quoted at
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "Some Future GPU")
    assert precision.peak_flops(cuda, torch.bfloat16) is None
    assert precision.peak_flops(torch.device("cpu"), torch.bfloat16) is None


def test_ctrl_c_saves_and_stops(tiny_data: Path, in_tmp: Path) -> None:
    trainer = Trainer(run_config(tiny_data, max_steps=10, save_every=100, eval_every=100), "models/m")
    trainer.net = Sabotage(trainer.model, calls=2, action="sigint")
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert read_meta("models/m/latest")["step"] == 3  # the step in progress finished, then it saved


def cli(name: str, data: Path, max_steps: int) -> list[str]:
    # dropout > 0 so that the RNG state must be restored too
    return [sys.executable, "-m", "talm.cli.train_model", "-n", name, "-d", str(data), "--deterministic"] + (
        "--device cpu --model.context_length 32 --model.n_layer 2 --model.d_model 64 --model.n_head 2 "
        "--model.dropout 0.1 --batch-size 4 --save-every 5 --log-every 1 --eval-every 20 --eval-tokens 256 "
        f"--optim.warmup_steps 5 --max-steps {max_steps}"
    ).split()


def losses(model_dir: Path) -> dict[int, float]:
    records = read_metrics(model_dir)
    train = [r for r in records if "train_loss" in r]
    assert len({r["step"] for r in train}) == len(train)  # no step logged twice
    return {r["step"]: r["train_loss"] for r in train} | {
        -r["step"]: r["val_loss"] for r in records if "val_loss" in r
    }


@pytest.mark.slow
def test_resume_after_sigkill_repeats_the_same_losses_bit_for_bit(tiny_data: Path, in_tmp: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = 60
    subprocess.run(cli("ref", tiny_data, steps), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(
        cli("run", tiny_data, steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = Path("models/run/latest/checkpoint.json")
    deadline = time.monotonic() + 120
    while not (ckpt.exists() and json.loads(ckpt.read_text())["step"] >= 5):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = read_meta("models/run/latest")["step"]
    assert killed_at < steps, "the run finished before it could be killed"
    resumed = subprocess.run(cli("run", tiny_data, steps), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming models/run from step {killed_at}" in resumed.stderr
    ref, run = losses(Path("models/ref")), losses(Path("models/run"))
    assert len(ref) == steps + 3 and run == ref  # every train and val loss identical, to the bit


class RecordingSink:
    def __init__(self) -> None:
        self.records: list[dict] = []
        self.evals = 0
        self.closed = False

    def log(self, record: dict) -> None:
        self.records.append(record)

    def on_eval(self, model_dir: Path) -> None:
        assert (model_dir / "metrics.jsonl").is_file()
        self.evals += 1

    def close(self) -> None:
        self.closed = True


def test_every_metrics_record_reaches_the_report_sinks(tiny_data, in_tmp, monkeypatch) -> None:
    sink = RecordingSink()
    calls = []

    def make_sinks(report_to, model_dir, run_config):
        calls.append((report_to, model_dir, run_config))
        return [sink]

    monkeypatch.setattr("talm.train.loop.make_sinks", make_sinks)
    Trainer(run_config(tiny_data), "models/m").run()
    assert calls == [([], Path("models/m"), read_meta("models/m/latest")["config"])]
    assert sink.records == read_metrics("models/m") and sink.evals == 2 and sink.closed


def test_sinks_refresh_at_the_end_of_an_interrupted_run(tiny_data, in_tmp, monkeypatch) -> None:
    sink = RecordingSink()
    monkeypatch.setattr("talm.train.loop.make_sinks", lambda *a: [sink])
    trainer = Trainer(run_config(tiny_data, max_steps=10, eval_every=100), "models/m")
    trainer.net = Sabotage(trainer.model, calls=2, action="sigint")
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert sink.evals == 1 and sink.closed and [r["step"] for r in sink.records] == [1, 2, 3]


def test_evaluate_makes_no_float64_tensor_and_keeps_its_value(tiny_data: Path, in_tmp: Path) -> None:
    """MPS has no float64: evaluation accumulates float32 losses and sums them in float64 on the host only."""
    from torch.overrides import TorchFunctionMode

    trainer = Trainer(run_config(tiny_data), "models/m")

    class NoFloat64(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                assert not (isinstance(t, torch.Tensor) and t.dtype == torch.float64), func
            return out

    with NoFloat64():
        metrics = trainer.objective.evaluate(trainer.model)
    val_loss, bpb = metrics["val_loss"], metrics["val_bpb"]
    # the same mean computed in float64 throughout (the forwards in the run's precision: bf16 on CPUs with it)
    total, count = torch.zeros((), dtype=torch.float64), 0
    trainer.model.eval()
    with torch.no_grad():
        for x, y in trainer.objective.eval_slice:
            with trainer.precision.autocast():
                loss = trainer.model(x, y)[1]
            total += loss.double() * y.numel()
            count += y.numel()
    assert val_loss == (total / count).item() and bpb is not None


def test_the_progress_bar_shows_the_last_val_loss(
    tiny_data: Path, in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After each evaluation the bar shows its val loss beside the train loss, until the next one."""
    import talm.train.loop

    shown: list[tuple[int, dict]] = []  # (the bar's step, its fields) at each update of the fields

    class Bar(talm.train.loop.tqdm):
        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs) -> None:
            shown.append((self.n, dict(ordered_dict or {}, **kwargs)))
            super().set_postfix(ordered_dict, refresh, **kwargs)

    monkeypatch.setattr(talm.train.loop, "tqdm", Bar)
    Trainer(run_config(tiny_data, log_every=2), "models/m").run()
    val = {r["step"]: r["val_loss"] for r in read_metrics("models/m") if "val_loss" in r}
    assert sorted(val) == [3, 6]
    # logs at steps 2, 4, 6 and evaluations at 3 and 6: each evaluation's loss shown from it on
    v3, v6 = f"{val[3]:.4f}", f"{val[6]:.4f}"
    assert [fields.get("val") for _, fields in shown] == [None, v3, v3, v3, v6]
    assert all("loss" in fields for _, fields in shown)  # beside the train loss


def test_the_banner_lists_an_objective_s_own_settings_only_for_that_objective(tiny_data: Path) -> None:
    from talm.train.loop import describe

    lm = describe(run_config(tiny_data))
    assert "  train: " in lm and "  dpo: " not in lm and "  grpo: " not in lm
    dpo = describe(run_config(tiny_data, objective="dpo"))
    assert "  dpo: " in dpo and "  grpo: " not in dpo
