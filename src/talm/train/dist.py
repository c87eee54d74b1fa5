"""The process's place in a (possibly distributed) run: device, rank, world size.

`torchrun --nproc-per-node N ...` sets RANK, LOCAL_RANK and WORLD_SIZE; `setup` reads them, picks the device
(cuda:LOCAL_RANK on GPUs) and joins the process group (NCCL on GPU, gloo on CPU). A plain `python`/console
script run is a world of one and needs no process group. Only rank 0 prints and writes files.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from talm.errors import TalmError


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """ "auto" -> cuda, then mps, then cpu; a requested device that is not there is a TalmError."""
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise TalmError(
                "--device cuda was asked for but no CUDA GPU is visible: use --device cpu (or auto)"
            )
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if requested == "mps" and not torch.backends.mps.is_available():
        raise TalmError("--device mps was asked for but MPS is not available: use --device cpu (or auto)")
    return torch.device(requested)


def setup(requested_device: str = "auto", *, group: bool = False) -> DistContext:
    """Read the torchrun environment, choose the device and join the process group if there is more than one
    process, or if `group` asks for one anyway (an explicit --train.parallel ddp/fsdp on one process: a world
    of one, joined through torchrun's rendezvous if there is one, else through an in-process store)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if (world_size > 1 or group) and not tdist.is_initialized():
        if device.type == "mps":
            raise TalmError(
                "multi-process (DDP/FSDP) training on mps is not supported: use one process or --device cpu"
            )
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if world_size > 1 or "MASTER_ADDR" in os.environ:
            tdist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        else:
            store = tdist.HashStore()
            tdist.init_process_group(backend=backend, store=store, rank=0, world_size=1)
    return DistContext(rank, local_rank, world_size, device)


def teardown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all processes in place (a no-op in a world of one)."""
    if tdist.is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """One `obj` per rank, in rank order, on every rank."""
    if not tdist.is_initialized():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


T = TypeVar("T")


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (itself in a world of one)."""
    if not tdist.is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T], ctx: DistContext) -> T | None:
    """Run `fn` on rank 0 alone (what writes files), then let every rank go on together (a barrier).

    If `fn` raises TalmError, rank 0 raises it and every other rank leaves quietly with exit status 2, instead
    of waiting in the next collective for a rank that is gone. Returns `fn`'s result on rank 0, None elsewhere.
    """
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except TalmError as err:
            if not tdist.is_initialized():
                raise
            error = err
    if tdist.is_initialized():
        message = [str(error) if error is not None else None]
        tdist.broadcast_object_list(message, src=0)
        if error is not None:
            raise error
        if message[0] is not None:
            raise SystemExit(2)  # rank 0 prints the one line; the other ranks say nothing
    return result


def print0(*args: Any, ctx: DistContext | None = None, **kwargs: Any) -> None:
    """print() on rank 0 only, to stderr unless told otherwise (stdout stays clean for results)."""
    rank = ctx.rank if ctx is not None else int(os.environ.get("RANK", "0"))
    if rank == 0:
        kwargs.setdefault("file", sys.stderr)
        print(*args, **kwargs, flush=True)
