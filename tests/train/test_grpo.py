"""GRPO's pieces (talm.train.grpo): the prompt sampler's order, split over ranks and resumed exactly; advantages
relative to the group; the loss on reply tokens only, in its two normalisations; and a toy task where a policy
gradient with the right sign and advantages must learn within a few steps."""

from __future__ import annotations

import pytest
import torch
from conftest import BASE_TOKENIZER

from talm.model.config import ModelConfig
from talm.model.gpt import GPT
from talm.tokenizer.api import Tokenizer
from talm.train.grpo import (
    PromptSampler,
    group_advantages,
    policy_loss,
    rollout_tensors,
    sample_groups,
    score_replies,
)
from talm.train.rewards import get_reward


def test_every_prompt_once_per_epoch_split_over_ranks_and_resumed_exactly() -> None:
    one = PromptSampler(10, 4, seed=3)
    steps = [one.next_prompts() for _ in range(5)]  # 20 prompts: two epochs
    assert sorted(sum(steps[:2], []) + steps[2][:2]) == list(range(10))
    assert sum(steps[:2], []) + steps[2][:2] != list(range(10))  # shuffled
    assert sum(steps[2:], [])[2:] != sum(steps, [])[:8]  # the second epoch is another order
    ranks = [PromptSampler(10, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in steps:
        assert sorted(ranks[0].next_prompts() + ranks[1].next_prompts()) == sorted(step)
    assert ranks[0].next_seed() != ranks[1].next_seed()

    first = PromptSampler(10, 4, seed=3)
    for _ in range(3):
        first.next_prompts(), first.next_seed()
    resumed = PromptSampler(10, 4, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.next_prompts() for _ in range(4)] == [first.next_prompts() for _ in range(4)]
    assert resumed.next_seed() == first.next_seed()


def test_advantages_are_relative_to_the_group() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv = group_advantages(rewards)
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert torch.equal(adv[1], torch.zeros(4))  # nothing to learn from a group that agrees
    assert torch.allclose(adv[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]))
    normalised = group_advantages(rewards, normalise_std=True)
    assert torch.allclose(normalised[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-4)
    assert torch.equal(normalised[1], torch.zeros(4))


def test_targets_are_the_reply_tokens_only() -> None:
    x, y = rollout_tensors([[1, 2, 3], [4]], [[5, 6, 9], [7, 9]], context_length=16, pad_id=0)
    assert x.tolist() == [[1, 2, 3, 5, 6], [4, 7, 0, 0, 0]]
    assert y.tolist() == [[-1, -1, 5, 6, 9], [7, 9, -1, -1, -1]]
    x, y = rollout_tensors([[1, 2, 3, 4, 5]], [[6, 7]], context_length=4, pad_id=0)  # the prompt's start goes
    assert x.tolist() == [[3, 4, 5, 6]] and y.tolist() == [[-1, -1, 6, 7]]


def test_the_loss_in_its_two_normalisations() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    _, y = rollout_tensors([[1, 2, 3], [4]], [[5, 6, 9], [7, 9]], context_length=16, pad_id=0)
    adv = torch.tensor([1.0, -2.0])
    logp = torch.log_softmax(logits, dim=-1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    first, second = logp[0, 2:].sum(), logp[1, :2].sum()
    token = policy_loss(logits, y, adv)
    assert token.item() == pytest.approx((-(1.0 * first) - (-2.0 * second)).item() / 5, rel=1e-5)
    sequence = policy_loss(logits, y, adv, mean="sequence")
    assert sequence.item() == pytest.approx((-(first / 3) + 2.0 * second / 2).item() / 2, rel=1e-5)
    assert policy_loss(logits, y, adv, denominator=10.0).item() == pytest.approx(token.item() / 2, rel=1e-5)


def test_replies_are_rewarded_against_their_own_reference() -> None:
    tokenizer = Tokenizer.from_file(BASE_TOKENIZER)
    eot = tokenizer.eot_id
    replies = [tokenizer.encode("It is 72.") + [eot], tokenizer.encode("maybe 71"), tokenizer.encode("72")]
    rewards = score_replies(tokenizer, replies, ["72", "72", "5"], get_reward("final_number"))
    assert rewards.tolist() == [1.0, 0.0, 0.0]


def test_a_toy_task_is_learned_in_a_few_steps() -> None:
    """Reward 1 for answering with token 5: from about 1/16 of the samples, GRPO must make it the likeliest
    reply within 15 steps (a flipped gradient sign drives it towards 0 instead)."""
    torch.manual_seed(0)
    vocab, target, eot = 16, 5, 15
    model = GPT(ModelConfig(vocab_size=vocab, context_length=16, n_layer=1, n_head=2, d_model=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    prompts = [[1, 2], [3], [4, 6, 7], [8]]

    def p_target() -> float:
        with torch.no_grad():
            x = [torch.tensor([p]) for p in prompts]
            return sum(torch.softmax(model(t)[0][0, -1], -1)[target].item() for t in x) / len(prompts)

    before = p_target()
    for step in range(15):
        replies = sample_groups(model, prompts, 8, max_new_tokens=1, eot_id=eot, seed=step)
        rewards = torch.tensor([float(r[0] == target) for r in replies]).view(len(prompts), 8)
        advantages = group_advantages(rewards).flatten()
        x, y = rollout_tensors([p for p in prompts for _ in range(8)], replies, context_length=16, pad_id=eot)
        model.train()
        loss = policy_loss(model(x)[0], y, advantages)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before < 0.15 and p_target() > 0.5, (before, p_target())
