"""Generation: token filtering, seeded sampling, the KV cache, stopping, prompts, streaming text, talm.load."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import BASE_TOKENIZER, ORIGINAL_TOKENIZER, varied_model

import talm
from talm.config import validate
from talm.errors import TalmError
from talm.model.gpt import GPT
from talm.tokenizer.api import Tokenizer
from talm.use.config import SampleConfig
from talm.use.load import load
from talm.use.sample import (
    FINISHED,
    GenerationStats,
    IncrementalDecoder,
    encode_prompt,
    filter_logits,
    fit_prompt,
    generate,
    generate_ids,
    prepare_prompt,
    sample_next,
    stream_samples,
)


def run(model: GPT, prompts: list[list[int]], n: int, **kw) -> list[list[int]]:
    """The tokens generate_ids yields, as one list per row."""
    steps = list(generate_ids(model, prompts, max_new_tokens=n, **kw))
    return [[step[b] for step in steps] for b in range(len(prompts))]


# ------------------------------------------------------------------------------------------------ filtering


def test_top_k_keeps_the_k_likeliest_in_vocabulary_order() -> None:
    probs = torch.tensor([0.0625, 0.5, 0.125, 0.25, 0.0625])
    kept = filter_logits(probs.log(), top_k=2).isfinite()
    assert kept.tolist() == [False, True, False, True, False]
    assert filter_logits(probs.log(), top_k=5).isfinite().all()


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.3, [False, True, False, False, False]),  # the likeliest token alone already has 0.5
        (0.5, [False, True, False, False, False]),
        (0.6, [False, True, False, True, False]),  # 0.5 + 0.25
        (0.75, [False, True, False, True, False]),
        (0.8, [False, True, True, True, False]),  # 0.5 + 0.25 + 0.125
        (1.0, [True, True, True, True, True]),
    ],
)
def test_top_p_keeps_the_smallest_nucleus(top_p: float, expected: list[bool]) -> None:
    probs = torch.tensor([0.0625, 0.5, 0.125, 0.25, 0.0625])
    assert filter_logits(probs.log(), top_p=top_p).isfinite().tolist() == expected


def test_filters_work_row_by_row() -> None:
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.125, 0.125, 0.25, 0.5]]).log()
    assert filter_logits(logits, top_p=0.6).isfinite().tolist() == [
        [True, True, False, False],
        [False, False, True, True],
    ]


def test_sampling_follows_the_filtered_distribution() -> None:
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    logits = probs.log().expand(40_000, 4)
    g = torch.Generator().manual_seed(0)
    ids = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    counts = torch.bincount(ids, minlength=4) / ids.numel()
    assert counts[2] == 0 and counts[3] == 0
    assert counts[0].item() == pytest.approx(2 / 3, abs=0.01)
    ids = sample_next(logits, temperature=1.0, generator=g)
    assert (torch.bincount(ids, minlength=4) / ids.numel()).tolist() == pytest.approx(
        probs.tolist(), abs=0.01
    )


def test_temperature_sharpens_and_zero_is_greedy() -> None:
    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(20_000, 3)
    g = torch.Generator().manual_seed(0)
    cold = (sample_next(logits, 0.5, generator=g) == 0).float().mean().item()
    warm = (sample_next(logits, 2.0, generator=g) == 0).float().mean().item()
    assert cold == pytest.approx(0.25 / (0.25 + 0.09 + 0.04), abs=0.015)  # p^(1/T), renormalised
    assert warm < 0.5 < cold
    assert sample_next(logits[:3], 0.0, top_k=1, top_p=0.1).tolist() == [0, 0, 0]


# ------------------------------------------------------------------------------------------------ the loop


def test_seed_makes_sampling_reproducible() -> None:
    model = varied_model()
    kw = {"temperature": 1.0, "top_k": 50, "top_p": 0.95}
    a = run(model, [[1, 2, 3]], 30, seed=7, **kw)
    assert run(model, [[1, 2, 3]], 30, seed=7, **kw) == a
    assert run(model, [[1, 2, 3]], 30, seed=8, **kw) != a


@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_kv_cache_gives_the_same_greedy_tokens(n_kv_head: int | None) -> None:
    # The model-level half (the cache's logits, position by position, are the full forward's) is in
    # tests/model/test_gpt.py.
    model = varied_model(n_kv_head=n_kv_head)
    with_cache = run(model, [[5, 6, 7]], 25, temperature=0.0)
    without = run(model, [[5, 6, 7]], 25, temperature=0.0, use_cache=False)
    assert with_cache == without
    assert len(set(with_cache[0])) > 5  # a real sequence, not one token repeated


def test_generation_goes_on_past_the_context_the_same_with_and_without_cache() -> None:
    model = varied_model(context=16)
    with_cache = run(model, [[1, 2, 3, 4, 5]], 60, temperature=0.0)
    assert len(with_cache[0]) == 60
    assert with_cache == run(model, [[1, 2, 3, 4, 5]], 60, temperature=0.0, use_cache=False)
    sampled = run(model, [[1, 2]], 40, temperature=1.0, seed=3)
    assert sampled == run(model, [[1, 2]], 40, temperature=1.0, seed=3, use_cache=False)


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_prompts_of_different_lengths_match_one_at_a_time(use_cache: bool) -> None:
    model = varied_model(n_kv_head=2)
    prompts = [[9, 8, 7, 6, 5, 4, 3], [1], [42, 17]]
    batched = run(model, prompts, 12, temperature=0.0, use_cache=use_cache)
    alone = [run(model, [p], 12, temperature=0.0)[0] for p in prompts]
    assert batched == alone


def test_stops_at_eot_row_by_row() -> None:
    model = varied_model()
    free = run(model, [[3, 1, 4], [2, 7]], 20, temperature=0.0)
    # Make the 4th token row 0 generates the end-of-text token: row 0 ends there, row 1 goes on.
    eot = free[0][3]
    first = free[0].index(eot)
    stopped = run(model, [[3, 1, 4], [2, 7]], 20, temperature=0.0, eot_id=eot)
    assert stopped[0][: first + 1] == free[0][: first + 1]
    assert all(t == FINISHED for t in stopped[0][first + 1 :])
    if eot not in free[1]:
        assert stopped[1] == free[1]
    # A single row stops the whole loop at once.
    alone = list(generate_ids(model, [[3, 1, 4]], max_new_tokens=20, temperature=0.0, eot_id=eot))
    assert [s[0] for s in alone] == free[0][: first + 1]


def test_prompts_must_fit() -> None:
    model = varied_model(context=16)
    with pytest.raises(ValueError, match="longer than the context"):
        run(model, [list(range(17))], 3)
    with pytest.raises(ValueError, match="at least one token"):
        run(model, [[]], 3)


def test_generation_leaves_the_model_mode_alone() -> None:
    model = varied_model()
    model.train()
    run(model, [[1]], 3, temperature=0.0)
    assert model.training


# ------------------------------------------------------------------------------------------------ text


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(BASE_TOKENIZER)


def test_prompt_encoding(tokenizer: Tokenizer) -> None:
    eot = tokenizer.eot_id
    assert encode_prompt(tokenizer, "") == [eot]
    assert encode_prompt(tokenizer, "Hello") == tokenizer.encode("Hello")
    assert encode_prompt(tokenizer, "a <|user|> b") == tokenizer.encode("a <|user|> b")  # plain text
    assert encode_prompt(tokenizer, "  \n") == tokenizer.encode("  \n")  # whitespace is a prompt
    assert encode_prompt(tokenizer, "<|endoftext|>", allow_special=True) == [eot]
    assert tokenizer.special_tokens["<|user|>"] in encode_prompt(tokenizer, "<|user|> Hi", allow_special=True)


@pytest.mark.parametrize(
    ("prompt", "allow_special", "match"),
    [
        ("<|endoftext|>", False, "--allow-special"),
        (" <|user|>\n<|assistant|> ", False, "--allow-special"),
        ("<|user|>", True, "nothing to continue"),
        ("<|endoftext|><|assistant|>", True, "nothing to continue"),
    ],
)
def test_prompt_of_only_special_tokens_is_refused(
    tokenizer: Tokenizer, prompt: str, allow_special: bool, match: str
) -> None:
    with pytest.raises(TalmError, match=match):
        encode_prompt(tokenizer, prompt, allow_special=allow_special)


def test_fit_prompt_cuts_from_the_left() -> None:
    assert fit_prompt([1, 2, 3, 4, 5], 3) == ([3, 4, 5], 2)
    assert fit_prompt([1, 2], 3) == ([1, 2], 0)


def test_prepare_prompt_encodes_cuts_and_says_so(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("word " * 10)
    assert prepare_prompt(tokenizer, "word " * 10, len(ids)) == (ids, None)
    kept, notice = prepare_prompt(tokenizer, "word " * 10, 4)
    assert kept == ids[-4:]
    assert notice == (
        f"prompt is {len(ids)} tokens, longer than the model's context of 4: its first {len(ids) - 4} tokens "
        "are left out"
    )
    assert prepare_prompt(tokenizer, "", 4) == ([tokenizer.eot_id], None)
    with pytest.raises(TalmError, match="--allow-special"):
        prepare_prompt(tokenizer, "<|endoftext|>", 4)


def test_incremental_decoder_prints_only_whole_characters(tokenizer: Tokenizer) -> None:
    text = "naïve 日本語 🙂 ok"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some characters do span several tokens
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_samples_shows_rows_in_order(tokenizer: Tokenizer) -> None:
    model = varied_model(vocab=tokenizer.vocab_size)
    config = SampleConfig(max_new_tokens=12, temperature=1.0, num_samples=2, seed=0)
    events = list(stream_samples(model, tokenizer, [[10, 11], [12]], config))
    rows = [row for row, _ in events]
    assert rows == sorted(rows) and set(rows) == {0, 1, 2, 3}
    assert [piece for _, piece in events].count(None) == 4
    ids = run(model, [[10, 11], [10, 11], [12], [12]], 12, temperature=1.0, seed=0, eot_id=tokenizer.eot_id)
    for row in range(4):
        text = "".join(p for r, p in events if r == row and p is not None)
        expected = [t for t in ids[row] if t not in (FINISHED, tokenizer.eot_id)]
        assert text == tokenizer.decode(expected)


class EndsAt:
    """`tokenizer` with another id as its <|endoftext|>."""

    def __init__(self, tokenizer: Tokenizer, eot_id: int) -> None:
        self.tokenizer, self.eot_id = tokenizer, eot_id

    def __getattr__(self, name: str) -> object:
        return getattr(self.tokenizer, name)


def test_stream_samples_counts_why_each_row_ended_and_the_time(tokenizer: Tokenizer) -> None:
    model = varied_model(vocab=tokenizer.vocab_size, context=32)
    ids = run(model, [[10, 11]], 30, temperature=0)[0]
    end = ids[5]
    cases = [  # (eot id, max_new_tokens) -> why the row ended
        (end, 30, {"end": 1}),
        (-1, 5, {"max_new_tokens": 1}),
        (-1, 30, {"context": 1}),  # 2 prompt tokens + 30 fill the context of 32
    ]
    for eot, most, why in cases:
        stats = GenerationStats()
        config = SampleConfig(max_new_tokens=most, temperature=0)
        list(stream_samples(model, EndsAt(tokenizer, eot), [[10, 11]], config, stats=stats))
        assert dict(stats.ended_by) == why and stats.seconds > 0
        assert stats.tokens == (ids.index(end) + 1 if eot == end else most)
    line = stats.summary("cpu")
    assert re.fullmatch(
        r"generated 30 tokens in [\d.]+ s \([\d,]+ tokens/s\) on cpu with \d+ thread\(s\); stopped at: a full context \(1\)",
        line,
    )


def test_generate_yields_text_and_warns_about_a_cut_prompt(tokenizer: Tokenizer) -> None:
    model = varied_model(vocab=tokenizer.vocab_size, context=16)
    prompt = tokenizer.encode("To be or not")
    pieces = list(generate(model, tokenizer, "To be or not", max_new_tokens=10, seed=1))
    ids = run(model, [prompt], 10, temperature=0.8, seed=1, eot_id=tokenizer.eot_id)[0]
    ids = [i for i in ids if i not in (FINISHED, tokenizer.eot_id)]
    assert len(ids) == 10  # the requested count (the random model never picks <|endoftext|> here)
    assert "".join(pieces) == tokenizer.decode(ids) and len(pieces) <= 10 and all(pieces)
    assert pieces == list(generate(model, tokenizer, "To be or not", max_new_tokens=10, seed=1))
    assert pieces != list(generate(model, tokenizer, "To be or not", max_new_tokens=10, seed=2))
    with pytest.warns(UserWarning, match="longer than the model's context of 16"):
        list(generate(model, tokenizer, "word " * 40, max_new_tokens=3, seed=1))


# ------------------------------------------------------------------------------------------------ loading


def test_load_returns_model_and_tokenizer(tiny_model_dir) -> None:
    model, tok = talm.load(tiny_model_dir)
    assert isinstance(model, GPT) and not model.training
    assert tok.fingerprint == Tokenizer.from_file(BASE_TOKENIZER).fingerprint
    best, _ = load(tiny_model_dir / "best")  # a checkpoint directory works too
    for a, b in zip(model.parameters(), best.parameters(), strict=True):
        assert torch.equal(a, b)
    text = "".join(talm.generate(model, tok, "Hello", max_new_tokens=5, temperature=0))
    greedy = run(model, [tok.encode("Hello")], 5, temperature=0.0, eot_id=tok.eot_id)[0]
    assert text == tok.decode([i for i in greedy if i not in (FINISHED, tok.eot_id)])


def test_a_model_loaded_for_generation_on_cpu_stores_its_matrices_column_major(tiny_model_dir) -> None:
    from talm.use.load import load_checkpoint

    plain, tok, _ = load_checkpoint(tiny_model_dir, device="cpu")
    fast, _, _ = load_checkpoint(tiny_model_dir, device="cpu", for_generation=True)
    linears = [(n, p) for n, p in fast.named_parameters() if p.dim() == 2 and "emb" not in n]
    assert linears and all(p.stride() == (1, p.shape[0]) for _, p in linears)  # transposed in memory
    assert all(p.is_contiguous() for p in plain.parameters())  # what saving and training need
    for (_, a), b in zip(fast.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)  # the same values
    prompt = [tok.encode("Hello")]
    assert run(fast, prompt, 8, temperature=0.0) == run(plain, prompt, 8, temperature=0.0)


def test_talm_load_is_the_function_after_the_loading_module_is_imported(tiny_model_dir) -> None:
    import talm.use.load

    model, tok = talm.load(tiny_model_dir, device="cpu")  # a submodule named `load` would shadow it
    assert (
        callable(talm.load) and talm.load is talm.use.load.load and tok.vocab_size == model.config.vocab_size
    )


def test_generation_never_picks_an_id_beyond_the_vocab_limit() -> None:
    model = varied_model(vocab=100)
    free = run(model, [[1, 2, 3]] * 4, 30, temperature=2.0, seed=0)
    assert max(max(row) for row in free) >= 60  # without a limit, high ids do come up
    limited = run(model, [[1, 2, 3]] * 4, 30, temperature=2.0, seed=0, vocab_size=60)
    assert max(max(row) for row in limited) < 60
    first = model(torch.tensor([[1, 2, 3]]))[0][0, -1]
    greedy = run(model, [[1, 2, 3]], 1, temperature=0.0, vocab_size=60)[0][0]
    assert greedy == int(first[:60].argmax())  # the likeliest among the allowed ids


def test_load_bad_inputs(tiny_model_dir, tmp_path) -> None:
    with pytest.raises(TalmError, match="not found"):
        load(tmp_path / "models" / "nope")
    empty = tmp_path / "models" / "empty"
    empty.mkdir()
    with pytest.raises(TalmError, match="holds no checkpoint"):
        load(empty)
    with pytest.raises(TalmError, match="not a checkpoint directory"):
        load(tiny_model_dir, checkpoint=str(tmp_path))
    shutil.copyfile(ORIGINAL_TOKENIZER, tiny_model_dir / "tokenizer.json")
    with pytest.raises(TalmError, match="fingerprint"):
        load(tiny_model_dir)
    (tiny_model_dir / "tokenizer.json").unlink()
    with pytest.raises(TalmError, match="tokenizer file .* is missing"):
        load(tiny_model_dir)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("top_p", 0.0, "greater than 0"),
        ("top_p", 1.5, "less than or equal to 1"),
        ("temperature", -0.1, "greater than or equal to 0"),
        ("top_k", 0, "greater than or equal to 1"),
        ("max_new_tokens", 0, "greater than or equal to 1"),
    ],
)
def test_sample_config_rejects_bad_values(field: str, value: float, match: str) -> None:
    with pytest.raises(TalmError, match=match):
        validate(SampleConfig, {field: value}, {field: "--" + field.replace("_", "-")})


def test_import_talm_does_not_import_torch() -> None:
    code = "import sys, talm; assert 'torch' not in sys.modules; talm.Tokenizer; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
