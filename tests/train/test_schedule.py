"""The warmup-stable-decay schedule, and what raising --max-steps (or changing the schedule) does to the lr on
resume: seamless where the schedules agree, otherwise refused with the choices or, with --optim.rewarm, warmed
up from the lr the run had, never faster than warmup."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_resume import stop_after

import talm.train.loop as trainer_module  # the module whose loop looks up StopRequest
from talm.config import validate
from talm.errors import TalmError
from talm.train.checkpoint import read_meta
from talm.train.config import PRESETS, OptimConfig, RunConfig
from talm.train.loop import Trainer
from talm.train.metrics import read_metrics
from talm.train.optim import lr_at, multiplier
from talm.train.resume import rewarm_segment
from talm.train.run import resolve_run, train


def test_wsd_matches_hand_computed_values() -> None:
    # warmup 10, max 100, decay over the last 0.2 * 100 = 20 steps (80 -> 100) from 1.0 to 0.1
    kw = {"max_lr": 1.0, "warmup_steps": 10, "max_steps": 100, "min_lr": 0.1, "shape": "wsd"}
    assert lr_at(0, **kw) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_at(4, **kw) == pytest.approx(0.5)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == lr_at(50, **kw) == lr_at(80, **kw) == 1.0  # stable, decay starts at 80
    assert lr_at(81, **kw) == pytest.approx(1.0 - 0.9 / 20)
    assert lr_at(90, **kw) == pytest.approx(0.55)  # halfway down
    assert lr_at(99, **kw) == pytest.approx(1.0 - 0.9 * 19 / 20)
    assert lr_at(100, **kw) == lr_at(10_000, **kw) == pytest.approx(0.1)
    assert lr_at(50, **(kw | {"decay_fraction": 0.5})) == 1.0
    assert lr_at(75, **(kw | {"decay_fraction": 0.5})) == pytest.approx(0.55)
    assert lr_at(99, **(kw | {"decay_fraction": 0.0})) == 1.0  # no decay: the floor only from max_steps
    # the decay overlapping the warmup: the lower of the two (a triangle)
    tri = {"max_lr": 1.0, "warmup_steps": 10, "max_steps": 10, "min_lr": 0.0, "shape": "wsd"}
    assert lr_at(0, **tri | {"decay_fraction": 1.0}) == pytest.approx(0.1)
    assert lr_at(7, **tri | {"decay_fraction": 1.0}) == pytest.approx(0.3)  # min(0.8, 1 - 7/10)


def test_multiplier_scales_every_peak_alike() -> None:
    cfg = OptimConfig(schedule="wsd", lr=2e-3, warmup_steps=4, min_lr_ratio=0.0, decay_fraction=0.5)
    mult = multiplier(cfg, 20)
    assert [mult(s) for s in (0, 3, 9, 10, 15, 20)] == pytest.approx([0.25, 1.0, 1.0, 1.0, 0.5, 0.0])


def saved(optim: dict[str, Any], max_steps: int) -> dict[str, Any]:
    return {"optim": OptimConfig(**optim).model_dump(mode="json"), "train": {"max_steps": max_steps}}


def test_extending_a_wsd_run_before_its_decay_is_seamless() -> None:
    o = {"schedule": "wsd", "warmup_steps": 30, "decay_fraction": 0.2}
    for step in (
        10,
        300,
        480,
    ):  # in warmup, stable, the first step of the decay (600 - 120) still at the peak
        assert rewarm_segment(saved(o, 600), OptimConfig(**o), 1200, step, None) == (None, None)
    old, new = multiplier(OptimConfig(**o), 600), multiplier(OptimConfig(**o), 1200)
    assert all(old(s) == new(s) for s in range(0, 481))  # the schedule is the same function up to the decay


@pytest.mark.parametrize(
    ("optim", "step"),
    [({"schedule": "wsd"}, 500), ({"schedule": "wsd"}, 600), ({"schedule": "cosine"}, 300), ({}, 600)],
)
def test_extending_after_the_decay_began_is_refused_with_the_choices(optim: dict, step: int) -> None:
    o = PRESETS["tiny"]["optim"] | optim
    with pytest.raises(TalmError) as err:
        rewarm_segment(saved(o, 600), OptimConfig(**o), 1200, step, None)
    msg = str(err.value)
    assert "\n" not in msg and "max_steps 600 -> 1200" in msg
    assert "keep --max-steps 600" in msg and "--optim.rewarm" in msg and "--restart" in msg


def test_the_old_cosine_tiny_preset_extended_600_to_1200_would_jump_5_7x() -> None:
    # the tiny preset before issue 10
    cosine = {"name": "adamw", "schedule": "cosine", "lr": 3e-3, "warmup_steps": 30, "min_lr_ratio": 0.1}
    o = OptimConfig(**cosine)
    old, new = multiplier(o, 600), multiplier(o, 1200)
    assert new(600) / old(599) == pytest.approx(5.7, abs=0.05)  # what the refusal prevents
    with pytest.raises(TalmError, match=r"from 0.0003 to 0.0017 at once"):
        rewarm_segment(saved(cosine, 600), o, 1200, 600, None)


def test_a_lower_lr_or_a_shorter_run_resumes_as_is() -> None:
    o = {"schedule": "wsd", "warmup_steps": 10}
    assert rewarm_segment(saved(o, 1000), OptimConfig(**o), 500, 450, None) == (None, None)  # decays now
    assert rewarm_segment(saved({}, 1000), OptimConfig(min_lr_ratio=0.0), 1000, 900, None) == (None, None)


# ------------------------------------------------------------------------------------------- through the trainer


def layer(data: Path, max_steps: int, **optim: Any) -> dict[str, Any]:
    return {
        "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "context_length": 32},
        "optim": {"lr": 3e-3, "warmup_steps": 4, "min_lr_ratio": 0.1} | optim,
        "train": {"max_steps": max_steps, "batch_size": 4, "eval_every": 100, "save_every": 100}
        | {"log_every": 1, "eval_tokens": 256, "device": "cpu"},
        "data": {"dir": str(data)},
    }


def lrs(model_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(model_dir) if "lr" in r}


def test_extending_a_finished_cosine_run_is_refused_before_anything_changes(
    tiny_data: Path, in_tmp: Path
) -> None:
    train(validate(RunConfig, layer(tiny_data, 12)), in_tmp / "m")
    before = {p: p.read_bytes() for p in sorted((in_tmp / "m").rglob("*")) if p.is_file()}
    cfg, resume_from = resolve_run(in_tmp / "m", [layer(tiny_data, 24)])
    with pytest.raises(TalmError, match=r"resuming at step 12 with max_steps 12 -> 24 would raise the lr"):
        Trainer(cfg, in_tmp / "m", resume_from=resume_from)
    assert {p: p.read_bytes() for p in sorted((in_tmp / "m").rglob("*")) if p.is_file()} == before


def test_rewarm_climbs_no_faster_than_warmup(tiny_data: Path, in_tmp: Path) -> None:
    """A finished 12-step cosine run extended to 40 with --optim.rewarm: from step 12 the lr climbs from where it
    was to the new schedule over warmup_steps (4) steps, each step rising by at most lr/4 (what warmup does),
    then follows the new schedule."""
    train(validate(RunConfig, layer(tiny_data, 12)), in_tmp / "m")
    cfg, resume_from = resolve_run(in_tmp / "m", [layer(tiny_data, 40, rewarm=True)])
    train(cfg, in_tmp / "m", resume_from=resume_from)

    lr = lrs(in_tmp / "m")  # step k's record: the lr of 0-based step k-1
    assert sorted(lr) == list(range(1, 41))
    peak = 3e-3
    rises = [lr[s + 1] - lr[s] for s in range(1, 40)]
    assert max(rises) <= peak / 4 * (1 + 1e-9)  # never faster than warmup (peak / warmup_steps per step)
    old_last, new = lr[12], multiplier(cfg.optim, 40)
    assert old_last == pytest.approx(peak * multiplier(cfg.optim, 12)(11))
    for k in range(4):  # steps 12..15 (records 13..16): the ramp toward the 40-step schedule
        target = peak * new(12 + k)
        assert lr[13 + k] == pytest.approx(old_last + (target - old_last) * (k + 1) / 4, rel=1e-9)
    assert all(
        lr[s + 1] == pytest.approx(peak * new(s), rel=1e-12) for s in range(16, 40)
    )  # then the schedule


def test_a_rewarm_interrupted_midway_resumes_on_the_same_ramp(
    tiny_data: Path, in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-warm begun at step 12 is saved with the run: stopped at step 14 (Ctrl-C) and resumed with the same
    settings, the lr continues the same ramp, as a run that was not stopped."""
    train(validate(RunConfig, layer(tiny_data, 12)), in_tmp / "a")
    cfg, resume_from = resolve_run(in_tmp / "a", [layer(tiny_data, 30, rewarm=True)])
    train(cfg, in_tmp / "a", resume_from=resume_from)

    train(validate(RunConfig, layer(tiny_data, 12)), in_tmp / "b")
    cfg, resume_from = resolve_run(in_tmp / "b", [layer(tiny_data, 30, rewarm=True)])
    monkeypatch.setattr(trainer_module, "StopRequest", stop_after(2))
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, in_tmp / "b", resume_from=resume_from).run()
    monkeypatch.undo()
    assert read_meta(in_tmp / "b" / "latest")["step"] == 14
    cfg, resume_from = resolve_run(in_tmp / "b", [layer(tiny_data, 30)])  # the same command, minus the flag
    train(cfg, in_tmp / "b", resume_from=resume_from)
    la, lb = lrs(in_tmp / "a"), lrs(in_tmp / "b")
    assert sorted(lb) == list(range(1, 31))
    assert [lb[s] for s in range(13, 31)] == pytest.approx([la[s] for s in range(13, 31)], rel=1e-12)
