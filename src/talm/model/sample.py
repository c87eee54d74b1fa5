"""Generation's core on a bare GPT: pick the next token (greedy, temperature, top-k, top-p) and generate a batch
of prompts with the KV cache. `talm.use.sample` builds the text API on it; training's samples
(`talm.train.samples`) use it too.

`generate_ids` takes a batch of prompts (token ids, of different lengths), left-pads them to one length and
yields the next token of every row at each step. With the KV cache (the default) each step feeds the model one
position per row; without it the model recomputes the whole window, which gives the same tokens and is only
there as a reference (tests, benchmarks/bench_generate.py).

Context limit: a row's window is its last `context_length` tokens. When the window is full, its oldest quarter
is dropped and the cache is rebuilt from the rest, so generation can go on past the context length. Both modes
follow the same rule, so they stay identical however long the generation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from talm.model.gpt import GPT, KVCache

FINISHED = -1  # what generate_ids yields for a row that already ended with <|endoftext|>


# ------------------------------------------------------------------------------------------------------------
# Picking the next token


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float = 1.0) -> torch.Tensor:
    """`logits` (..., V) with every token outside the top_k likeliest, or outside the smallest set of likeliest
    tokens whose probabilities add up to top_p, set to -inf. Ties with the k-th logit are kept."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the likeliest token has 0 before it, so it always stays
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back from sorted order to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (B, V): the likeliest if temperature is 0, else a filtered sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------------------------------------------
# The generation loop


class _Window:
    """The tokens each row currently attends over, as one left-padded (B, W) tensor."""

    def __init__(self, prompts: Sequence[Sequence[int]], device: torch.device) -> None:
        width = max(len(p) for p in prompts)
        self.tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            self.tokens[b, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        self.pad = torch.tensor([width - len(p) for p in prompts], dtype=torch.long, device=device)

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def append(self, next_ids: torch.Tensor) -> None:
        self.tokens = torch.cat((self.tokens, next_ids[:, None]), dim=1)

    def keep_last(self, n: int) -> None:
        dropped = self.width - n
        self.tokens = self.tokens[:, dropped:]
        self.pad = (self.pad - dropped).clamp(min=0)


def _forward_window(
    model: GPT, window: _Window, cache_len: int | None
) -> tuple[torch.Tensor, KVCache | None]:
    """Logits of every row's last position over the whole window; with `cache_len`, also a fresh cache holding
    the window (room for `cache_len` positions). Padded rows go through a cache, which knows the padding."""
    p = next(model.parameters())
    if cache_len is None and not bool(window.pad.any()):
        return model(window.tokens, last_only=True)[0][:, -1], None
    size = cache_len or window.width
    cache = KVCache(model.config, window.tokens.shape[0], size, p.device, p.dtype, pad=window.pad)
    return model(window.tokens, cache=cache, last_only=True)[0][:, -1], cache if cache_len else None


@torch.inference_mode()
def generate_ids(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float = 1.0,
    eot_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    vocab_size: int | None = None,
) -> Iterator[list[int]]:
    """Yield, at each step, the next token id of every prompt's row (FINISHED for a row that already yielded
    `eot_id`), until every row has ended or `max_new_tokens` steps are done.

    `vocab_size` limits the ids picked to those below it: the tokenizer's size, when the model knows more ids
    than its tokenizer (a vocabulary rounded up in training) and the extra ones would not decode.

    Prompts are non-empty lists of token ids, at most `context_length` long (see `fit_prompt`). A row in a batch
    computes what it would alone as long as the batch's longest row fits in the context.
    """
    context = model.config.context_length
    limit = model.config.vocab_size if vocab_size is None else min(vocab_size, model.config.vocab_size)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start from <|endoftext|> for none)")
    if any(len(p) > context for p in prompts):
        raise ValueError(f"a prompt is longer than the context ({context} tokens): cut it with fit_prompt")
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    keep = context - context // 4  # the window's size after its oldest quarter is dropped

    was_training = model.training
    model.eval()
    try:
        window = _Window(prompts, device)

        def cache_room(remaining: int) -> int | None:
            return min(context, window.width + remaining) if use_cache else None

        logits, cache = _forward_window(model, window, cache_room(max_new_tokens - 1))
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            next_ids = sample_next(logits[:, :limit], temperature, top_k, top_p, generator)
            out = torch.where(finished, FINISHED, next_ids)
            yield out.tolist()
            if eot_id is not None:
                finished |= next_ids == eot_id
            remaining = max_new_tokens - step - 1
            if remaining == 0 or bool(finished.all()):
                return
            window.append(next_ids)
            if window.width > context:
                window.keep_last(keep)
                logits, cache = _forward_window(model, window, cache_room(remaining - 1))
            elif cache is not None:
                logits = model(next_ids[:, None], cache=cache)[0][:, -1]
            else:
                logits, _ = _forward_window(model, window, None)
    finally:
        model.train(was_training)
