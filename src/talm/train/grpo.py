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

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from talm.eval.generative import generate_replies, reply_text
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
