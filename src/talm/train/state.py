"""A run's checkpoint content, saved and loaded through one path for one process, DDP and FSDP alike.

Each stateful part of a run saves and loads its own state (torch's `Stateful` protocol: `state_dict()` /
`load_state_dict()`): the Trainer's counters, the objective's data position, the loss scaler and every rank's
RNG states (`RNGStates`). The model and optimizer go through torch's `get_state_dict` / `set_state_dict`, keyed
by parameter name whatever the strategy, so one `Checkpointer` serves every strategy:

- saving: a process without FSDP writes the weights to model.safetensors and the optimizer's state to
  trainer_state.pt; under FSDP every process writes its shards of both with DCP (sharded/), beside the whole
  model gathered on rank 0 (model.safetensors, which generate / export / evaluate read);
- loading: a sharded checkpoint is read by DCP into this run's own layout (it reshards across process counts);
  a whole one is read as full state dicts, which `set_state_dict` shards as this run holds them.

checkpoint.py owns the files (atomic staging and swap, code-free loading); what a resume may change is
resume.py's decision, made before anything here loads.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from talm.errors import TalmError
from talm.files import staging_dir
from talm.model.config import ModelConfig
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
from talm.train.optim import Optimizer, check_kind, inner_optimizers, is_muon, keep_kernel
from talm.train.rundir import OTHER_NAME


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class RNGStates:
    """Every rank's RNG states (CPU, and CUDA's on a GPU), saved together: a resume on as many processes
    restores each rank's (the same dropout masks); on another count each rank is reseeded from the run's seed,
    the step and its rank (the data order does not depend on it)."""

    def __init__(self, ctx: dist.DistContext, seed: int, step: Callable[[], int]) -> None:
        self.ctx, self.seed, self.step = ctx, seed, step

    def state_dict(self) -> list[dict[str, torch.Tensor]]:  # a collective: every rank calls it
        state = {"cpu": torch.get_rng_state()}
        if self.ctx.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.ctx.device).cpu()
        return dist.all_gather_objects(state)

    def load_state_dict(self, states: list[dict[str, torch.Tensor]]) -> None:
        if len(states) != self.ctx.world_size:
            torch.manual_seed(self.seed + self.step() + self.ctx.rank)
            return
        state = states[self.ctx.rank]
        torch.set_rng_state(state["cpu"])
        if self.ctx.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.ctx.device)


def read_saved(checkpoint_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint's checkpoint.json and trainer state, read once for the resume's decisions and `load`."""
    return read_meta(checkpoint_dir), load_trainer_state(checkpoint_dir)


class Checkpointer:
    """Saves and loads one run's checkpoints: `model` (the plain GPT, sharded under FSDP) and `optimizer` by
    parameter name, `counters` at the top level of trainer_state.pt and each of `parts` under its name."""

    def __init__(
        self,
        model: GPT,
        optimizer: Optimizer,
        *,
        counters: Stateful,
        parts: dict[str, Stateful],
        ctx: dist.DistContext,
        sharded: bool,
        model_config: ModelConfig,
    ) -> None:
        self.model, self.optimizer, self.counters, self.parts = model, optimizer, counters, parts
        self.ctx, self.sharded, self.model_config = ctx, sharded, model_config
        self._whole: GPT | None = None  # FSDP: the gathered model on rank 0, built at the first save

    def state_dict(self) -> dict[str, Any]:
        """trainer_state.pt's content besides the optimizer (a collective: RNGStates gathers every rank's)."""
        return self.counters.state_dict() | {name: part.state_dict() for name, part in self.parts.items()}

    def save(self, target: Path, meta: dict[str, Any]) -> None:
        """Write checkpoint directory `target` with `meta` (checkpoint.json); every rank takes part. A failed save
        (a full disk) is one line on rank 0, the previous checkpoint kept; the other ranks stop with it."""
        state = self.state_dict()
        model_state, optim_state = get_state_dict(self.model, inner_optimizers(self.optimizer))
        weights: torch.nn.Module = self.model
        staged, error = None, None
        if self.sharded:
            weights = self.whole_model()  # on rank 0 (a collective: every rank sends its shards)
            staged, error = dist.broadcast_object(new_staging_dir(target) if self.ctx.is_main else None)
            try:
                if error is None:
                    save_shards(staged / SHARDS, {"model": model_state, "optim": optim_state["state"]})
            except (Exception, CheckpointException) as err:  # noqa: BLE001 -- any rank's failure, on every rank
                error = first_failure(err)
            # the optimizer's tensors are in sharded/; its hyperparameters stay in trainer_state.pt
            optim_state = {"param_groups": optim_state["param_groups"]}

        def write() -> None:
            if error is not None:
                if staged is not None:
                    shutil.rmtree(staged, ignore_errors=True)
                raise save_failed(target, error)
            save_checkpoint(target, weights, meta, state | {"optimizer": optim_state}, staged=staged)

        dist.on_main(write, self.ctx)

    def whole_model(self) -> torch.nn.Module:
        """The FSDP model's weights gathered into a plain GPT on rank 0's CPU, for model.safetensors; every rank
        must call it. Other ranks get their sharded model back (they write nothing)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.model, options=options)
        if not self.ctx.is_main:
            return self.model
        if self._whole is None:
            self._whole = GPT(self.model_config)
        self._whole.load_state_dict(full)
        return self._whole

    def load(self, checkpoint_dir: Path, state: dict[str, Any]) -> None:
        """Load a checkpoint (`state`: its trainer_state.pt, from `read_saved`) into this freshly built run, whose
        config resume.plan_resume has accepted: weights and optimizer, then the counters and every part."""
        optimizers = inner_optimizers(self.optimizer)
        try:
            check_kind(
                self.optimizer, any(is_muon(g) for g in saved_groups(checkpoint_dir, state["optimizer"]))
            )
            saved = by_name(state["optimizer"], self.optimizer, self.model)
        except ValueError as err:
            raise optimizer_misfit(checkpoint_dir, str(err)) from None
        groups = saved["param_groups"]
        if (checkpoint_dir / SHARDS).is_dir():  # DCP fills this run's own layout, resharding as needed
            model_state, optim_state = get_state_dict(self.model, optimizers)
            wanted = {"model": model_state, "optim": optim_state["state"]}
            load_shards(checkpoint_dir / SHARDS, wanted)
            model_state, saved, options = (
                wanted["model"],
                {"state": wanted["optim"], "param_groups": groups},
                None,
            )
        else:  # whole tensors, which set_state_dict shards as this run holds them
            whole = GPT(self.model_config)
            load_weights(whole, checkpoint_dir)  # its checks and one-line errors
            model_state, options = whole.state_dict(), StateDictOptions(full_state_dict=True)
        try:
            set_state_dict(
                self.model, optimizers, model_state_dict=model_state, optim_state_dict=saved, options=options
            )
        except (ValueError, KeyError, RuntimeError, TypeError) as err:
            raise optimizer_misfit(checkpoint_dir, str(err).splitlines()[0]) from None
        keep_kernel(self.optimizer)
        self.counters.load_state_dict(state)
        for name, part in self.parts.items():
            if state.get(name):  # an empty state (a scaler that was off) leaves the part as built
                part.load_state_dict(state[name])


def by_name(saved: dict[str, Any], optimizer: Optimizer, model: torch.nn.Module) -> dict[str, Any]:
    """A saved optimizer state keyed by parameter name, as `get_state_dict` gives it. Checkpoints written before
    talm saved by name hold `Optimizer.state_dict()`'s, parameters numbered in the order of each optimizer's
    groups (Muon's and AdamW's apart: {"muon", "adamw"}): the numbers are mapped to the names of this run's
    parameters, built in the same order. ValueError if they are not as many."""
    states = [saved["muon"], saved["adamw"]] if set(saved) == {"muon", "adamw"} else [saved]
    numbered = [i for one in states for g in one.get("param_groups", []) for i in g.get("params", [])]
    if not numbered or not all(isinstance(i, int) for i in numbered):
        return saved  # by name already (an FSDP run's holds its param_groups here, its tensors in sharded/)
    names = {id(p): name for name, p in model.named_parameters()}
    state: dict[str, Any] = {}
    groups: list[dict[str, Any]] = []
    for opt, one in zip(inner_optimizers(optimizer), states, strict=True):
        params = [names[id(p)] for g in opt.param_groups for p in g["params"]]
        indices = [i for g in one["param_groups"] for i in g["params"]]
        if len(indices) != len(params):
            raise ValueError(f"it has {len(indices)} parameters, this model {len(params)}")
        name_of = dict(zip(indices, params, strict=True))
        state |= {name_of[i]: s for i, s in one.get("state", {}).items()}
        groups += [g | {"params": [name_of[i] for i in g["params"]]} for g in one["param_groups"]]
    return {"state": state, "param_groups": groups}


def saved_groups(checkpoint_dir: Path, saved: Any) -> list[dict[str, Any]]:
    """The parameter groups of a saved optimizer state (both optimizers' with Muon), checked to be groups."""
    states = list(saved.values()) if isinstance(saved, dict) and set(saved) == {"muon", "adamw"} else [saved]
    groups = [g for one in states if isinstance(one, dict) for g in (one.get("param_groups") or [None])]
    if not groups or not all(isinstance(g, dict) for g in groups):
        raise damaged(checkpoint_dir / TRAINER_STATE, "no optimizer parameter groups")
    return groups


def new_staging_dir(target: Path) -> tuple[Path | None, OSError | None]:
    """Rank 0: the staging directory every rank writes its shards into, or why it cannot be made."""
    try:
        return staging_dir(target), None
    except OSError as err:
        return None, err


def optimizer_misfit(checkpoint_dir: Path, why: str) -> TalmError:
    return TalmError(
        f"cannot resume from {str(checkpoint_dir)!r}: its optimizer state does not fit this model ({why}): pass "
        f"--restart to start over, or {OTHER_NAME}"
    )
