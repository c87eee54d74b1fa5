"""Moving the rows of FSDP2's sharded matrices between processes: a whole matrix gathered on one process, and
a whole matrix's rows sent from one process to each process that holds them. What Muon needs to orthogonalise
each matrix on one process only (talm.train.optim.Muon).

FSDP2 shards a parameter over a 1-D mesh by rows as torch.chunk does: ceil(rows / N) rows per process, the last
processes holding fewer or none. Collectives move tensors of one shape, so each slab travels padded to that
size with zero rows, which the receiver cuts off.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Shard


def row_chunk(x: DTensor) -> int:
    """Rows per process of FSDP2's sharding of `x` over its 1-D mesh (torch.chunk's: ceil(rows / N), the last
    processes holding fewer or none); a bug guard for any other layout."""
    assert x.device_mesh.ndim == 1 and tuple(x.placements) == (Shard(0),), x.placements
    return -(-x.size(0) // x.device_mesh.size())


def padded(local: torch.Tensor, rows: int) -> torch.Tensor:
    """`local` with zero rows appended up to `rows` (collectives move tensors of one shape)."""
    if local.size(0) == rows:
        return local.contiguous()
    return torch.cat([local, local.new_zeros(rows - local.size(0), *local.shape[1:])])


def gather_rows(x: DTensor, owner: int, group: torch.distributed.ProcessGroup) -> torch.Tensor | None:
    """The whole matrix `x` on process `owner` of `group` (None on the others): each process sends its rows."""
    mine = padded(x.to_local(), row_chunk(x))
    is_owner = torch.distributed.get_rank(group) == owner
    parts = [torch.empty_like(mine) for _ in range(group.size())] if is_owner else None
    torch.distributed.gather(mine, parts, group=group, group_dst=owner)
    return torch.cat(parts)[: x.size(0)] if parts is not None else None


def scatter_rows(
    whole: torch.Tensor | None, like: DTensor, owner: int, group: torch.distributed.ProcessGroup
) -> DTensor:
    """This process's rows of `whole` (given on process `owner` only), as a DTensor sharded as `like`."""
    chunk, local = row_chunk(like), like.to_local()
    parts = None
    if whole is not None:
        parts = [padded(rows, chunk) for rows in whole.split(chunk)]
        parts += [whole.new_zeros(chunk, *whole.shape[1:])] * (group.size() - len(parts))
    mine = torch.empty(chunk, *local.shape[1:], dtype=local.dtype, device=local.device)
    torch.distributed.scatter(mine, parts, group=group, group_src=owner)
    return DTensor.from_local(
        mine[: local.size(0)], like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    )
