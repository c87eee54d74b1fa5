"""What a checkpoint carries of a run besides the weights, captured from a Trainer and restored into one.

checkpoint.py owns the file format (trainer_state.pt, checkpoint.json); this module owns their content for a
training run: the counters (step, tokens seen, elapsed time, best val loss), the optimizer state (both
optimizers' with Muon), the lr schedule's re-warm (decided by resume.py), the loss-scaler state, the loader's position and every rank's
RNG states, so that a resumed run continues the run it resumes (the same data order and, on the same process
count, the same dropout masks, the same lr; what a resume may change is resume.py's decision).

Under FSDP each process holds shards of the weights and optimizer state: they are saved with DCP (sharded/,
see checkpoint.py) beside a model.safetensors gathered on rank 0, and any checkpoint resumes under any strategy
and process count: a sharded one through DCP (which reshards), a whole one sharded as it is loaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from talm.errors import TalmError
from talm.files import staging_dir
from talm.model.gpt import GPT
from talm.train import dist
from talm.train.checkpoint import (
    SHARDS,
    TRAINER_STATE,
    CheckpointException,
    damaged,
    first_failure,
    load_shards,
    load_trainer_state,
    load_weights,
    read_meta,
    save_checkpoint,
    save_failed,
    save_shards,
)
from talm.train.optim import (
    check_kind,
    group_multipliers,
    inner_optimizers,
    is_muon,
    keep_kernel,
    load_optimizer_state,
)
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


def save(trainer: Trainer, which: str, val: dict[str, Any] | None = None) -> None:
    """Write models/NAME/<which> (every rank takes part: each contributes its RNG state, and under FSDP its
    shards). A failed save (a full disk) is one line on rank 0, the previous checkpoint kept; the other ranks
    stop with it."""
    tr = trainer
    rngs = dist.all_gather_objects({k: v.cpu() for k, v in rng_state(tr.device).items()})
    target = tr.model_dir / which
    model: torch.nn.Module = tr.model
    staged, error, optim_state = None, None, {}
    if tr.parallel.sharded:
        model = whole_model(tr)  # on rank 0 (a collective: every rank sends its shards)
        staged, error = dist.broadcast_object(new_staging_dir(target) if tr.ctx.is_main else None)
        model_state, optim_state = get_state_dict(tr.model, inner_optimizers(tr.optimizer))
        try:
            if error is None:
                save_shards(staged / SHARDS, {"model": model_state, "optim": optim_state["state"]})
        except (Exception, CheckpointException) as err:  # noqa: BLE001 -- any rank's failure, on every rank
            error = first_failure(err)

    def write() -> None:
        if error is not None:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
            raise save_failed(target, error)
        scaler = tr.precision.scaler
        # under FSDP the optimizer's tensors are in sharded/; its hyperparameters stay here
        optimizer = {"param_groups": optim_state["param_groups"]} if staged else tr.optimizer.state_dict()
        state = {
            "step": tr.step,
            "tokens_seen": tr.tokens_seen,
            "elapsed": tr.now(),
            "best_val_loss": tr.best_val_loss,
            "optimizer": optimizer,
            "lr_segment": tr.lr_segment or {},
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "loader": tr.objective.state_dict(),
            "rng": rngs,
        }
        meta = {
            "step": tr.step,
            "tokens_seen": tr.tokens_seen,
            "tokens_per_step": tr.tokens_per_step,  # the global batch a resume keeps (resume.py)
            "config": tr.cfg.model_dump(mode="json"),
            "tokenizer": {"file": TOKENIZER_FILE, "fingerprint": tr.tokenizer.fingerprint},
            "val_loss": (val or {}).get("val_loss"),
            "val_bpb": (val or {}).get("val_bpb"),
            "scores": val or {},
        }
        save_checkpoint(target, model, meta, state, staged=staged)

    dist.on_main(write, tr.ctx)


def new_staging_dir(target: Path) -> tuple[Path | None, OSError | None]:
    """Rank 0: the staging directory every rank writes its shards into, or why it cannot be made."""
    try:
        return staging_dir(target), None
    except OSError as err:
        return None, err


def whole_model(tr: Trainer) -> torch.nn.Module:
    """The FSDP model's weights gathered into a plain GPT on rank 0's CPU (built once per run), for
    model.safetensors; every rank must call it. Other ranks get their sharded model back (they write nothing)."""
    full = get_model_state_dict(tr.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not tr.ctx.is_main:
        return tr.model
    if getattr(tr, "_whole_model", None) is None:
        tr._whole_model = GPT(tr.cfg.model)
    tr._whole_model.load_state_dict(full)
    return tr._whole_model


def load_sharded(tr: Trainer, checkpoint_dir: Path, saved_optimizer: dict[str, Any]) -> None:
    """Weights and optimizer state from a sharded checkpoint, into this run's model whatever its strategy (DCP
    reads what each process needs of the saved shards)."""
    optimizers = inner_optimizers(tr.optimizer)
    model_state, optim_state = get_state_dict(tr.model, optimizers)  # the layout to fill
    wanted = {"model": model_state, "optim": optim_state["state"]}
    groups = saved_optimizer.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise damaged(checkpoint_dir / TRAINER_STATE, "no optimizer parameter groups")
    try:
        check_kind(tr.optimizer, any(is_muon(g) for g in groups))
    except ValueError as err:
        raise optimizer_misfit(checkpoint_dir, str(err)) from None
    load_shards(checkpoint_dir / SHARDS, wanted)
    optim_state = {"state": wanted["optim"], "param_groups": groups}
    try:
        set_state_dict(tr.model, optimizers, model_state_dict=wanted["model"], optim_state_dict=optim_state)
    except (ValueError, KeyError, RuntimeError) as err:
        raise optimizer_misfit(checkpoint_dir, str(err).splitlines()[0]) from None
    keep_kernel(tr.optimizer)


def shard_whole(tr: Trainer, checkpoint_dir: Path, saved_optimizer: dict[str, Any]) -> None:
    """Weights and optimizer state from a whole (not sharded) checkpoint into an FSDP model: every process reads
    the whole and keeps its shard."""
    whole = GPT(tr.cfg.model)
    load_weights(whole, checkpoint_dir)  # its checks and one-line errors
    set_model_state_dict(tr.model, whole.state_dict(), options=StateDictOptions(full_state_dict=True))
    del whole
    try:
        check_kind(tr.optimizer, set(saved_optimizer) == {"muon", "adamw"})
        optimizers = inner_optimizers(tr.optimizer)
        saved = list(saved_optimizer.values()) if len(optimizers) == 2 else [saved_optimizer]  # Muon's first
        for opt, one in zip(optimizers, saved, strict=True):
            opt.load_state_dict(shard_state(opt, one))
    except (ValueError, KeyError, TypeError) as err:
        raise optimizer_misfit(checkpoint_dir, str(err)) from None
    keep_kernel(tr.optimizer)


def shard_state(opt: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """A whole optimizer state dict made to fit `opt`'s sharded parameters: each state tensor of a parameter's
    shape becomes a DTensor sharded as that parameter is (this process's rows, sliced locally)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    indices = [i for group in saved["param_groups"] for i in group["params"]]
    if len(params) != len(indices):
        raise ValueError(f"it has {len(indices)} parameters, this model {len(params)}")
    state = {}
    for i, p in zip(indices, params, strict=True):
        entry = dict(saved["state"].get(i, {}))
        for k, v in entry.items():
            if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape:
                entry[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        state[i] = entry
    return {"state": state, "param_groups": saved["param_groups"]}


def optimizer_misfit(checkpoint_dir: Path, why: str) -> TalmError:
    return TalmError(
        f"cannot resume from {str(checkpoint_dir)!r}: its optimizer state does not fit this model ({why}): pass "
        f"--restart to start over, or {OTHER_NAME}"
    )


def read_saved(checkpoint_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint's checkpoint.json and trainer state, read once for the resume's decisions and `restore`."""
    return read_meta(checkpoint_dir), load_trainer_state(checkpoint_dir)


def restore(trainer: Trainer, checkpoint_dir: Path, saved: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """Load a checkpoint's weights and trainer state (`saved`: `read_saved`'s) into a freshly built Trainer whose
    config resume.plan_resume has accepted; TalmError (one line) if the checkpoint does not belong to this run's
    tokenizer or model."""
    tr = trainer
    meta, state = saved
    trained_with = meta["tokenizer"]["fingerprint"]
    if trained_with != tr.tokenizer.fingerprint:
        raise TalmError(
            f"{str(tr.model_dir)!r} was trained with another tokenizer than {str(tr.data.dir)!r} was made "
            "with: resume it on data made with its tokenizer.json, or pick a new --model-name"
        )
    if (checkpoint_dir / SHARDS).is_dir():
        load_sharded(tr, checkpoint_dir, state["optimizer"])
    elif tr.parallel.sharded:
        shard_whole(tr, checkpoint_dir, state["optimizer"])
    else:
        load_weights(tr.model, checkpoint_dir, tr.device)
        try:
            load_optimizer_state(tr.optimizer, state["optimizer"])
        except (ValueError, KeyError, TypeError) as err:
            raise optimizer_misfit(checkpoint_dir / TRAINER_STATE, str(err)) from None
    tr.lr_mult = group_multipliers(tr.cfg.optim, tr.cfg.train.max_steps, tr.lr_segment)
    if state.get("scaler"):
        tr.precision.scaler.load_state_dict(state["scaler"])
    tr.objective.load_state_dict(state["loader"])
    tr.step, tr.tokens_seen = int(state["step"]), int(state["tokens_seen"])
    tr.elapsed = float(state["elapsed"])
    tr.best_val_loss = float(state["best_val_loss"])
    rngs = state["rng"]
    if len(rngs) == tr.ctx.world_size:
        set_rng_state(rngs[tr.ctx.rank], tr.device)
    else:  # another process count: the data order is unchanged, only dropout's randomness is reseeded
        torch.manual_seed(tr.cfg.train.seed + tr.step + tr.ctx.rank)
