"""Moving row ranges of FSDP2's sharded matrices between processes, for Muon (talm.train.optim.Muon): each piece
(a matrix, or one projection's rows of a fused one) sent whole to the one process that orthogonalises it, and
each process's rows of the pieces' updates sent back, each direction one asynchronous all_to_all.

FSDP2 shards a parameter over a 1-D mesh by rows as torch.chunk does: ceil(rows / N) rows per process, the last
processes holding fewer or none. A piece's rows may span several processes' shards; every process can compute
which rows of which piece each process holds from the shapes alone, so the split sizes need no exchange.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor, Shard

# A piece of a sharded matrix: (the matrix, its first row, its row count).
Rows = tuple[DTensor, int, int]


def row_chunk(x: DTensor) -> int:
    """Rows per process of FSDP2's sharding of `x` over its 1-D mesh (torch.chunk's: ceil(rows / N), the last
    processes holding fewer or none); a bug guard for any other layout."""
    assert x.device_mesh.ndim == 1 and tuple(x.placements) == (Shard(0),), x.placements
    return -(-x.size(0) // x.device_mesh.size())


def held(piece: Rows, rank: int) -> tuple[int, int]:
    """The rows [lo, hi) of the whole matrix that are both in `piece` and in process `rank`'s shard (lo == hi:
    none)."""
    x, start, count = piece
    chunk = row_chunk(x)
    lo, hi = max(start, rank * chunk), min(start + count, (rank + 1) * chunk, x.size(0))
    return lo, max(lo, hi)


def start_all_to_all(
    send: list[list[torch.Tensor]],
    receive: list[list[tuple[int, int]]],
    group: torch.distributed.ProcessGroup,
    like: torch.Tensor,
) -> Callable[[], list[list[torch.Tensor]]]:
    """Start sending the matrices send[q] to process q and receiving matrices of the shapes receive[q] from each
    process q, all of `like`'s dtype and device (one all_to_all, async); returns the wait that gives the received
    matrices, by process."""
    empty = like.new_empty(0)
    flat = torch.cat([empty] + [t.reshape(-1).to(like.dtype) for ts in send for t in ts])
    out_sizes = [sum(r * c for r, c in shapes) for shapes in receive]
    out = like.new_empty(sum(out_sizes))
    in_sizes = [sum(t.numel() for t in ts) for ts in send]
    work = torch.distributed.all_to_all_single(out, flat, out_sizes, in_sizes, group=group, async_op=True)

    def wait() -> list[list[torch.Tensor]]:
        work.wait()
        return [
            [
                part.view(shape)
                for part, shape in zip(chunk.split([r * c for r, c in shapes]), shapes, strict=True)
            ]
            for chunk, shapes in zip(out.split(out_sizes), receive, strict=True)
        ]

    return wait


def to_owners(
    pieces: list[Rows], owners: list[int], group: torch.distributed.ProcessGroup
) -> Callable[[], list[torch.Tensor]]:
    """Start gathering each piece whole on its owner; the wait returns this process's pieces, whole, in order."""
    me, world = torch.distributed.get_rank(group), group.size()
    mine = [piece for piece, owner in zip(pieces, owners, strict=True) if owner == me]
    send = [[] for _ in range(world)]
    for piece, owner in zip(pieces, owners, strict=True):
        lo, hi = held(piece, me)
        x, chunk = piece[0], row_chunk(piece[0])
        send[owner].append(x.to_local()[lo - me * chunk : hi - me * chunk])
    receive = [[(held(p, q)[1] - held(p, q)[0], p[0].size(1)) for p in mine] for q in range(world)]
    wait = start_all_to_all(send, receive, group, pieces[0][0].to_local())
    return lambda: [torch.cat(slabs) for slabs in zip(*wait(), strict=True)] if mine else []


def from_owners(
    updates: list[torch.Tensor],
    pieces: list[Rows],
    owners: list[int],
    group: torch.distributed.ProcessGroup,
    like: torch.Tensor,
) -> Callable[[], list[tuple[int, torch.Tensor]]]:
    """Start sending each process its rows of the `updates` (`like`'s dtype) of this process's pieces (in order);
    the wait returns, for every piece, (its first row in this process's shard, this process's rows of its
    update)."""
    me, world = torch.distributed.get_rank(group), group.size()
    mine = [piece for piece, owner in zip(pieces, owners, strict=True) if owner == me]
    send = [[u[held(p, q)[0] - p[1] : held(p, q)[1] - p[1]] for p, u in zip(mine, updates, strict=True)]
            for q in range(world)]  # fmt: skip
    receive = [[] for _ in range(world)]
    for piece, owner in zip(pieces, owners, strict=True):
        lo, hi = held(piece, me)
        receive[owner].append((hi - lo, piece[0].size(1)))
    wait = start_all_to_all(send, receive, group, like)

    def rows() -> list[tuple[int, torch.Tensor]]:
        got, taken = wait(), [0] * world
        out = []
        for piece, owner in zip(pieces, owners, strict=True):
            out.append((held(piece, me)[0] - me * row_chunk(piece[0]), got[owner][taken[owner]]))
            taken[owner] += 1
        return out

    return rows
