"""The batched generation engine: many sequences generated together, each with its own sampling settings, in
one static KV cache (`SlotCache`), with sequences leaving when done and new ones joining at the next step.

Every generating command goes through it: `generate` (`talm.use.sample`), `chat` and `serve` (`talm.use.chat`,
`talm.use.serve`), training's samples (`talm.train.samples`), generative evaluation (`talm.use.lm_eval`). An RL
sampler calls it in one line:

    engine = Engine(model, vocab_size=tokenizer.vocab_size, decode=tokenizer.decode)
    replies = engine.generate(prompts, [Settings(temperature=1.0, seed=s, max_new_tokens=256,
                                                 end_ids=(tokenizer.eot_id,), stop=("\\n\\n",)) for s in seeds])
    # replies[i]: the ids generated for prompts[i] (its end token or stop string's last token included)

or, to stream and to let sequences join while others run (what `serve`'s scheduler does):

    seq = engine.add(prompt_ids, settings)   # any thread; it joins at the next step
    for seq, token in engine.step(): ...     # one token for every active sequence; the done ones leave
    engine.cancel(seq)                       # any thread; it leaves at the next step

How a step works: waiting sequences take free slots (their prompts, all but their last token, are prefilled
into their rows in one forward pass, right-padded: causal attention never looks at the padding); then one batched forward pass feeds every active row its pending token (a joiner's last
prompt token, the others' last pick) at its own position, with a mask that keeps each row to its own keys; then
each row picks its next token with its own settings and its own `torch.Generator`, so a seeded row draws the
same tokens whatever else is in the batch. A row that ended (end token, `max_new_tokens`, a stop string,
cancelled) leaves, and the last row moves into its slot so the active rows stay first (a view of the cache,
not a copy, is what each step attends over).

Context limit: a row's window is its last `context_length` tokens. When the window is full, its oldest quarter
is dropped and the row's cache is rebuilt from the rest, so generation can go on past the context length
(`talm.model.sample.reference_ids` follows the same rule without a cache: the tests' reference).
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from talm.model.gpt import GPT, SlotCache


@dataclass(frozen=True)
class Settings:
    """How one sequence picks its tokens and when it ends. `seed` None draws one from torch's global RNG, so
    `torch.manual_seed` still makes a run repeatable. `stop` strings need the engine's `decode`."""

    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    end_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens must be at least 1": self.max_new_tokens >= 1,
            "temperature must be 0 (greedy) or more": self.temperature >= 0,
            "top_k must be at least 1 (or None)": self.top_k is None or self.top_k >= 1,
            "top_p must be above 0 and at most 1": 0 < self.top_p <= 1,
            "stop strings must not be empty": all(self.stop),
        }
        if problems := [what for what, ok in checks.items() if not ok]:
            raise ValueError(f"bad generation settings: {'; '.join(problems)}")


def row_seed(seed: int | None, row: int) -> int | None:
    """The seed of row `row` of a batch sampled with one `seed` (as `generate -n 4 --seed 0` asks): row 0 keeps
    the seed itself (so one sample with seed s is what it always was), the others one derived from (seed, row)."""
    if seed is None or row == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class Generation:
    """One sequence in the engine: its prompt, what it generated, why it ended (`finish`: "end", "stop",
    "length" or "cancelled"; None while it runs). The engine moves it on through its methods."""

    def __init__(self, prompt: Sequence[int], settings: Settings, generator: torch.Generator) -> None:
        self.prompt = list(prompt)
        self.settings = settings
        self.generator = generator
        self.tokens: list[int] = []
        self.window = list(prompt)  # what the row attends over, its pending token last
        self.finish: str | None = None
        self.cancelled = False
        self.owner: object = None  # the caller's handle (serve: its request), untouched by the engine

    @property
    def done(self) -> bool:
        return self.finish is not None

    def cancel(self) -> None:
        """Ask for the end (from any thread): the engine ends it at its next step."""
        self.cancelled = True

    def end(self, reason: str) -> None:
        self.finish = reason

    def shorten_window(self, keep: int) -> None:
        """Keep the newest `keep` tokens of the window (a full context drops its oldest quarter)."""
        self.window = self.window[-keep:]

    def record(self, token: int, decode: Callable[[list[int]], str] | None) -> None:
        """Add the token picked; end at an end token, a completed stop string, or the token budget."""
        self.tokens.append(token)
        self.window.append(token)
        s = self.settings
        if token in s.end_ids:
            self.finish = "end"
        elif s.stop and self._stopped(decode):
            self.finish = "stop"
        elif len(self.tokens) >= s.max_new_tokens:
            self.finish = "length"

    def _stopped(self, decode: Callable[[list[int]], str] | None) -> bool:
        """Whether the newest token completed one of the stop strings: found in the text of the last tokens
        (enough to hold the longest stop) and not in that text without the newest token."""
        assert decode is not None
        longest = max(len(s) for s in self.settings.stop)
        tail = self.tokens[-(longest + 4) :]  # a character is at least one token once whole (at most 4 bytes)
        now, before = decode(tail), decode(tail[:-1])
        return any(s in now and s not in before for s in self.settings.stop)


class Engine:
    """Generates a changing batch of sequences on `model` (see the module's docstring). `slots` bounds how many
    run at once (more wait for a slot). `vocab_size` limits the ids picked to the tokenizer's; `decode` (ids to
    text) is what stop strings are looked for in."""

    def __init__(
        self,
        model: GPT,
        *,
        slots: int = 8,
        vocab_size: int | None = None,
        decode: Callable[[list[int]], str] | None = None,
    ) -> None:
        self.model = model
        self.slots = slots
        self.limit = (
            model.config.vocab_size if vocab_size is None else min(vocab_size, model.config.vocab_size)
        )
        self.decode = decode
        self.context = model.config.context_length
        self.keep = self.context - self.context // 4  # the window's size after its oldest quarter is dropped
        self.waiting: deque[Generation] = deque()
        self.rows: list[Generation] = []  # the active sequences, in cache row order
        self.cache: SlotCache | None = None
        self.steps = 0  # batched forward passes so far: what the scheduling tests count
        self.lock = threading.Lock()  # add/cancel from other threads vs a step's admissions
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())  # once, not every step

    # ---------------------------------------------------------------------------------------------- requests

    def add(self, prompt: Sequence[int], settings: Settings) -> Generation:
        """Queue a sequence; it joins the batch at the next step with a free slot. ValueError for an empty
        prompt, one longer than the context, or stop strings without `decode`."""
        if len(prompt) == 0:
            raise ValueError("every prompt needs at least one token (start from <|endoftext|> for none)")
        if len(prompt) > self.context:
            raise ValueError(
                f"a prompt is longer than the context ({self.context} tokens): cut it with fit_prompt"
            )
        if settings.stop and self.decode is None:
            raise ValueError("stop strings need the engine's decode function")
        seed = settings.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        seq = Generation(prompt, settings, generator)
        with self.lock:
            self.waiting.append(seq)
        return seq

    def cancel(self, seq: Generation) -> None:
        """End `seq` (from any thread): it leaves at the next step, and no token is generated for it after."""
        seq.cancel()

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def generate(self, prompts: Sequence[Sequence[int]], settings: Sequence[Settings]) -> list[list[int]]:
        """Every prompt's generated ids (its end token or the token completing a stop string included), with
        `settings[i]` for prompt i, all in one batch of up to `slots` at a time."""
        if len(prompts) != len(settings):
            raise ValueError(f"{len(prompts)} prompts but {len(settings)} settings")
        seqs = [self.add(p, s) for p, s in zip(prompts, settings, strict=True)]
        while any(not s.done for s in seqs):
            self.step()
        return [s.tokens for s in seqs]

    # ---------------------------------------------------------------------------------------------- one step

    def step(self) -> list[tuple[Generation, int]]:
        """One token for every active sequence (after the waiting ones joined): [(sequence, token)], in row
        order. The sequences that ended leave (their `finish` says why), as do cancelled ones, without a token."""
        # FSDP-sharded weights (RL samples during training) are gathered into buffers the next training step
        # writes into: under inference_mode they would become inference tensors it may not write, so no_grad.
        with torch.no_grad() if self.sharded else torch.inference_mode():
            return self._step()

    def _step(self) -> list[tuple[Generation, int]]:
        was_training = self.model.training
        if was_training:
            self.model.eval()
        try:
            self._leave([s for s in self.rows if s.cancelled], "cancelled")
            self._admit()
            if not self.rows:
                return []
            for b, seq in enumerate(self.rows):
                if len(seq.window) > self.context:  # full: keep the newest part, rebuild the row
                    seq.shorten_window(self.keep)
                    self._prefill(b, [seq.window[:-1]])
            logits = self._decode()
            events = [(seq, self._pick(seq, logits[b])) for b, seq in enumerate(self.rows)]
            for seq, token in events:
                seq.record(token, self.decode)
            self._leave([s for s in self.rows if s.done], None)
            return events
        finally:
            if was_training:
                self.model.train()

    def _admit(self) -> None:
        with self.lock:
            joining = []
            while self.waiting and len(self.rows) + len(joining) < self.slots:
                seq = self.waiting.popleft()
                if seq.cancelled:
                    seq.end("cancelled")
                else:
                    joining.append(seq)
        if not joining:
            return
        need = max(min(self.context, len(s.prompt) + s.settings.max_new_tokens) for s in joining)
        self._ensure_cache(need)
        start = len(self.rows)
        self.rows += joining
        assert self.cache is not None
        self.cache.set_active(len(self.rows))
        self._prefill(start, [seq.window[:-1] for seq in joining])  # one forward pass for all who join

    def _ensure_cache(self, max_len: int) -> None:
        """A cache of `slots` rows with room for `max_len` positions, the rows so far kept."""
        old = self.cache
        if old is not None and old.max_len >= max_len:
            return
        if old is None:
            self.cache = SlotCache(self.model.config, self.slots, max_len, self.device, self.dtype)
        else:
            self.cache = old.grown(min(self.context, max(max_len, 2 * old.max_len)))

    def _prefill(self, row: int, prompts: list[list[int]]) -> None:
        """Fill cache rows `row`, `row + 1`, ... with `prompts` (from position 0), right-padded to one length in
        one forward pass: causal, so each row's positions compute what they would alone."""
        assert self.cache is not None
        lengths = [len(p) for p in prompts]
        for i in range(len(prompts)):
            self.cache.lengths[row + i] = 0
        if max(lengths) == 0:
            return
        ids = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        self.cache.select(row, lengths)
        self.model(ids.to(self.device), cache=self.cache, last_only=True)

    def _decode(self) -> torch.Tensor:
        """Feed every active row its pending token: the next-token logits (B, limit), in float32."""
        assert self.cache is not None
        self.steps += 1
        pending = torch.tensor([[s.window[-1]] for s in self.rows], device=self.device)
        logits = self.model(pending, cache=self.cache)[0][:, -1, : self.limit]
        return logits.float()

    def _pick(self, seq: Generation, logits: torch.Tensor) -> int:
        s = seq.settings
        if s.temperature == 0:
            return int(logits.argmax())
        probs = filter_logits(logits / s.temperature, s.top_k, s.top_p).softmax(dim=-1)
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def _leave(self, leaving: list[Generation], reason: str | None) -> None:
        """Take `leaving` out of the batch, moving the last rows into their slots."""
        for seq in leaving:
            if reason is not None:
                seq.end(reason)
            b = self.rows.index(seq)
            last = len(self.rows) - 1
            assert self.cache is not None
            if b != last:
                self.cache.move(last, b)
                self.rows[b] = self.rows[last]
            self.rows.pop()
            self.cache.set_active(len(self.rows))


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
