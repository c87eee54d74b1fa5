"""benchmarks/gpu_check.py, the one command a session lent a GPU runs first: its dry run on CPU goes through every
step (the trainer in-process and as `train_model` under python and torchrun, DDP and FSDP, generation, export)
and writes the summary. On CPU only float16 is skipped (it needs CUDA)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_the_dry_run_passes_every_step_and_writes_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclasses look their module up there
    spec.loader.exec_module(gpu_check)
    code = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {r["step"]: r for r in report["rows"]}
    assert code == 0, [(r["step"], r["note"]) for r in report["rows"] if r["status"] == "FAIL"]
    assert {name for name, r in rows.items() if r["status"] != "ok"} == {"trainer fp16 + GradScaler"}
    assert all(
        rows[f"throughput {k}"]["figures"]["tokens_per_s"] > 0 for k in ("eager", "compile DDP torchrun")
    )
    assert rows["export to transformers: equal logits"]["figures"]["max_diff"] == "0.0e+00"
    assert "| throughput compile FSDP torchrun | ok |" in (tmp_path / "gpu_check.md").read_text()
