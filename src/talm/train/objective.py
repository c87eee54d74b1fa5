"""What a training step minimises and how the run is scored: the seam between the Trainer and its objective.

The Trainer (loop.py) owns a step's mechanics: precision, backward, gradient accumulation and clipping, the
optimizer and its schedule, logs, evaluations and checkpoints. What differs between pretraining (or SFT),
preference tuning and RL is its `Objective`'s:

- `step_batches`: the micro-batches of one optimizer step (exactly `accum` of them), from its own data;
- `loss`: a micro-batch's loss, as backward takes it (the Trainer divides by `accum`), and its statistics
  (`stat_names`, logged as train_<name>, averaged over micro-batches and processes);
- `evaluate`: the validation metrics ("val_<name>"), and `best_score`, which best/ keeps the lowest of;
- `state_dict` / `load_state_dict`: where its data is, saved in every checkpoint (exact resume).

`train.objective` picks one (`make_objective`); `LanguageModeling` is next-token prediction on text (every token
learned) or conversations (the assistant's tokens), the objective of pretraining and SFT.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch

from talm.data.manifest import DataSet
from talm.errors import TalmError
from talm.train import dist
from talm.train.config import RunConfig
from talm.train.dpo import DPO
from talm.train.evaluate import scores_text, val_loss_and_bpb
from talm.train.inputs import make_loaders
from talm.train.packing import ConversationLoader, micro_batches
from talm.train.precision import Precision

if TYPE_CHECKING:
    from talm.tokenizer.api import Tokenizer


class Objective(Protocol):
    stat_names: tuple[str, ...]

    @property
    def has_val(self) -> bool:
        """Whether the run evaluates (the data has a val split): without it, no best/ checkpoint."""
        ...

    def describe(self) -> list[str]: ...  # the banner's lines about the data

    def check_next(self) -> None: ...  # the first batch's data checked before the run writes anything

    def step_batches(self) -> Iterator[Any]: ...

    def loss(self, net: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]: ...

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]: ...

    def best_score(self, metrics: dict[str, float]) -> float: ...

    def scores_text(self, metrics: dict[str, Any]) -> str: ...  # the last evaluation, for the run's summary

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class LanguageModeling:
    """Next-token prediction: the mean loss over every target of text data, or over the learned (assistant)
    targets of conversation data (packing.py's loaders and scales)."""

    stat_names: tuple[str, ...] = ()

    def __init__(
        self,
        cfg: RunConfig,
        data: DataSet,
        vocab_size: int,
        accum: int,
        ctx: dist.DistContext,
        precision: Precision,
    ) -> None:
        self.loader, self.eval_slice = make_loaders(cfg, data, vocab_size, accum, ctx)
        self.data, self.accum, self.ctx, self.precision = data, accum, ctx, precision
        self.init_from = cfg.train.init_from

    @property
    def has_val(self) -> bool:
        return self.eval_slice is not None

    def describe(self) -> list[str]:
        if not isinstance(self.loader, ConversationLoader):
            return []
        return [self.loader.describe()]

    def check_next(self) -> None:
        self.loader.check_next()  # the shard of the first batch: ids out of range fail before any write

    def step_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], float]]:
        return micro_batches(self.loader, self.accum, self.ctx)

    def loss(self, net: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, extra, scale = batch  # conversation data: doc_ids, the summed loss and its scale (packing.py)
        return net(x, y, **extra)[1] * scale, torch.zeros(0, device=x.device)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        assert self.eval_slice is not None
        val_loss, bpb = val_loss_and_bpb(model, self.eval_slice, self.ctx, self.precision.autocast)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)), "val_bpb": bpb}

    def best_score(self, metrics: dict[str, float]) -> float:
        return metrics["val_loss"]

    def scores_text(self, metrics: dict[str, Any]) -> str:
        return scores_text(metrics.get("val_loss"), metrics.get("val_bpb"))

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def make_objective(
    cfg: RunConfig,
    data: DataSet,
    tokenizer: Tokenizer,
    *,
    model: torch.nn.Module,
    accum: int,
    ctx: dist.DistContext,
    precision: Precision,
) -> Objective:
    """The objective `train.objective` names, over this rank's share of `data` (every id in it must be one of
    `tokenizer`'s); `model` is the plain model (an objective that samples from it, or keeps a frozen copy of its
    starting weights, takes it here)."""
    check_data_kind(cfg, data)
    vocab_size = tokenizer.vocab_size
    if cfg.train.objective == "dpo":
        return DPO(cfg, data, vocab_size, accum, ctx, precision, model)
    if cfg.train.objective == "grpo":  # samples from the plain model, decodes replies with the tokenizer
        from talm.train.grpo import GRPO

        return GRPO(cfg, tokenizer, model, accum, ctx, precision)
    return LanguageModeling(cfg, data, vocab_size, accum, ctx, precision)


# The data each objective trains on (the manifest's kind, talm.data.manifest.KINDS).
OBJECTIVE_DATA = {"lm": ("text", "conversations"), "dpo": ("preferences",), "grpo": ("prompts",)}


def check_data_kind(cfg: RunConfig, data: DataSet) -> None:
    """TalmError (one line) when the run's objective does not train on the data's kind: preference tuning on
    text or conversations, or next-token prediction on preference pairs (it would learn the rejected replies)."""
    objective = cfg.train.objective
    if data.kind in OBJECTIVE_DATA[objective]:
        return
    if objective == "grpo":
        raise TalmError(
            f"train.objective grpo (--preset grpo) learns from prompts with reference answers, but "
            f"{str(data.dir)!r} holds {data.kind}: make prompt data with download_data gsm8k (or --prompts with "
            "your own)"
        )
    if data.kind == "prompts":
        raise TalmError(
            f"{str(data.dir)!r} holds prompts with reference answers, not token shards: train on it with "
            "--preset grpo (--init-from your chat model)"
        )
    if data.kind == "preferences":
        raise TalmError(
            f"{str(data.dir)!r} holds preference pairs, which train.objective {objective} would learn both "
            "replies of, the rejected too: tune on them with --preset dpo (--init-from your chat model)"
        )
    raise TalmError(
        f"train.objective {objective} (--preset {objective}) tunes on preference pairs, but {str(data.dir)!r} "
        f"holds {data.kind}: make pairs with download_data ultrafeedback (or --preferences with your own)"
    )
