"""The run directory models/NAME: its name, what a run keeps in it, and the rules for touching it.

A run writes `latest/` and `best/` (checkpoints), metrics.jsonl, loss.png, tokenizer.json and the trackers'
files into models/NAME, and `evaluate` its scores (evals/): `RUN_OUTPUTS` lists them. This module is the one place that knows that layout and guards it:

- `model_dir_for` turns a --model-name into models/NAME, refusing anything but a plain name (no path escapes);
- `resume_point` says which checkpoint a run continues from (latest/, else best/), and refuses a directory that
  holds an earlier run but nothing to resume it from: its traces are never wiped without --restart;
- `take` (rank 0, before anything is written) checks the directory can be written, locks it for the whole run,
  undoes an interrupted checkpoint save and sweeps stale temporaries;
- `prepare` (rank 0, once everything is validated) deletes an earlier run for --restart, copies the tokenizer
  and, on resume, drops the metrics past the checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from talm.errors import TalmError
from talm.eval.runner import EVALS_DIR
from talm.files import (
    PLAIN_NAME_RULE,
    RunLock,
    aside_path,
    check_writable_dir,
    is_plain_name,
    sweep_stale_temps,
    write_file,
)
from talm.train.checkpoint import TRAINER_STATE, is_checkpoint, read_meta, recover_interrupted_save
from talm.train.metrics import truncate_after

MODELS_ROOT = Path("models")  # where train_model writes models/NAME, relative to the working directory
TOKENIZER_FILE = "tokenizer.json"
# Everything talm writes into models/NAME that describes a run, beside tokenizer.json (rewritten by every fresh
# start): the checkpoints, the metrics and the plot drawn from them, `evaluate`'s scores (evals/), the trackers'
# files (wandb/ is W&B's local directory, as WandbSink sets it). What --restart deletes, and a trace of an
# earlier run; nothing else in models/NAME is touched.
RUN_OUTPUTS = (
    "latest",
    "best",
    "metrics.jsonl",
    "loss.png",
    EVALS_DIR,
    "tensorboard",
    "wandb_run_id",
    "wandb",
)
OTHER_NAME = "pick another --model-name"


def model_dir_for(name: str) -> Path:
    """models/NAME for a --model-name; TalmError for anything but a plain name (a path could escape models/)."""
    if not is_plain_name(name):
        raise TalmError(
            f"model name {name!r} is not a plain name (the run is written to models/NAME): {PLAIN_NAME_RULE}"
        )
    return MODELS_ROOT / name


def run_traces(model_dir: Path) -> list[str]:
    """What an earlier run left in models/NAME (checkpoints, metrics, logs): what --restart would delete."""
    found = []
    for name in RUN_OUTPUTS:
        p = model_dir / name
        if not (p.exists() or p.is_symlink()):
            continue
        if name == "latest" and p.is_dir() and not any(p.iterdir()):
            continue  # an empty latest/ holds nothing to lose
        if name == "metrics.jsonl" and p.is_file() and p.stat().st_size == 0:
            continue
        found.append(name + ("/" if p.is_dir() else ""))
    return found


def is_resumable(path: Path) -> bool:
    """A full checkpoint: weights, checkpoint.json and the trainer state a run continues from."""
    return is_checkpoint(path) and (path / TRAINER_STATE).is_file()


def refuse_to_wipe(model_dir: Path, traces: list[str]) -> TalmError:
    return TalmError(
        f"{str(model_dir)!r} holds an earlier run ({', '.join(traces)}) but no checkpoint to resume it from "
        f"(latest/ is missing or incomplete and best/ is not a full checkpoint): pass --restart to delete it and "
        f"start over, or {OTHER_NAME}"
    )


def check_fresh_start(model_dir: Path) -> None:
    """A run starting fresh without --restart: TalmError if models/NAME holds an earlier run it would wipe."""
    if model_dir.is_dir():
        traces = run_traces(model_dir)
        if traces:
            raise refuse_to_wipe(model_dir, traces)


RESUME_CHOICES = ("latest", "best")


def check_resume_choice(which: str, restart: bool) -> None:
    """--resume-from is latest or best, and best does not go with --restart (which resumes nothing)."""
    if which not in RESUME_CHOICES:
        raise TalmError(f"--resume-from {which!r} is not one of {', '.join(RESUME_CHOICES)}")
    if which == "best" and restart:
        raise TalmError("--resume-from best and --restart contradict each other: drop one of them")


def resume_point(model_dir: Path, *, probe: bool = False, which: str = "latest") -> Path | None:
    """The checkpoint a run without --restart continues from: latest/, else best/ if an earlier run left traces;
    None for a directory without any. TalmError (the choices spelled out) if there are traces but nothing to
    resume. `probe`: before the run holds the directory's lock, also look at a checkpoint an interrupted save
    moved aside, and never refuse (the decision is taken again under the lock). `which` "best" (--resume-from
    best) resumes from best/, rewinding the run to its step; TalmError if best/ cannot be resumed."""
    if which == "best":
        best = model_dir / "best"
        if is_resumable(best) or (probe and is_resumable(aside_path(best))):
            return best if is_resumable(best) else aside_path(best)
        raise TalmError(
            f"{str(model_dir)!r} has no resumable best checkpoint (best/ is written at each new best evaluation, "
            "with the trainer state): resume from latest (drop --resume-from best), or pass --restart"
        )
    latest = model_dir / "latest"
    if is_checkpoint(latest):
        return latest
    if probe and is_checkpoint(aside_path(latest)):
        return aside_path(latest)
    traces = run_traces(model_dir)
    if not traces:
        return None
    if is_resumable(model_dir / "best"):
        return model_dir / "best"
    if probe:
        return None
    raise refuse_to_wipe(model_dir, traces)


def damaged_fix(model_dir: Path, damaged_file: Path) -> str:
    """train_model's way out of a damaged checkpoint file (`talm.train.checkpoint.DamagedCheckpoint`), in its own
    flags, by which checkpoint the file belongs to: latest/, best/, or the --init-from source."""
    try:
        which = Path(os.path.abspath(damaged_file)).relative_to(os.path.abspath(model_dir)).parts[0]
    except (ValueError, IndexError):  # outside models/NAME: the --init-from source
        return "the checkpoint is damaged: pass an intact checkpoint to --init-from (its best/, say)"
    other = "latest" if which.lstrip(".").startswith("best") else "best"  # .best.old: best/ moved aside
    if not is_resumable(model_dir / other):
        return (
            f"the checkpoint is damaged and {other}/ cannot be resumed either: start the run over (--restart)"
        )
    if other == "latest":
        return "the checkpoint is damaged: resume from latest/ (without --resume-from best), or start over (--restart)"
    return "the checkpoint is damaged: resume from best/ (--resume-from best), or start over (--restart)"


def diverged(model_dir: Path, at: str) -> TalmError:
    """The run diverged (`at`: the step and the loss or gradient norm): say which checkpoint a rerun resumes
    from, if one was saved (it was written before the divergence, and a load checks its values are finite)."""
    fix = "lower --optim.lr or raise --optim.warmup_steps, then"
    try:
        point = resume_point(model_dir)
        step = read_meta(point)["step"] if point is not None else None
    except TalmError:  # no checkpoint to resume, or a damaged one
        point = step = None
    if point is None:
        return TalmError(
            f"training diverged at {at}, before any checkpoint was saved: {fix} rerun with --restart"
        )
    return TalmError(
        f"training diverged at {at}; the checkpoint of step {step} is kept in {str(point)!r}: {fix} rerun the same "
        "command to resume from it (or pass --restart)"
    )


def run_lock(model_dir: Path) -> RunLock:
    """The lock a training run holds on models/NAME from before its first write to its end."""
    return RunLock(
        model_dir, "train_model", instead=f"wait for it to finish or stop it (Ctrl-C), or {OTHER_NAME}"
    )


def lock_run_dir(model_dir: Path, lock: RunLock) -> None:
    """Rank 0, before anything is written: check models/NAME can be written, lock it, then (no other run can
    be writing) undo an interrupted checkpoint save and sweep the temporaries crashed writers left."""
    check_writable_dir(model_dir, instead=OTHER_NAME)
    lock.acquire()
    for which in ("latest", "best"):
        recover_interrupted_save(model_dir / which)
    sweep_stale_temps(model_dir)
    for name in ("latest", "best", "tensorboard"):
        p = model_dir / name
        if p.exists() or p.is_symlink():
            check_writable_dir(p, instead=OTHER_NAME)
    for name in ("metrics.jsonl", TOKENIZER_FILE, "loss.png", "wandb_run_id"):
        if (model_dir / name).is_dir():
            raise TalmError(
                f"{str(model_dir / name)!r} is a directory, where the run writes a file: move it away or "
                f"{OTHER_NAME}"
            )


def reset_run_dir(model_dir: Path, *, tokenizer_file: Path, resumed_at: int | None) -> None:
    """Rank 0, once everything is validated: a fresh start (`resumed_at` None, allowed by --restart or an empty
    directory) deletes the earlier run's outputs; copy the tokenizer; on resume, drop metrics past the step."""
    if resumed_at is None:
        # Everything a run derives from its metrics goes too, so no stale curve outlives a restart.
        for name in RUN_OUTPUTS:
            p = model_dir / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    model_dir.mkdir(parents=True, exist_ok=True)
    tok_copy = model_dir / TOKENIZER_FILE
    if resumed_at is None or not tok_copy.is_file():
        write_file(tok_copy, Path(tokenizer_file).read_bytes())
    if resumed_at is not None:
        truncate_after(model_dir, resumed_at)
