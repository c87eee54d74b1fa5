"""The optimizer's parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from talm.model.config import ModelConfig
from talm.model.gpt import GPT
from talm.train.config import OptimConfig
from talm.train.optim import build_optimizer, lr_at, param_groups, schedule


def test_schedule_matches_hand_computed_values() -> None:
    kw = {"max_lr": 1.0, "warmup_steps": 10, "max_steps": 110, "min_lr": 0.1}
    assert lr_at(0, **kw) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_at(4, **kw) == pytest.approx(0.5)
    assert lr_at(9, **kw) == pytest.approx(1.0)  # warmup ends at the peak
    assert lr_at(10, **kw) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(35, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(60, **kw) == pytest.approx(0.55)  # halfway: the middle of max and min
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(10_000, **kw) == pytest.approx(0.1)  # past the end: the floor, never below


def test_schedule_without_warmup_or_decay() -> None:
    assert lr_at(0, max_lr=2.0, warmup_steps=0, max_steps=10, min_lr=0.0) == pytest.approx(2.0)
    assert lr_at(10, max_lr=2.0, warmup_steps=0, max_steps=10, min_lr=0.0) == pytest.approx(0.0)
    assert lr_at(3, max_lr=2.0, warmup_steps=5, max_steps=5, min_lr=0.5) == pytest.approx(2.0 * 4 / 5)
    assert lr_at(7, max_lr=2.0, warmup_steps=5, max_steps=5, min_lr=0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        lr_at(0, max_lr=1.0, warmup_steps=0, max_steps=10, min_lr=-0.1)


@settings(max_examples=200, deadline=None)
@given(
    max_lr=st.floats(1e-6, 10.0),
    ratio=st.floats(0.0, 1.0),
    warmup=st.integers(0, 50),
    extra=st.integers(0, 500),
)
def test_schedule_never_negative_and_monotone_after_warmup(max_lr, ratio, warmup, extra) -> None:
    max_steps = warmup + extra
    lrs = [
        lr_at(s, max_lr=max_lr, warmup_steps=warmup, max_steps=max_steps, min_lr=max_lr * ratio)
        for s in range(max_steps + 20)
    ]
    assert all(lr >= 0 for lr in lrs)
    assert all(lr <= max_lr * (1 + 1e-12) for lr in lrs)
    after = lrs[warmup:]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:], strict=False))
    warm = lrs[:warmup]
    assert all(b >= a for a, b in zip(warm, warm[1:], strict=False))


def test_schedule_from_config() -> None:
    lr = schedule(OptimConfig(lr=1e-3, warmup_steps=2, min_lr_ratio=0.1), max_steps=4)
    assert [round(lr(s), 10) for s in range(5)] == [5e-4, 1e-3, 1e-3, 5.5e-4, 1e-4]


def test_param_groups_split_decay_and_count_tied_weights_once() -> None:
    model = GPT(ModelConfig(vocab_size=100, n_layer=2, n_head=2, d_model=32, context_length=16))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params()
    assert sum(p is model.tok_emb.weight for p in decay["params"]) == 1  # tied with lm_head, listed once


def test_build_optimizer_steps() -> None:
    model = GPT(ModelConfig(vocab_size=100, n_layer=1, n_head=2, d_model=32, context_length=16))
    opt = build_optimizer(model, OptimConfig(lr=1e-2), torch.device("cpu"))
    before = model.tok_emb.weight.detach().clone()
    _, loss = model(torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16)))
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.tok_emb.weight)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_fused_adamw_wherever_torch_has_the_kernel(device: str) -> None:
    model = GPT(ModelConfig(vocab_size=100, n_layer=1, n_head=2, d_model=32, context_length=16))
    opt = build_optimizer(model, OptimConfig(), torch.device(device))
    assert opt.defaults["fused"] is (True if device == "cpu" else None)  # cuda too; mps, meta: foreach
