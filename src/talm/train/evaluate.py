"""Evaluation on the fixed validation slice: which slice (`val_slice`, the one definition training's val_loss and
`evaluate --data-dir` share), its mean loss (nats/token) over all ranks, and bits per byte.

Apart from the loop because its numerics are delicate: MPS has no float64, so the per-batch losses stay float32
on the device and are summed in float64 on the host, with one transfer at the end; only the cross-rank sum
(CUDA or CPU, never MPS) uses a float64 tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch.distributed.fsdp import FSDPModule

from talm.data.manifest import DataSet
from talm.errors import TalmError
from talm.train import dist
from talm.train.config import TrainConfig
from talm.train.loader import EvalSlice
from talm.train.packing import ConversationEval


def val_slice(
    data: DataSet,
    train: TrainConfig,
    context_length: int,
    ctx: dist.DistContext,
    *,
    vocab_size: int | None = None,
    eval_tokens: int | None = None,
) -> EvalSlice | ConversationEval | None:
    """This rank's fixed validation slice of `data` as a run with `train`'s settings evaluates it (None without
    val tokens): `eval_tokens` (default train.eval_tokens) of the val split, in windows; conversation data (loss
    masks) packed from whole conversations, its loss over the learned tokens only (padding is <|endoftext|>)."""
    if not any(s.tokens > 0 for s in data.split("val")):
        return None
    if data.kind == "preferences":  # a next-token loss over both replies, the rejected too, would mislead
        raise TalmError(
            f"{str(data.dir)!r} holds preference pairs, which have no language-model val loss: their held-out "
            "preference accuracy is what train_model --preset dpo logs (val_pref_accuracy)"
        )
    common = {
        "eval_tokens": eval_tokens or train.eval_tokens, "context_length": context_length,
        "batch_size": train.batch_size, "rank": ctx.rank, "world_size": ctx.world_size, "device": ctx.device,
        "vocab_size": vocab_size,
    }  # fmt: skip
    if data.loss_mask:
        pad = int(data.tokenizer["eot_id"])
        return ConversationEval(data, pad_id=pad, isolate=train.isolate_conversations, **common)
    return EvalSlice(data, **common)


@torch.no_grad()
def val_loss_and_bpb(
    model: torch.nn.Module,
    eval_slice: EvalSlice | ConversationEval,
    ctx: dist.DistContext,
    autocast: Callable[[], AbstractContextManager],
) -> tuple[float, float | None]:
    """(val loss, val bits per byte or None if the data has no byte counts); leaves `model` in train mode.
    Under FSDP every forward gathers weights from every process: a process with fewer batches than another runs
    uncounted forwards until all have run as many."""
    model.eval()
    # per batch: its loss, what that loss is multiplied by to make a sum, and its count of targets
    losses, weights, counts = [], [], []
    for batch in eval_slice:
        x, y = batch[0], batch[1]
        with autocast():  # conversation data's batches also carry doc_ids and their learned-target count
            if len(batch) == 2:  # text: every target counts, and the mean of a full window is exact
                _, loss = model(x, y)
            else:  # summed: a batch with no learned target gives 0 where a mean is NaN
                _, loss = model(x, y, doc_ids=batch[2], reduction="sum")
        losses.append(loss.detach().float())
        counts.append(y.numel() if len(batch) == 2 else batch[3])
        weights.append(counts[-1] if len(batch) == 2 else 1)
    if isinstance(model, FSDPModule):
        for _ in range(eval_slice.most_batches - len(losses)):
            with autocast():
                model(*eval_slice.any_batch())
    model.train()
    values = torch.stack(losses).cpu().tolist() if losses else []
    loss_sum = sum(v * w for v, w in zip(values, weights, strict=True))
    count = float(sum(counts))
    if ctx.distributed:
        total = torch.tensor([loss_sum, count], dtype=torch.float64, device=ctx.device)
        loss_sum, count = dist.all_reduce_sum(total).tolist()
    val_loss = loss_sum / count
    tpb = eval_slice.tokens_per_byte
    bpb = val_loss / math.log(2) * tpb if tpb else None
    return val_loss, bpb


def scores_text(val_loss: float | None, bpb: float | None) -> str:
    """The scores as the run's last line says them."""
    if val_loss is None:
        return "not evaluated"
    return f"val loss {val_loss:.4f}, val bits/byte " + (f"{bpb:.4f}" if bpb is not None else "n/a")
