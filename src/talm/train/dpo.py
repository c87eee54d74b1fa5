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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
