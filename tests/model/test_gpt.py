"""The GPT itself: causality, learning, the KV cache computing what the full forward computes (padding included),
the rotary tables, the architecture options (QK-norm, ReLU², logit soft-cap, zero-initialised projections, untied
head), and the FLOPs per token that MFU is measured against."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import varied_model

from talm.model.config import ModelConfig
from talm.model.gpt import GPT, KVCache, rope_tables

# Every architecture option alone, and all together (the soft-cap low enough to bite on option_model's logits).
OPTIONS = [
    {},
    {"n_kv_head": 2},
    {"qk_norm": True},
    {"mlp": "relu2"},
    {"logit_softcap": 5.0},
    {"zero_init_proj": True},
    {"tie_embeddings": False},
    {"n_kv_head": 2, "qk_norm": True, "mlp": "relu2", "logit_softcap": 5.0, "tie_embeddings": False},
]


def option_model(options: dict, *, seed: int = 0) -> GPT:
    """conftest's varied_model with architecture `options`, its norm gains (QK-norm's too) not all 1."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=100, context_length=32, n_layer=2, n_head=4, d_model=32, **options))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.2 if p.dim() == 1 else 0.3)
    return model.eval()


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_kv_cache_logits_position_by_position_are_the_full_forward_logits(options: dict) -> None:
    # (Moved from tests/use/test_sample.py, whose test keeps the generation-level half: the same greedy tokens.)
    model = option_model(options)
    seq = torch.randint(0, 100, (1, 28), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(seq)[0]
        cache = KVCache(model.config, 1, seq.shape[1], "cpu", torch.float32)
        parts = [model(seq[:, :3], cache=cache)[0]] + [
            model(seq[:, t : t + 1], cache=cache)[0] for t in range(3, seq.shape[1])
        ]
    assert cache.length == seq.shape[1]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("options", [{}, OPTIONS[-1]], ids=str)
def test_last_only_computes_the_last_positions_logits_of_the_full_forward(options: dict) -> None:
    model = option_model(options)
    seq = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(seq)[0]
        last = model(seq, last_only=True)[0]
        cache = KVCache(model.config, 2, 20, "cpu", torch.float32)
        cached = model(seq, cache=cache, last_only=True)[0]
    assert last.shape == (2, 1, 100)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached, full[:, -1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [{}, OPTIONS[-1]], ids=str)
def test_at_computes_the_chosen_positions_logits_of_the_full_forward_in_row_major_order(
    options: dict,
) -> None:
    model = option_model(options)
    seq = torch.randint(0, 100, (3, 20), generator=torch.Generator().manual_seed(3))
    at = torch.zeros(3, 20, dtype=torch.bool)
    at[0, 17:19] = at[2, 4:9] = at[2, 19] = True  # row 1: none
    with torch.no_grad():
        full = model(seq)[0]
        picked = model(seq, at=at)[0]
    assert picked.shape == (8, 100)
    rows, cols = at.nonzero(as_tuple=True)
    assert rows.tolist() == [0, 0, 2, 2, 2, 2, 2, 2]
    torch.testing.assert_close(picked, full[rows, cols], atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_is_each_kv_head_shared_by_its_group_of_query_heads() -> None:
    # The reference repeats every kv head for its group by hand, as Llama's code does; SDPA's enable_gqa must match.
    from talm.model import gpt

    model = option_model({"n_kv_head": 2})
    seq = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    real_sdpa = gpt.F.scaled_dot_product_attention

    def repeated(q, k, v, *, enable_gqa=False, **kw):  # noqa: ANN001, ANN202
        group = q.shape[1] // k.shape[1]
        return real_sdpa(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), **kw)

    with torch.no_grad():
        fast = model(seq)[0]
        gpt.F.scaled_dot_product_attention = repeated
        try:
            reference = model(seq)[0]
        finally:
            gpt.F.scaled_dot_product_attention = real_sdpa
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [{"n_kv_head": 2}, OPTIONS[-1]], ids=str)
def test_a_left_padded_row_in_the_cache_computes_what_it_would_alone(options: dict) -> None:
    model = option_model(options)
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


def test_an_old_config_validates_with_every_option_off_and_keeps_its_weight_names() -> None:
    """checkpoint.json from before the architecture options: it validates, the options are off, and the model
    has exactly the old weights (so old checkpoints load; the default forward is the old code's)."""
    old = {
        "vocab_size": 100,
        "context_length": 32,
        "n_layer": 1,
        "n_head": 4,
        "n_kv_head": None,
        "d_model": 32,
    }
    old |= {
        "mlp_hidden": None,
        "rope_theta": 10000.0,
        "norm_eps": 1e-5,
        "tie_embeddings": True,
        "dropout": 0.0,
    }
    c = ModelConfig.model_validate(old)
    assert (c.qk_norm, c.mlp, c.logit_softcap, c.zero_init_proj, c.hidden_dim) == (
        False,
        "swiglu",
        None,
        False,
        128,
    )
    block = ["attn_norm", "attn.qkv", "attn.proj", "mlp_norm", "mlp.gate_up", "mlp.down"]
    names = ["tok_emb", *(f"blocks.0.{n}" for n in block), "norm", "lm_head"]
    assert list(GPT(c).state_dict()) == [f"{n}.weight" for n in names]


def test_qk_norm_and_relu2_have_their_own_weights() -> None:
    model = option_model({"qk_norm": True, "mlp": "relu2"})
    shapes = {n: tuple(p.shape) for n, p in model.blocks[0].named_parameters()}
    assert shapes["attn.q_norm.weight"] == shapes["attn.k_norm.weight"] == (8,)  # one gain per head dimension
    assert shapes["mlp.up.weight"] == (128, 32) and shapes["mlp.down.weight"] == (
        32,
        128,
    )  # 4 * d_model, no gate
    assert "mlp.gate_up.weight" not in shapes


def test_logit_softcap_is_cap_tanh_of_the_plain_logits_in_the_loss_too() -> None:
    capped = option_model({"logit_softcap": 2.0})
    plain = GPT(capped.config.model_copy(update={"logit_softcap": None})).eval()
    plain.load_state_dict(capped.state_dict())
    x, y = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        (ours, loss), theirs = capped(x, y), plain(x)[0]
    assert theirs.abs().max() > 4  # the cap bites
    assert ours.abs().max() < 2.0
    torch.testing.assert_close(ours, 2.0 * torch.tanh(theirs / 2.0))
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(ours.reshape(-1, 100), y.reshape(-1)))


def test_zero_init_proj_starts_every_block_as_the_identity() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, zero_init_proj=True))
    zero = [n for n, p in model.named_parameters() if not p.any()]
    assert zero == [f"blocks.{i}.{w}.weight" for i in range(2) for w in ("attn.proj", "mlp.down")]
    x = torch.randint(0, 1024, (2, 32))
    with torch.no_grad():  # each position's logits depend on its own token only: the blocks add nothing yet
        torch.testing.assert_close(model(x)[0], model(x.reshape(-1, 1))[0].reshape(2, 32, -1))
    default = GPT(ModelConfig(**TINY))
    assert all(p.any() for p in default.parameters())


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


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_every_option_trains_its_every_weight(options: dict) -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, **options))
    x, y = torch.randint(0, 1024, (4, 32)), torch.randint(0, 1024, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad.isfinite().all() and p.grad.any() for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0]


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
    if c.mlp == "relu2":  # two matmuls, up and down, 4 * d_model wide
        mlp = 2 * d * (c.mlp_hidden or 4 * d)
    else:  # three: gate, up and down, 8/3 * d_model wide (rounded up to a multiple of 64)
        mlp = 3 * d * (c.mlp_hidden or 64 * math.ceil((8 * d // 3) / 64))
    qk_gains = 2 * head if c.qk_norm else 0
    padded_vocab = 64 * math.ceil(c.vocab_size / 64)  # the output matmul computes every padded row
    per_block = d * (c.n_head + 2 * kv) * head + c.n_head * head * d + mlp + 2 * d + qk_gains
    weights = c.n_layer * per_block + d + d * padded_vocab  # blocks, final norm, output layer
    return 6 * weights + 12 * c.n_layer * d * seq_len


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kv", [None, 2])
@pytest.mark.parametrize(
    "arch", [{}, {"mlp": "relu2"}, {"mlp": "relu2", "qk_norm": True, "logit_softcap": 15.0}]
)
def test_flops_per_token_count_the_output_layer_tied_or_not(tied: bool, kv: int | None, arch: dict) -> None:
    c = ModelConfig(vocab_size=1000, n_layer=3, n_head=4, n_kv_head=kv, d_model=64, context_length=32, **arch)
    c = c.model_copy(update={"tie_embeddings": tied})
    model = GPT(c)
    assert model.flops_per_token() == expected_flops_per_token(c, 32)
    assert model.flops_per_token(seq_len=8) == expected_flops_per_token(c, 8)
    # tying shares a matrix, not a matmul: the compute is the same either way
    other = GPT(c.model_copy(update={"tie_embeddings": not tied}))
    assert model.flops_per_token() == other.flops_per_token()


def test_document_positions_count_from_each_documents_first_token() -> None:
    from talm.model.gpt import document_positions

    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 3]])
    want = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 1, 2, 3, 4, 0, 0]])
    assert torch.equal(document_positions(docs), want)
