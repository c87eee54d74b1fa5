"""What a checkpoint carries of a run besides the weights, captured from a Trainer and restored into one.

checkpoint.py owns the file format (trainer_state.pt, checkpoint.json); this module owns their content for a
training run: the counters (step, tokens seen, elapsed time, best val loss), the optimizer state (both
optimizers' with Muon), the lr schedule's re-warm, the loss-scaler state, the loader's position and every rank's
RNG states, so that a resumed run continues the run it resumes (the same data order and, on the same process
count, the same dropout masks, the same lr: a resume whose settings would make it jump is refused or re-warmed).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from talm.errors import TalmError
from talm.train import dist
from talm.train.checkpoint import TRAINER_STATE, load_trainer_state, load_weights, read_meta, save_checkpoint
from talm.train.optim import load_optimizer_state, multiplier, rewarm_segment, rewarmed
from talm.train.rundir import OTHER_NAME, TOKENIZER_FILE

if TYPE_CHECKING:
    from talm.train.loop import Trainer


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save(trainer: Trainer, which: str, val: tuple[float, float | None] | None = None) -> None:
    """Write models/NAME/<which> (every rank takes part: each contributes its RNG state). A failed save (a
    full disk) is one line on rank 0, the previous checkpoint kept; the other ranks stop with it."""
    tr = trainer
    rngs = dist.all_gather_objects({k: v.cpu() for k, v in rng_state(tr.device).items()})

    def write() -> None:
        scaler = tr.precision.scaler
        state = {
            "step": tr.step,
            "tokens_seen": tr.tokens_seen,
            "elapsed": tr.now(),
            "best_val_loss": tr.best_val_loss,
            "optimizer": tr.optimizer.state_dict(),
            "lr_segment": tr.lr_segment or {},
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "loader": tr.loader.state_dict(),
            "rng": rngs,
        }
        meta = {
            "step": tr.step,
            "tokens_seen": tr.tokens_seen,
            "config": tr.cfg.model_dump(mode="json"),
            "tokenizer": {"file": TOKENIZER_FILE, "fingerprint": tr.tokenizer.fingerprint},
            "val_loss": val[0] if val else None,
            "val_bpb": val[1] if val else None,
        }
        save_checkpoint(tr.model_dir / which, tr.model, meta, state)

    dist.on_main(write, tr.ctx)


def restore(trainer: Trainer, checkpoint_dir: Path) -> None:
    """Load a checkpoint's weights and trainer state into a freshly built Trainer; TalmError (one line) if the
    checkpoint does not belong to this run's tokenizer or model."""
    tr = trainer
    meta = read_meta(checkpoint_dir)
    trained_with = meta["tokenizer"]["fingerprint"]
    if trained_with != tr.tokenizer.fingerprint:
        raise TalmError(
            f"{str(tr.model_dir)!r} was trained with another tokenizer than {str(tr.data.dir)!r} was made "
            "with: resume it on data made with its tokenizer.json, or pick a new --model-name"
        )
    load_weights(tr.model, checkpoint_dir, tr.device)
    state = load_trainer_state(checkpoint_dir)
    try:
        load_optimizer_state(tr.optimizer, state["optimizer"])
    except (ValueError, KeyError, TypeError) as err:
        raise TalmError(
            f"cannot resume from {str(checkpoint_dir / TRAINER_STATE)!r}: its optimizer state does not fit "
            f"this model ({err}): pass --restart to start over, or {OTHER_NAME}"
        ) from None
    # The lr must not jump: refused, or re-warmed (--optim.rewarm), when the settings changed the schedule.
    segment, note = rewarm_segment(
        meta["config"],
        tr.cfg.optim,
        tr.cfg.train.max_steps,
        int(state["step"]),
        state.get("lr_segment") or None,
    )
    if note:
        dist.print0(note, ctx=tr.ctx)
    tr.lr_segment = segment
    tr.lr_mult = rewarmed(
        multiplier(tr.cfg.optim, tr.cfg.train.max_steps), segment, tr.cfg.optim.warmup_steps
    )
    if state.get("scaler"):
        tr.precision.scaler.load_state_dict(state["scaler"])
    tr.loader.load_state_dict(state["loader"])
    tr.step, tr.tokens_seen = int(state["step"]), int(state["tokens_seen"])
    tr.elapsed = float(state["elapsed"])
    tr.best_val_loss = float(state["best_val_loss"])
    rngs = state["rng"]
    if len(rngs) == tr.ctx.world_size:
        set_rng_state(rngs[tr.ctx.rank], tr.device)
    else:  # another process count: the data order is unchanged, only dropout's randomness is reseeded
        torch.manual_seed(tr.cfg.train.seed + tr.step + tr.ctx.rank)
