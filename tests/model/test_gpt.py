"""The GPT itself: causality, learning, the KV cache computing what the full forward computes (padding included),
the rotary tables, and the FLOPs per token that MFU is measured against."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import varied_model

from talm.model.config import ModelConfig
from talm.model.gpt import GPT, KVCache, rope_tables


@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_kv_cache_logits_position_by_position_are_the_full_forward_logits(n_kv_head: int | None) -> None:
    # (Moved from tests/use/test_sample.py, whose test keeps the generation-level half: the same greedy tokens.)
    model = varied_model(n_kv_head=n_kv_head)
    seq = torch.randint(0, 100, (1, 28), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(seq)[0]
        cache = KVCache(model.config, 1, seq.shape[1], "cpu", torch.float32)
        parts = [model(seq[:, :3], cache=cache)[0]] + [
            model(seq[:, t : t + 1], cache=cache)[0] for t in range(3, seq.shape[1])
        ]
    assert cache.length == seq.shape[1]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


def test_a_left_padded_row_in_the_cache_computes_what_it_would_alone() -> None:
    model = varied_model(n_kv_head=2)
    short, long = [7, 8, 9], [1, 2, 3, 4, 5, 6]
    batch = torch.tensor([[0, 0, 0, *short], long])  # the short row behind 3 padding positions
    with torch.no_grad():
        cache = KVCache(model.config, 2, 8, "cpu", torch.float32, pad=torch.tensor([3, 0]))
        first = model(batch, cache=cache)[0]
        step = model(torch.tensor([[10], [10]]), cache=cache)[0]
        alone_short = model(torch.tensor([[*short, 10]]))[0]
        alone_long = model(torch.tensor([[*long, 10]]))[0]
    torch.testing.assert_close(first[0, 3:], alone_short[0, :3], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step[0, 0], alone_short[0, 3], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(first[1], alone_long[0, :6], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step[1, 0], alone_long[0, 6], atol=1e-4, rtol=1e-4)


def test_sequences_longer_than_the_context_are_refused() -> None:
    model = varied_model(context=8)
    with pytest.raises(ValueError, match="exceeds the model's context_length=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    cache = KVCache(model.config, 1, 8, "cpu", torch.float32)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="sequence of 9 tokens"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_len=9"):
        KVCache(model.config, 1, 9, "cpu", torch.float32)


def test_rotary_tables_follow_the_config_and_are_not_saved_with_the_weights() -> None:
    model = varied_model(context=16)
    cos, sin = rope_tables(model.config.head_dim, 16, model.config.rope_theta)
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)
    assert cos[0].eq(1).all() and sin[0].eq(0).all()  # position 0 is not rotated
    assert not any(name.startswith("rope_") for name in model.state_dict())


# ------------------------------------------------------------------------------------------------ training properties

TINY = {"vocab_size": 1024, "n_layer": 2, "n_head": 2, "d_model": 64, "context_length": 32}


def test_causality() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY)).eval()
    x = torch.randint(0, 1024, (2, 32))
    changed = x.clone()
    changed[:, 20:] = torch.randint(0, 1024, (2, 12))
    a, b = model(x)[0], model(changed)[0]
    assert torch.equal(a[:, :20], b[:, :20])  # the past never sees the future
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_initial_loss_is_close_to_ln_vocab() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    _, loss = model(torch.randint(0, 1024, (8, 32)), torch.randint(0, 1024, (8, 32)))
    assert abs(loss.item() - math.log(1024)) < 0.1


def test_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    x, y = torch.randint(0, 1024, (4, 32)), torch.randint(0, 1024, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


# ------------------------------------------------------------------------------------------------ compute


def expected_flops_per_token(c: ModelConfig, seq_len: int) -> int:
    """Counted by hand from the architecture (PaLM app. B / nanoGPT): 6 FLOPs per weight of every matmul,
    the output layer's included whether or not it shares the embedding's matrix (the embedding itself is a
    lookup: no FLOPs), plus 12 * n_layer * d_model * seq_len for attention's scores and weighted sum."""
    d, head = c.d_model, c.d_model // c.n_head
    kv = c.n_kv_head or c.n_head
    hidden = c.mlp_hidden or 64 * math.ceil((8 * d // 3) / 64)
    padded_vocab = 64 * math.ceil(c.vocab_size / 64)  # the output matmul computes every padded row
    per_block = d * (c.n_head + 2 * kv) * head + c.n_head * head * d + d * 2 * hidden + hidden * d + 2 * d
    weights = c.n_layer * per_block + d + d * padded_vocab  # blocks, final norm, output layer
    return 6 * weights + 12 * c.n_layer * d * seq_len


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kv", [None, 2])
def test_flops_per_token_count_the_output_layer_tied_or_not(tied: bool, kv: int | None) -> None:
    c = ModelConfig(vocab_size=1000, n_layer=3, n_head=4, n_kv_head=kv, d_model=64, context_length=32)
    c = c.model_copy(update={"tie_embeddings": tied})
    model = GPT(c)
    assert model.flops_per_token() == expected_flops_per_token(c, 32)
    assert model.flops_per_token(seq_len=8) == expected_flops_per_token(c, 8)
    # tying shares a matrix, not a matmul: the compute is the same either way
    other = GPT(c.model_copy(update={"tie_embeddings": not tied}))
    assert model.flops_per_token() == other.flops_per_token()
