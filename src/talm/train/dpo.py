"""Preference tuning's arithmetic: the log-probability a model gives each reply, and the losses that push the
chosen reply of a pair above the rejected one.

`sequence_logps` sums, per sequence, the log-probabilities of its learned targets (the reply: targets are -1
elsewhere, as the pair loader (pairs.py) builds them). `pair_terms` turns the policy's sums for the chosen and
rejected sides (and the reference model's, for the losses that have one) into each pair's loss and implicit
rewards; `summarize` makes the logged stats of many pairs. The losses (`LOSSES`):

- "dpo": Rafailov et al. 2023 (arXiv:2305.18290), -log sigmoid(beta * ((pc - rc) - (pr - rr))), the rewards
  beta * (p - r) of each side: the policy's log-ratio to the reference (the starting weights).
- "ipo": Azar et al. 2023 (arXiv:2310.12036), ((pc - rc) - (pr - rr) - 1 / (2 beta))^2: a squared loss that
  stops at a margin instead of pushing it without end (robust to pairs that are always won).
- "simpo": Meng et al. 2024 (arXiv:2405.14734), reference-free: -log sigmoid(beta * (pc / |c| - pr / |r|) -
  gamma), the rewards beta * the mean log-probability of each reply's tokens.

Preference accuracy counts a pair as won when its chosen reward beats the rejected one, a tie as half (at the
first step of DPO every reward is 0: 50%, chance, rather than 0%).

`DPO` is the Trainer's objective for it (train/objective.py's protocol): batches of pairs (pairs.py), the policy's
log-probs of both sides in one forward, the reference's from a frozen copy of the starting weights (reloaded from
--init-from, so a resumed run has it too) or from a table computed once before the first step and saved in every
checkpoint (dpo.reference: memory or compute), and the held-out pairs' stats as val_ metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from talm.data.manifest import DataSet
from talm.train import dist
from talm.train.config import RunConfig
from talm.train.pairs import PairBatch, PairEval, PairLoader, PairSet
from talm.train.precision import Precision

LOSSES = ("dpo", "ipo", "simpo")
LOSSES_WITH_REFERENCE = ("dpo", "ipo")
# The stats of a batch of pairs, in metrics.jsonl's order (each a mean over the pairs; val_ prefixed for val).
STATS = ("loss", "chosen_reward", "rejected_reward", "reward_margin", "pref_accuracy")


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence of `logits` (N, T, V) and `targets` (N, T; -1 where not scored): the sum of the scored
    targets' log-probabilities (N,), in float32, and how many were scored (N,)."""
    n, t = targets.shape
    nll = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, reduction="none"
    ).view(n, t)
    return -nll.sum(dim=1), (targets != -1).sum(dim=1)


def pair_terms(
    policy: tuple[torch.Tensor, torch.Tensor],
    reference: tuple[torch.Tensor, torch.Tensor] | None,
    lengths: tuple[torch.Tensor, torch.Tensor],
    *,
    loss: str = "dpo",
    beta: float = 0.1,
    gamma: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Each pair's loss and the rewards of its chosen and rejected reply (B,) from the summed reply
    log-probabilities (chosen, rejected) of the policy and, for "dpo" and "ipo", of the reference; `lengths`
    are the replies' scored tokens (SimPO's normalisation)."""
    chosen, rejected = policy
    if loss == "simpo":
        chosen_reward = beta * chosen / lengths[0].clamp(min=1)
        rejected_reward = beta * rejected / lengths[1].clamp(min=1)
        per_pair = -F.logsigmoid(chosen_reward - rejected_reward - gamma)
    elif loss in LOSSES_WITH_REFERENCE:
        assert reference is not None, f"the {loss} loss needs the reference model's log-probabilities"
        chosen_ratio, rejected_ratio = chosen - reference[0], rejected - reference[1]
        chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
        if loss == "dpo":
            per_pair = -F.logsigmoid(chosen_reward - rejected_reward)
        else:
            per_pair = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss!r}: one of {', '.join(LOSSES)}")
    return {
        "loss": per_pair,
        "chosen_reward": chosen_reward.detach(),
        "rejected_reward": rejected_reward.detach(),
    }


def stat_sums(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sums over pairs of each of `STATS` (then the number of pairs), as one float64 tensor: what
    micro-batches and ranks add up (one all-reduce) before `stat_means`."""
    margin = terms["chosen_reward"] - terms["rejected_reward"]
    won = (margin > 0).double() + 0.5 * (margin == 0).double()
    parts = [terms["loss"].detach(), terms["chosen_reward"], terms["rejected_reward"], margin, won]
    return torch.stack(
        [p.double().sum() for p in parts]
        + [torch.tensor(float(len(margin)), dtype=torch.float64, device=margin.device)]
    )


def stat_means(sums: torch.Tensor) -> dict[str, float]:
    """`stat_sums` (added over micro-batches and ranks) as the mean of each stat over the pairs."""
    values = sums.tolist()
    pairs = max(values[-1], 1.0)
    return {name: value / pairs for name, value in zip(STATS, values[:-1], strict=True)}


# ------------------------------------------------------------------------------------------------ the objective


def reference_model(cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    """A frozen copy of the run's starting weights (the --init-from source), whole on this process, built without
    touching the run's random state."""
    from talm.model.gpt import GPT
    from talm.train.init import resolve_source, source_state_dict

    assert cfg.train.init_from, "train.objective dpo needs --init-from (run.py refuses it without)"
    with torch.random.fork_rng(devices=[]):
        model = GPT(cfg.model)
    model.load_state_dict(source_state_dict(resolve_source(cfg.train.init_from), cfg.model), strict=True)
    return model.to(device).eval().requires_grad_(False)


class DPO:
    """Preference tuning as the Trainer's objective: a step's micro-batches are batches of pairs, its loss is
    dpo.loss over them, its stats the rewards, their margin and the preference accuracy."""

    stat_names: tuple[str, ...] = STATS[1:]

    def __init__(
        self,
        cfg: RunConfig,
        data: DataSet,
        vocab_size: int,
        accum: int,
        ctx: dist.DistContext,
        precision: Precision,
        model: torch.nn.Module,
    ) -> None:
        t, T, pad = cfg.train, cfg.model.context_length, int(data.tokenizer["eot_id"])
        self.settings, self.accum, self.ctx, self.precision, self.model = (
            cfg.dpo,
            accum,
            ctx,
            precision,
            model,
        )
        common = {"context_length": T, "pad_id": pad, "rank": ctx.rank, "world_size": ctx.world_size}
        common |= {"device": ctx.device, "vocab_size": vocab_size}
        self.loader = PairLoader(data, batch_size=t.batch_size, seed=t.seed, accum_steps=accum, **common)
        self.val: PairEval | None = None
        if any(s.tokens > 0 for s in data.split("val")):
            pairs = max(1, t.eval_tokens // (2 * T))  # eval_tokens: the positions of its rows, both sides
            self.val = PairEval(data, max_pairs=pairs, batch_size=t.batch_size, **common)
        self.with_reference = cfg.dpo.loss in LOSSES_WITH_REFERENCE
        self.frozen = None
        if self.with_reference and cfg.dpo.reference == "model":
            self.frozen = reference_model(cfg, ctx.device)
        # dpo.reference stored: per split, each pair's reference log-probs (chosen, rejected); None until made
        self.stored: dict[str, torch.Tensor] | None = None

    @property
    def has_val(self) -> bool:
        return self.val is not None

    def describe(self) -> list[str]:
        s = self.settings
        how = f"beta {s.beta}" + (f", gamma {s.gamma}" if s.loss == "simpo" else "")
        if not self.with_reference:
            reference = "no reference model"
        elif s.reference == "model":
            reference = "the reference: a frozen copy of the starting weights beside every step"
        else:
            reference = "the reference's log-probs computed once before the first step, kept in checkpoints"
        lines = [self.loader.describe(), f"preference loss {s.loss} ({how}), {reference}"]
        if self.val is not None:
            lines.append(
                f"evaluated on the first {self.val.count:,} held-out pairs ({self.val.pairs.describe()})"
            )
        return lines

    def check_next(self) -> None:
        self.loader.check_next()

    def step_batches(self) -> Iterator[PairBatch]:
        if self.with_reference and self.settings.reference == "stored" and self.stored is None:
            self.stored = self._store_reference()  # before the first update: the starting weights
        return (self.loader.next_batch() for _ in range(self.accum))

    def _terms(self, net: torch.nn.Module, batch: PairBatch, split: str) -> dict[str, torch.Tensor]:
        x, y, index = batch
        n = len(x) // 2
        logps, counts = sequence_logps(net(x)[0], y)
        reference = None
        if self.frozen is not None:
            with torch.no_grad():
                ref, _ = sequence_logps(self.frozen(x)[0], y)
            reference = (ref[:n], ref[n:])
        elif self.with_reference:
            assert self.stored is not None
            rows = self.stored[split][index.cpu()].to(x.device)
            reference = (rows[:, 0], rows[:, 1])
        s = self.settings
        return pair_terms(
            (logps[:n], logps[n:]),
            reference,
            (counts[:n], counts[n:]),
            loss=s.loss,
            beta=s.beta,
            gamma=s.gamma,
        )

    def loss(self, net: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        sums = stat_sums(terms := self._terms(net, batch, "train"))
        return terms["loss"].mean(), sums[1:5] / sums[5]

    @torch.no_grad()
    def _store_reference(self) -> dict[str, torch.Tensor]:
        """Every pair's reference log-probs from the model as it stands (the starting weights), each rank
        computing its share; under FSDP every rank runs as many forwards (uncounted ones to finish)."""
        splits = {"train": self.loader.pairs} | ({"val": self.val.pairs} if self.val is not None else {})
        return {name: self._pair_logps(pairs) for name, pairs in splits.items()}

    def _pair_logps(self, pairs: PairSet) -> torch.Tensor:
        world, size, pad = self.ctx.world_size, self.loader.batch_size, self.loader.pad_id
        table = torch.zeros(pairs.size, 2, device=self.ctx.device)
        mine = np.arange(self.ctx.rank, pairs.count, world)
        self.model.eval()
        for i in range(0, -(-pairs.count // world), size):  # as many batches on every rank
            members = mine[i : i + size]
            n = len(members)
            x, y, index = pairs.batch(members if n else np.arange(1), pad, self.ctx.device)
            with self.precision.autocast():
                logps, _ = sequence_logps(self.model(x)[0], y)
            if n:
                table[index, 0], table[index, 1] = logps[:n].float(), logps[n:].float()
        self.model.train()
        return dist.all_reduce_sum(table).cpu()

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        assert self.val is not None
        model.eval()
        sums, batches = torch.zeros(len(STATS) + 1, device=self.ctx.device), 0
        for batch in self.val:
            with self.precision.autocast():
                sums += stat_sums(self._terms(model, batch, "val"))
            batches += 1
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):  # every rank runs as many forwards as rank 0
            for _ in range(self.val.most_batches - batches):
                with self.precision.autocast():
                    model(self.val.any_batch()[0])
        model.train()
        return {f"val_{k}": v for k, v in stat_means(dist.all_reduce_sum(sums)).items()}

    def best_score(self, metrics: dict[str, float]) -> float:
        return metrics["val_loss"]

    def scores_text(self, metrics: dict[str, Any]) -> str:
        if metrics.get("val_pref_accuracy") is None:
            return "not evaluated"
        return (
            f"val loss {metrics['val_loss']:.4f}, val preference accuracy {100 * metrics['val_pref_accuracy']:.1f}%, "
            f"reward margin {metrics['val_reward_margin']:.3f}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"pairs": self.loader.state_dict(), "reference": self.stored}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["pairs"])
        self.stored = state.get("reference")
