"""The GPT itself: the KV cache computes what the full forward computes, padding included; the rotary tables."""

from __future__ import annotations

import pytest
import torch

from talm.model.config import ModelConfig
from talm.model.gpt import GPT, KVCache, rope_tables


def varied_model(*, vocab: int = 100, context: int = 32, n_kv_head: int | None = None, seed: int = 0) -> GPT:
    """A tiny GPT whose random weights are large enough that different tokens give clearly different logits."""
    torch.manual_seed(seed)
    model = GPT(
        ModelConfig(
            vocab_size=vocab, context_length=context, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=32
        )
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


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
