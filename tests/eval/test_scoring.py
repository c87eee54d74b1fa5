"""The scorer against answers known by construction and against log-probs computed one token at a time."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import BASE_TOKENIZER, varied_model
from torch import nn

from talm.eval.scoring import (
    centered,
    choice_metrics,
    encode_examples,
    encode_pair,
    fit,
    last_word_metrics,
    score_tokens,
)
from talm.eval.tasks import Example
from talm.tokenizer.api import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(BASE_TOKENIZER)


class LikesTokens(nn.Module):
    """Hand-built logits: whatever the context, `liked` token ids get logit `boost`, every other id 0."""

    def __init__(self, vocab: int, liked: set[int], boost: float = 5.0, context_length: int = 64) -> None:
        super().__init__()
        self.config = type("Config", (), {"context_length": context_length, "vocab_size": vocab})()
        self.table = nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            self.table[list(liked)] = boost

    def forward(
        self, idx: torch.Tensor, at: torch.Tensor | None = None, **layout: Any
    ) -> tuple[torch.Tensor, None]:
        logits = self.table.expand(*idx.shape, -1)  # the same whatever the context: `layout` changes nothing
        return (logits if at is None else logits[at]), None  # `at`: GPT.forward's chosen positions


def test_encode_pair_splits_as_the_harness_and_starts_a_document(tok: Tokenizer) -> None:
    context, continuation = encode_pair(tok, "Question: why?\nAnswer:", " because")
    assert context[0] == tok.eot_id
    assert context[1:] + continuation == tok.encode("Question: why?\nAnswer: because")
    assert tok.decode(continuation) == " because"
    # trailing spaces of the context move to the continuation (word-boundary tokenization)
    assert encode_pair(tok, "Answer: ", "yes") == encode_pair(tok, "Answer:", " yes")
    assert encode_pair(tok, "", "hello") == ([tok.eot_id], tok.encode("hello"))


def test_fit_cuts_the_oldest_context_first() -> None:
    assert fit(([0, 1, 2, 3, 4, 5], [6, 7]), 5) == ([2, 3, 4, 5, 6, 7], 2)
    assert fit(([0], [1, 2, 3, 4, 5, 6, 7]), 4) == (
        [3, 4, 5, 6, 7],
        4,
    )  # a continuation longer than the context


def test_log_likelihoods_equal_token_by_token_sums() -> None:
    """Batched, padded, sorted scoring gives each request the sum of log p(token | prefix) computed alone."""
    model = varied_model(vocab=100, context=32)
    gen = torch.Generator().manual_seed(0)
    requests = []
    for n_ctx, n_cont in [(1, 1), (5, 3), (12, 7), (3, 1), (20, 20), (9, 2), (2, 11)]:
        ids = torch.randint(0, 100, (n_ctx + n_cont,), generator=gen).tolist()
        requests.append((ids[:n_ctx], ids[n_ctx:]))
    got = score_tokens(model, requests, batch_size=3)
    for (context, continuation), (ll, greedy) in zip(requests, got, strict=True):
        ids = (context + continuation)[-33:]
        expected, all_greedy = 0.0, True
        with torch.no_grad():
            for k in range(len(ids) - len(continuation), len(ids)):
                logits, _ = model(torch.tensor([ids[:k]]))
                logp = torch.log_softmax(logits[0, -1].double(), dim=-1)
                expected += logp[ids[k]].item()
                all_greedy &= int(logits[0, -1].argmax()) == ids[k]
        assert ll == pytest.approx(expected, abs=1e-4)
        assert greedy == all_greedy
    assert not model.training


def test_greedy_is_true_when_every_token_is_the_argmax() -> None:
    model = LikesTokens(50, {7})
    (ll7, g7), (ll8, g8), (mixed, gm) = score_tokens(model, [([1], [7, 7]), ([1], [8]), ([1], [7, 8])])
    assert g7 and not g8 and not gm
    assert ll7 == pytest.approx(2 * (5 - math.log(49 + math.exp(5))))


def test_scorer_picks_the_choice_the_model_prefers_by_construction(tok: Tokenizer) -> None:
    right = ["the cat sat on the mat", "a dog ran", "the cat"]
    examples = []
    for gold, text in enumerate(right):
        choices = ["zebra quartz", "xylophone jazz", "quick wombat"]
        choices[gold] = text
        examples.append(Example(tuple(("Q:", " " + c) for c in choices), tuple(choices), gold))
    liked = {i for t in right for i in tok.encode(" " + t)}
    model = LikesTokens(tok.vocab_size, liked)
    scores = score_tokens(model, encode_examples(tok, examples), batch_size=4)
    metrics = choice_metrics(examples, scores)
    assert metrics["acc"] == metrics["acc_norm"] == 1.0
    assert metrics["random"] == pytest.approx(1 / 3)
    assert (
        choice_metrics(examples, [(-ll, g) for ll, g in scores])["acc"] == 0.0
    )  # the same numbers, reversed


def test_acc_norm_divides_by_the_choice_length_in_characters() -> None:
    """With uniform logits every token costs log(V): acc picks the choice of fewest tokens, acc_norm the one with
    the most characters per token of log-likelihood."""
    long_right = Example((("c", " a b"), ("c", " abcdefghij")), ("a b", "abcdefghij"), 1)
    lls = [(-2.0, False), (-3.0, False)]  # 2 and 3 tokens at 1 nat each
    metrics = choice_metrics([long_right], lls)
    assert metrics["acc"] == 0.0  # -2 > -3
    assert metrics["acc_norm"] == 1.0  # -2/3 < -3/10
    tie = Example((("c", " ab"), ("c", " ab")), ("ab", "ab"), 1)
    assert (
        choice_metrics([tie], [(-1.0, False), (-1.0, False)])["acc"] == 0.0
    )  # ties go to the first, as argmax


def test_centered_score_of_random_guessing_is_about_zero() -> None:
    """A model that knows nothing (random logits) on examples whose answers are random: centered ~ 0."""
    gen = torch.Generator().manual_seed(1)
    model = varied_model(vocab=100, context=32, seed=3)
    examples, requests = [], []
    for _ in range(300):
        k = int(torch.randint(2, 6, (1,), generator=gen))
        context = torch.randint(0, 100, (4,), generator=gen).tolist()
        conts = [torch.randint(0, 100, (3,), generator=gen).tolist() for _ in range(k)]
        examples.append(
            Example(
                tuple(("", "xyz") for _ in conts), ("xyz",) * k, int(torch.randint(0, k, (1,), generator=gen))
            )
        )
        requests += [(context, c) for c in conts]
    metrics = choice_metrics(examples, score_tokens(model, requests, batch_size=64))
    assert 0.2 < metrics["random"] < 0.5  # 2 to 5 choices
    assert abs(centered(metrics["acc"], metrics["random"])) < 0.1  # std of the estimate is ~0.035
    assert centered(1.0, 0.25) == 1.0 and centered(0.25, 0.25) == 0.0


def test_last_word_metrics() -> None:
    metrics = last_word_metrics([(-1.0, True), (-3.0, False)])
    assert metrics == {"acc": 0.5, "ppl": pytest.approx(math.exp(2.0)), "random": 0.0}


def one_at_a_time(model: torch.nn.Module, request: tuple[list[int], list[int]]) -> tuple[float, bool]:
    """The unshared computation: the request's own forward pass, every position's logits, float64 log-softmax."""
    ids, n = fit(request, model.config.context_length)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    logp = torch.log_softmax(logits[0, -n:].double(), dim=-1)
    target = torch.tensor(ids[-n:])
    return logp[torch.arange(n), target].sum().item(), bool((logits[0, -n:].argmax(-1) == target).all())


def choice_requests(vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Contexts of 1-30 tokens with 1-5 continuations of 1-14 tokens each (some too long for a 24-token model,
    whose oldest context is then cut, and some whose choices overflow one row), and one request alone."""
    gen = torch.Generator().manual_seed(seed)

    def ids(low: int, high: int) -> list[int]:
        return torch.randint(
            0, vocab, (int(torch.randint(low, high + 1, (1,), generator=gen)),), generator=gen
        ).tolist()

    requests = []
    for _ in range(9):
        context = ids(1, 30)
        requests += [(context, ids(1, 14)) for _ in range(int(torch.randint(1, 6, (1,), generator=gen)))]
    return requests + [([1], [2]), ([3, 4], [])]  # one alone, one with nothing to score


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_contexts_give_the_log_likelihoods_of_each_request_alone(arch: str) -> None:
    """Choices sharing a context in one row (the context computed once) score as each request computed alone,
    with RoPE and with a learned position table, whatever the batch size."""
    from talm.model.config import ModelConfig
    from talm.model.gpt import GPT

    model = varied_model(vocab=100, context=24)
    if arch == "gpt2":
        torch.manual_seed(0)
        config = ModelConfig(
            vocab_size=100, context_length=24, n_layer=2, n_head=4, d_model=32, arch="gpt2", mlp="gelu"
        )
        model = GPT(config).eval()
        with torch.no_grad():  # as varied_model: choices clearly apart
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.3)
    requests = choice_requests(100, seed=1)
    expected = [one_at_a_time(model, r) if r[1] else (0.0, True) for r in requests]
    for batch_size in (1, 3, 64):
        got = score_tokens(model, requests, batch_size=batch_size)
        for (ll, greedy), (want, want_greedy) in zip(got, expected, strict=True):
            assert ll == pytest.approx(want, abs=1e-4)
            assert greedy == want_greedy


def test_a_shared_context_is_computed_once_and_the_output_layer_only_where_scored() -> None:
    """4 choices after one context: the model sees the context once (not 4 times) and the output layer gets one
    row per distinct predicting position (the context's last position predicts every choice's first token)."""
    model = varied_model(vocab=100, context=64)
    context, endings = list(range(1, 21)), [[30, 31, 32], [40], [50, 51], [60, 61, 62, 63, 64]]
    fed, head_rows = [], []
    hooks = [
        model.tok_emb.register_forward_hook(lambda m, args, out: fed.append(args[0].numel())),
        model.lm_head.register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[0])),
    ]
    got = score_tokens(model, [(context, e) for e in endings], batch_size=1)
    for h in hooks:
        h.remove()
    assert sum(fed) == len(context) + sum(
        len(e) - 1 for e in endings
    )  # 27 positions, not 4 rows of 20-24 (87)
    assert sum(head_rows) == 1 + sum(len(e) - 1 for e in endings)  # 8 rows, not 11
    for (ll, _), ending in zip(got, endings, strict=True):
        assert ll == pytest.approx(one_at_a_time(model, (context, ending))[0], abs=1e-4)


def test_rows_of_very_different_widths_do_not_share_a_batch() -> None:
    """A 40-token request and a 4-token one, batch size 64: two forward passes, not one padded to 2 x 40 (a
    batch's padding stays under a quarter of its positions)."""
    model = varied_model(vocab=100, context=64)
    requests = [(list(range(1, 38)), [5, 6, 7, 8]), ([1, 2], [3, 4, 5])]
    fed: list[int] = []
    hook = model.tok_emb.register_forward_hook(lambda m, args, out: fed.append(args[0].numel()))
    got = score_tokens(model, requests, batch_size=64)
    hook.remove()
    assert fed == [40, 4]
    for (ll, _), request in zip(got, requests, strict=True):
        assert ll == pytest.approx(one_at_a_time(model, request)[0], abs=1e-4)
