"""What a resume may change (talm.train.resume): every config field has a decision; a raised peak lr is refused
unless re-warmed; another process count keeps the run's global batch by gradient accumulation, or is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from talm.config import validate
from talm.errors import TalmError
from talm.train import resume
from talm.train.config import RunConfig
from talm.train.loop import Trainer
from talm.train.metrics import read_metrics
from talm.train.run import resolve_run, train

MUON_UNTIED = {
    "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "context_length": 32, "tie_embeddings": False},
    "optim": {"name": "muon", "lr": 1e-3, "muon_lr": 0.01, "embedding_lr": 0.05, "warmup_steps": 4}
    | {"schedule": "wsd", "decay_fraction": 0.0},  # flat after warmup: only the peaks change the lr
    "train": {"max_steps": 4, "batch_size": 4, "eval_every": 100, "save_every": 100, "log_every": 1}
    | {"eval_tokens": 256, "device": "cpu"},
}


def saved(cfg: dict[str, Any], *, processes: int = 1, step: int = 2) -> tuple[dict, dict]:
    """checkpoint.json and the trainer state as a run of `cfg` on `processes` processes saves them at `step`."""
    run = validate(RunConfig, cfg)
    t = run.train
    tokens_per_step = t.tokens_per_step or t.batch_size * run.model.context_length * processes
    meta = {"config": run.model_dump(mode="json"), "tokens_per_step": tokens_per_step}
    state = {"step": step, "tokens_seen": step * tokens_per_step, "rng": [{}] * processes}
    return meta, state


def plan(
    old: dict, new: dict, *, world_size: int = 1, processes: int = 1
) -> tuple[RunConfig, resume.ResumePlan]:
    cfg = validate(RunConfig, new)
    return cfg, resume.plan_resume(
        *saved(old, processes=processes), cfg, world_size=world_size, model_dir=Path("models/m")
    )


def changed(cfg: dict, section: str, **values: Any) -> dict:
    return cfg | {section: cfg[section] | values}


@pytest.mark.parametrize("name", resume.config_fields())
def test_every_config_field_has_a_resume_decision(name: str) -> None:
    decision, _ = resume.POLICY[name]  # a field added without a decision fails here
    kinds = (resume.SILENT, resume.NOTE, resume.ARCH, resume.REFUSED, resume.KEPT, resume.PEAK)
    assert decision in (*kinds, resume.SCHEDULE, resume.BATCH)


def test_a_field_without_a_decision_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(resume.POLICY, "train.eval_every")
    with pytest.raises(
        TalmError,
        match=r"train.eval_every 100 -> 7 is not supported .*keep --train.eval_every 100, or pass --restart",
    ):
        plan(MUON_UNTIED, changed(MUON_UNTIED, "train", eval_every=7))
    assert plan(MUON_UNTIED, MUON_UNTIED)[1].notes == []  # unchanged: nothing to decide


@pytest.mark.parametrize("peak", ["lr", "muon_lr", "embedding_lr"])
def test_a_10x_peak_lr_raise_is_refused_without_rewarm(peak: str) -> None:
    raised = changed(MUON_UNTIED, "optim", **{peak: 10 * MUON_UNTIED["optim"][peak]})
    with pytest.raises(TalmError) as err:
        plan(MUON_UNTIED, raised)
    msg = str(err.value)
    assert "\n" not in msg and f"optim.{peak} " in msg and "10x at once" in msg
    assert f"keep --optim.{peak} " in msg and "--optim.rewarm" in msg and "--restart" in msg
    # re-warmed: accepted, every group starting at the lr it had (step 1 of a 4-step warmup: half its peak)
    cfg, p = plan(MUON_UNTIED, changed(raised, "optim", rewarm=True))
    assert p.lr_segment is not None and p.lr_segment["step"] == 2
    assert any("re-warming" in n for n in p.notes)
    old, new = resume.peaks(validate(RunConfig, MUON_UNTIED).optim), resume.peaks(cfg.optim)
    assert {k: new[k] * p.lr_segment["from"][k] for k in new} == pytest.approx({k: old[k] * 0.5 for k in old})


def test_a_lower_peak_is_said_and_a_rewarm_without_warmup_refused() -> None:
    _, p = plan(MUON_UNTIED, changed(MUON_UNTIED, "optim", lr=5e-4))
    assert p.notes == ["optim.lr 0.001 -> 0.0005: lowered at once"] and p.lr_segment is None
    no_warmup = changed(MUON_UNTIED, "optim", warmup_steps=0)
    with pytest.raises(
        TalmError, match=r"--optim.rewarm warms optim.lr .* which is 0: set --optim.warmup_steps"
    ):
        plan(no_warmup, changed(no_warmup, "optim", lr=1e-2, rewarm=True))


def test_muon_lr_of_an_adamw_run_is_unused() -> None:
    adamw = changed(MUON_UNTIED, "optim", name="adamw")
    assert plan(adamw, changed(adamw, "optim", muon_lr=1.0))[1].lr_segment is None


def test_two_processes_resumed_on_one_keep_the_global_batch() -> None:
    """A run of 2 processes x 4 x 32 (256 tokens per step, tokens_per_step unset) resumed on 1 process: 2
    micro-steps keep its 256 tokens per step; on 3 processes 256 is not a multiple of 4 x 32 x 3: refused."""
    cfg, p = plan(MUON_UNTIED, MUON_UNTIED, world_size=1, processes=2)
    assert cfg.train.tokens_per_step == 256
    assert p.notes == [
        "1 process(es) of 4 sequences (the run had 2 of 4): 2 micro-step(s) per step keep its 256 tokens per "
        "step (--train.tokens_per_step 256)"
    ]
    with pytest.raises(
        TalmError, match=r"on 3 process\(es\) \(the run had 2\) cannot keep its 256 tokens"
    ) as err:
        plan(MUON_UNTIED, MUON_UNTIED, world_size=3, processes=2)
    assert "--train.batch_size" in str(err.value) and "--restart" in str(err.value)
    with pytest.raises(TalmError, match=r"tokens_per_step None -> 512 would change the run's global batch"):
        plan(MUON_UNTIED, changed(MUON_UNTIED, "train", tokens_per_step=512))
    cfg, p = plan(
        MUON_UNTIED, changed(MUON_UNTIED, "train", batch_size=2)
    )  # a smaller micro-batch: 2 of them
    assert cfg.train.tokens_per_step == 128 and "2 micro-step(s) per step keep its 128 tokens" in p.notes[0]


def test_a_schedule_change_without_a_jump_is_said() -> None:
    _, p = plan(MUON_UNTIED, changed(MUON_UNTIED, "optim", min_lr_ratio=0.0))  # flat until max_steps anyway
    assert p.notes == [
        "optim.min_lr_ratio 0.1 -> 0.0: the lr follows the new schedule from here (it does not jump)"
    ]
    assert plan(MUON_UNTIED, changed(MUON_UNTIED, "train", max_steps=8))[1].notes == []  # extended: silent


def test_a_checkpoint_without_tokens_per_step_gives_it_by_its_processes() -> None:
    meta, state = saved(MUON_UNTIED, processes=2)
    del meta["tokens_per_step"]  # as talm wrote checkpoint.json before it recorded the global batch
    cfg = validate(RunConfig, MUON_UNTIED)
    resume.plan_resume(meta, state, cfg, world_size=1, model_dir=Path("models/m"))
    assert cfg.train.tokens_per_step == 256  # 4 x 32 on each of the 2 processes its RNG states count


def test_architecture_optimizer_and_kept_fields() -> None:
    with pytest.raises(TalmError, match=r"another architecture \(n_layer 1 -> 2, d_model 32 -> 64\)"):
        plan(MUON_UNTIED, changed(MUON_UNTIED, "model", n_layer=2, d_model=64))
    with pytest.raises(
        TalmError, match=r"optim.name muon -> adamw .*: keep --optim.name muon, or pass --restart"
    ):
        plan(MUON_UNTIED, changed(MUON_UNTIED, "optim", name="adamw"))
    cfg, p = plan(MUON_UNTIED, changed(MUON_UNTIED, "train", seed=5))
    assert cfg.train.seed == 1337 and p.notes[0].startswith("train.seed 5 ignored")
    cfg, p = plan(MUON_UNTIED, changed(MUON_UNTIED, "model", dropout=0.1))
    assert cfg.model.dropout == 0.1 and p.notes[0].startswith("model.dropout 0.0 -> 0.1: ")


# ------------------------------------------------------------------------------------------- through the trainer


def test_a_raised_peak_through_the_trainer_is_refused_then_rewarmed(tiny_data: Path, in_tmp: Path) -> None:
    first = MUON_UNTIED | {"data": {"dir": str(tiny_data)}}
    train(validate(RunConfig, first), in_tmp / "m")
    raised = {"optim": {"lr": 1e-2}, "train": {"max_steps": 10}}
    cfg, resume_from = resolve_run(in_tmp / "m", [raised])
    with pytest.raises(TalmError, match=r"optim.lr 0.001 -> 0.01 would raise that lr 10x at once"):
        Trainer(cfg, in_tmp / "m", resume_from=resume_from)
    cfg, resume_from = resolve_run(in_tmp / "m", [raised | {"optim": {"lr": 1e-2, "rewarm": True}}])
    train(cfg, in_tmp / "m", resume_from=resume_from)
    lr = {r["step"]: r["lr"] for r in read_metrics(in_tmp / "m") if "lr" in r}  # step k: the lr of step k-1
    assert sorted(lr) == list(range(1, 11)) and lr[4] == pytest.approx(1e-3)
    assert [lr[s] for s in range(5, 11)] == pytest.approx(
        [1e-3 + 9e-3 * k / 4 for k in (1, 2, 3, 4)] + [1e-2] * 2
    )
