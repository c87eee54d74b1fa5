"""GRPO's pieces (Shao et al. 2024, DeepSeekMath, in nanochat's simplified form, scripts/chat_rl.py): for each
prompt sample a group of k replies, reward each (talm.train.rewards), take each reply's advantage relative to its
group (reward minus the group's mean; optionally over the group's standard deviation), and step the policy
gradient on the reply tokens only. On-policy and one update per batch of replies, so the importance ratio is 1
and PPO's clipping never acts: the loss is -advantage x log-prob of each reply token. No critic, and no KL
penalty to the starting model (nanochat drops it too).

The loss is a mean over all reply tokens of a step (nanochat's and DAPO's token-level normalisation): every
token weighs the same, where GRPO's per-sequence mean gives a short reply's tokens more weight than a long one's,
a bias towards short right answers and long wrong ones (Liu et al. 2025, "Dr. GRPO"); grpo.loss_mean =
"sequence" gives the per-sequence mean.

`PromptSampler` decides which prompts a step uses and the seed its replies are sampled with, from a state that
goes into checkpoints, so a resumed run samples exactly what the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from talm.eval.generative import generate_replies, reply_text
from talm.train import dist
from talm.train.rewards import Reward


class PromptSampler:
    """The prompts of each step, in a shuffled order that changes every epoch, this rank's share of them, and the
    seed of each step's sampling (different per rank); all of it from (seed, epoch, position, draws)."""

    def __init__(
        self, n_prompts: int, per_step: int, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if per_step % world_size:
            raise ValueError(f"{per_step} prompts per step do not split over {world_size} processes")
        self.n, self.per_step, self.seed = n_prompts, per_step, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = self.position = self.draws = 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next_prompts(self) -> list[int]:
        """This rank's prompt indices for the next step (a step may run over into the next epoch)."""
        chosen: list[int] = []
        while len(chosen) < self.per_step:
            take = min(self.per_step - len(chosen), self.n - self.position)
            chosen += self._order()[self.position : self.position + take].tolist()
            self.position += take
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return chosen[self.rank :: self.world_size]

    def next_seed(self) -> int:
        """The seed of this rank's next sampling."""
        self.draws += 1
        return int(np.random.default_rng([self.seed, self.draws, self.rank]).integers(2**62))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position, self.draws = (int(state[k]) for k in ("epoch", "position", "draws"))


def sample_groups(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    k: int,
    *,
    max_new_tokens: int,
    eot_id: int,
    seed: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    batch_size: int = 32,
    fixed_length: bool = False,
    vocab_size: int | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> list[list[int]]:
    """k sampled replies to each prompt, prompt by prompt (reply i * k + j is prompt i's j-th), batched with the
    KV cache (`generate_replies`; `fixed_length`: every batch runs max_new_tokens steps, as FSDP needs)."""
    repeated = [p for p in prompts for _ in range(k)]
    return generate_replies(
        model, repeated, max_new_tokens=max_new_tokens, eot_id=eot_id, temperature=temperature, top_k=top_k,
        seed=seed, batch_size=batch_size, fixed_length=fixed_length, vocab_size=vocab_size, autocast=autocast,
    )  # fmt: skip


def score_replies(
    tokenizer: Any, replies: Sequence[Sequence[int]], answers: Sequence[str], reward: Reward
) -> torch.Tensor:
    """The reward of each reply (decoded without its closing eot) against its prompt's reference answer."""
    eot = tokenizer.eot_id
    return torch.tensor(
        [reward(reply_text(tokenizer, r, eot), a) for r, a in zip(replies, answers, strict=True)]
    )


def group_advantages(
    rewards: torch.Tensor, *, normalise_std: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """Each reply's reward minus its group's mean (rewards: (prompts, k)); with `normalise_std`, over the group's
    standard deviation too (GRPO's original form). A group whose replies all score the same gets 0."""
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    if normalise_std:
        advantages = advantages / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)
    return advantages


def rollout_tensors(
    prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]], *, context_length: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (N, T) and targets (N, T) of prompt + reply sequences, right-padded: each target is the next token
    where that token is the reply's, else -1 (no loss on the prompt or the padding). A sequence longer than the
    context loses the start of its prompt."""
    rows = []
    for prompt, reply in zip(prompts, replies, strict=True):
        keep = max(context_length + 1 - len(reply), 1)
        rows.append((list(prompt[-keep:]), list(reply[:context_length])))
    width = max(len(p) + len(r) for p, r in rows) - 1
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (prompt, reply) in enumerate(rows):
        seq = torch.tensor(prompt + reply, dtype=torch.long)
        x[i, : len(seq) - 1] = seq[:-1]
        y[i, len(prompt) - 1 : len(seq) - 1] = seq[len(prompt) :]
    return x, y


def policy_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    *,
    mean: str = "token",
    denominator: float | None = None,
) -> torch.Tensor:
    """-advantage x log-prob of each reply token (targets >= 0), summed, over `denominator`: by default the
    number of reply tokens (mean "token") or of sequences with one (mean "sequence", each sequence's tokens
    averaged first). Pass the count over every micro-batch and process to get the mean of the whole step."""
    mask = targets >= 0
    logp = -F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, reduction="none"
    ).view_as(targets)
    weighted = (logp * mask) * advantages[:, None].to(logp.dtype)
    if mean == "sequence":
        per_sequence = weighted.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        count = int((mask.sum(dim=1) > 0).sum())
        return -per_sequence.sum() / (denominator or max(count, 1))
    return -weighted.sum() / (denominator or max(int(mask.sum()), 1))


def _sharded(model: torch.nn.Module) -> bool:
    """Whether the model's weights are FSDP shards: every forward pass is then a collective of all ranks."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


class GRPO:
    """The GRPO objective (train.objective grpo): each step samples train.batch_size / grpo.group_size prompts
    per micro-batch and process, group_size replies to each with the KV cache, rewards them and steps the policy
    gradient; evaluation is the greedy pass@1 on the first grpo.eval_prompts held-out prompts."""

    stat_names: tuple[str, ...] = ("reward", "reply_tokens", "sampling_tokens_per_s", "training_tokens_per_s")

    def __init__(
        self, cfg: Any, tokenizer: Any, model: torch.nn.Module, accum: int, ctx: Any, precision: Any
    ):
        from talm.data.prompts import read_prompts
        from talm.errors import TalmError
        from talm.train.rewards import get_reward

        self.cfg, self.g, self.tokenizer, self.model = cfg, cfg.grpo, tokenizer, model
        self.accum, self.ctx, self.precision = accum, ctx, precision
        self.reward = get_reward(self.g.reward)
        if self.g.max_new_tokens >= cfg.model.context_length:
            raise TalmError(
                f"grpo.max_new_tokens={self.g.max_new_tokens} leaves no room for the prompt in the context of "
                f"{cfg.model.context_length} tokens: pass a smaller --grpo.max_new_tokens"
            )
        data = read_prompts(cfg.data.dir, vocab_size=tokenizer.vocab_size)
        self.train_prompts = data.splits.get("train") or []
        self.val_prompts = (data.splits.get("val") or [])[: self.g.eval_prompts]
        self.per_micro = cfg.train.batch_size // self.g.group_size  # prompts per micro-batch and process
        self.sampler = PromptSampler(
            len(self.train_prompts), self.per_micro * ctx.world_size, seed=cfg.train.seed, rank=ctx.rank,
            world_size=ctx.world_size,
        )  # fmt: skip
        self.fixed_length = _sharded(model)
        self.rewarded = 0.0  # replies with a reward above 0 so far in this session, over every process
        self.steps = 0
        self._clock: dict[str, float] = {"start": 0.0, "sampling": 0.0, "tokens": 0.0, "training_tps": 0.0}

    @property
    def has_val(self) -> bool:
        return bool(self.val_prompts)

    def describe(self) -> list[str]:
        return [
            f"prompt data: {len(self.train_prompts):,} prompts, {len(self.val_prompts):,} held out for val_pass@1; "
            f"{self.per_micro * self.accum * self.ctx.world_size} prompts x {self.g.group_size} replies per step "
            f"(up to {self.g.max_new_tokens} tokens, temperature {self.g.temperature}), reward {self.g.reward}"
        ]

    def check_next(self) -> None:
        pass  # read_prompts checked every prompt's ids against the vocabulary

    def _time_last_step(self, now: float) -> None:
        """Training tokens/s of the step before: its wall time less its sampling, unless an evaluation or a save
        came in between (they mark the clock with start 0)."""
        c = self._clock
        if c["start"] > 0 and now > c["start"] + c["sampling"]:
            c["training_tps"] = c["tokens"] / (now - c["start"] - c["sampling"])
        c["start"] = now

    def step_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor]]:
        import time

        self._time_last_step(time.perf_counter())
        chosen = [self.train_prompts[i] for _ in range(self.accum) for i in self.sampler.next_prompts()]
        t0 = time.perf_counter()
        replies = sample_groups(
            self.model, [p.ids for p in chosen], self.g.group_size, max_new_tokens=self.g.max_new_tokens,
            eot_id=self.tokenizer.eot_id, seed=self.sampler.next_seed(), temperature=self.g.temperature,
            top_k=self.g.top_k, batch_size=self.cfg.train.batch_size, fixed_length=self.fixed_length,
            vocab_size=self.tokenizer.vocab_size, autocast=self.precision.autocast,
        )  # fmt: skip
        self._clock["sampling"] = time.perf_counter() - t0
        k = self.g.group_size
        rewards = score_replies(
            self.tokenizer, replies, [p.answer for p in chosen for _ in range(k)], self.reward
        )
        self.rewarded += float(dist.all_reduce_sum((rewards > 0).sum().float().to(self.ctx.device)))
        self.steps += 1
        advantages = group_advantages(rewards.view(-1, k), normalise_std=self.g.normalise_std).flatten()
        lengths = [len(r) for r in replies]
        count = sum(lengths) if self.g.loss_mean == "token" else len(replies)
        self._clock["tokens"] = float(sum(lengths) + sum(len(p.ids) for p in chosen) * k)
        stats = torch.tensor(
            [rewards.mean().item(), sum(lengths) / len(lengths), sum(lengths) / max(self._clock["sampling"], 1e-9),
             self._clock["training_tps"]], device=self.ctx.device,
        )  # fmt: skip
        rows = self.cfg.train.batch_size
        prompts = [p.ids for p in chosen for _ in range(k)]
        for m in range(self.accum):
            part = slice(m * rows, (m + 1) * rows)
            x, y = rollout_tensors(
                prompts[part], replies[part], context_length=self.cfg.model.context_length,
                pad_id=self.tokenizer.eot_id,
            )  # fmt: skip
            device = self.ctx.device
            yield x.to(device), y.to(device), advantages[part].to(device), max(count, 1) / self.accum, stats

    def loss(self, net: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, advantages, denominator, stats = batch
        logits = net(x)[0]
        return policy_loss(logits, y, advantages, mean=self.g.loss_mean, denominator=denominator), stats

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """val_pass@1: the share of held-out prompts whose greedy reply earns a reward, over every process (each
        takes every world_size-th prompt; under FSDP all run as many batches, padded with uncounted prompts)."""
        from talm.eval.generative import generate_replies, reply_text

        self._clock["start"] = 0.0  # this step's wall time is no training time
        mine = self.val_prompts[self.ctx.rank :: self.ctx.world_size]
        padded = mine + self.val_prompts[: -(-len(self.val_prompts) // self.ctx.world_size) - len(mine)]
        replies = generate_replies(
            model, [p.ids for p in padded], max_new_tokens=self.g.max_new_tokens, eot_id=self.tokenizer.eot_id,
            batch_size=self.cfg.train.batch_size, fixed_length=self.fixed_length,
            vocab_size=self.tokenizer.vocab_size, autocast=self.precision.autocast,
        )  # fmt: skip
        eot = self.tokenizer.eot_id
        right = sum(
            self.reward(reply_text(self.tokenizer, r, eot), p.answer) > 0
            for r, p in zip(replies[: len(mine)], mine, strict=True)
        )
        total = dist.all_reduce_sum(torch.tensor([float(right), float(len(mine))], device=self.ctx.device))
        model.train()
        if self.rewarded == 0:
            dist.print0(self.no_reward_note(), ctx=self.ctx)
        return {"val_pass@1": round(float(total[0] / total[1].clamp(min=1)), 6)}

    def no_reward_note(self) -> str:
        return (
            f"grpo: no sampled reply has earned a reward in {self.steps} steps of this session, so there is "
            "nothing to learn from (every advantage is 0): start from a model that sometimes answers right (SFT on "
            "the task first), or raise --grpo.group_size, --grpo.temperature or --grpo.max_new_tokens"
        )

    def best_score(self, metrics: dict[str, float]) -> float:
        return -metrics["val_pass@1"]

    def scores_text(self, metrics: dict[str, Any]) -> str:
        text = (
            "no evaluation"
            if metrics.get("val_pass@1") is None
            else f"val pass@1 {metrics['val_pass@1']:.4f}"
        )
        return text + (f"; {self.no_reward_note()}" if self.steps and self.rewarded == 0 else "")

    def state_dict(self) -> dict[str, Any]:
        self._clock["start"] = 0.0  # a save: this step's wall time is no training time
        return {"grpo_sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["grpo_sampler"])
