"""Precision and compile per device: --dtype auto follows the CPU's native bfloat16 support, a bfloat16 CPU run
trains, and a compiled run's evaluations and saves cause no recompiles."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from talm.train import precision
from talm.train.config import RunConfig
from talm.train.loop import Trainer
from talm.train.metrics import read_metrics
from talm.train.precision import Precision, autocast_dtype, cpu_native_bf16

CPU = torch.device("cpu")
CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse sse2 avx avx2 avx512f {extra}
bogomips\t: 4000.00
"""


@pytest.fixture
def detect(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Set what the CPU probes report: torch's capabilities (None = a torch without get_capabilities) and the
    flags line of a fake /proc/cpuinfo (None = no such file); the detection's cache is cleared around it."""

    def set_cpu(capabilities: dict | None, cpuinfo_flags: str | None) -> None:
        if capabilities is None:
            monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
        else:
            monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(capabilities), raising=False)
        path = tmp_path / "cpuinfo"
        if cpuinfo_flags is not None:
            path.write_text(CPUINFO.format(extra=cpuinfo_flags), encoding="utf-8")
        monkeypatch.setattr(precision, "CPUINFO", str(path))
        cpu_native_bf16.cache_clear()

    yield set_cpu
    cpu_native_bf16.cache_clear()


NOT_NATIVE = {"avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}


@pytest.mark.parametrize(
    ("capabilities", "cpuinfo_flags", "native"),
    [
        ({**NOT_NATIVE, "avx512_bf16": True}, "", True),  # torch sees AVX512-BF16
        ({**NOT_NATIVE, "amx_bf16": True}, "", True),  # torch sees AMX-BF16
        (NOT_NATIVE, "avx512_bf16 amx_bf16", False),  # torch's answer wins over the file
        (None, "avx512_bf16", True),  # an older torch: /proc/cpuinfo decides
        (None, "amx_tile amx_bf16", True),
        (None, "avx512_vnni", False),
        (None, None, False),  # nothing to tell: float32
        ({"avx2": True}, "avx512_bf16", True),  # torch does not know the features: the file decides
    ],
)
def test_auto_dtype_on_cpu_follows_native_bf16(detect, capabilities, cpuinfo_flags, native) -> None:
    detect(capabilities, cpuinfo_flags)
    assert cpu_native_bf16() is native
    expected = torch.bfloat16 if native else None
    assert autocast_dtype("auto", CPU) == expected
    auto = Precision("auto", CPU)
    assert auto.dtype == expected and str(auto) == str(expected or torch.float32)
    assert not auto.scaler.is_enabled()  # bfloat16 needs no loss scaling
    # explicit choices are taken as given, whatever the CPU
    assert autocast_dtype("float32", CPU) is None
    assert autocast_dtype("bfloat16", CPU) == torch.bfloat16
    # mps never gets bfloat16 from auto
    assert autocast_dtype("auto", torch.device("mps")) is None


def test_a_failing_torch_probe_falls_back_to_cpuinfo(detect, monkeypatch: pytest.MonkeyPatch) -> None:
    detect({}, "avx512_bf16")

    def broken() -> dict:
        raise RuntimeError("cpuinfo failed")

    monkeypatch.setattr(torch.cpu, "get_capabilities", broken, raising=False)
    cpu_native_bf16.cache_clear()
    assert cpu_native_bf16() is True and autocast_dtype("auto", CPU) == torch.bfloat16


TINY_MODEL = {"n_layer": 1, "n_head": 2, "d_model": 32, "context_length": 32}


def run_config(data: Path, **train) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": TINY_MODEL,
            "optim": {"lr": 1e-2, "warmup_steps": 2},
            "train": {"max_steps": 30, "batch_size": 8, "eval_every": 30, "save_every": 30, "log_every": 1}
            | {"eval_tokens": 256, "device": "cpu"}
            | train,
            "data": {"dir": str(data)},
        }
    )


def test_a_bfloat16_cpu_run_trains(tiny_data: Path, in_tmp: Path) -> None:
    trainer = Trainer(run_config(tiny_data, dtype="bfloat16"), "models/bf16")
    assert trainer.precision.dtype == torch.bfloat16
    seen: list[torch.dtype] = []
    trainer.model.lm_head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    result = trainer.run()
    assert seen and set(seen) == {torch.bfloat16}  # the matmuls really ran in bfloat16
    losses = [r["train_loss"] for r in read_metrics("models/bf16") if "train_loss" in r]
    assert len(losses) == 30 and all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)  # from ~ln(1024) = 6.9 down by more than a nat
    assert result.val_loss is not None and result.val_loss < losses[0]
    # the weights stay float32 (autocast, not a bf16 model), so checkpoints are as in a float32 run
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_compiled_run_does_not_recompile_for_evaluation_or_saves(
    tiny_data: Path, in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch._dynamo

    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        # dynamo's tracing and guards (what decides recompiles), without inductor's code generation, which
        # would take a minute on CPU
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)  # a recompile fails the run
    torch._dynamo.reset()
    try:
        cfg = run_config(tiny_data, max_steps=6, eval_every=2, save_every=2, compile=True)
        trainer = Trainer(cfg, "models/compiled")
        assert trainer.net is not trainer.model  # the steps call the compiled module
        result = trainer.run()  # an evaluation and a save after every second compiled step
        assert result.step == 6 and result.val_loss is not None
        assert graphs, "nothing was compiled"
        records = read_metrics("models/compiled")
        assert [r["step"] for r in records if "val_loss" in r] == [2, 4, 6]
        assert (Path("models/compiled/latest") / "checkpoint.json").is_file()
        # the check can fail: evaluating through the compiled module (eval mode, no grad) would recompile
        x = torch.randint(0, 1024, (8, 32))
        with pytest.raises(Exception, match="[Rr]ecompil"), torch.no_grad():
            trainer.model.eval()
            trainer.net(x, x)
    finally:
        torch._dynamo.reset()
