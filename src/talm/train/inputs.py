"""What a run trains on: the data directory (every shard's header checked), the tokenizer it was made with,
the batch arithmetic (gradient accumulation) and this rank's loaders.

Built before the run writes anything, so that wrong data, a changed tokenizer or a batch that does not divide
fails in one line with models/NAME untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from talm.data.manifest import DataSet, read_data
from talm.data.prompts import prompt_dataset
from talm.errors import TalmError
from talm.train import dist
from talm.train.config import RunConfig
from talm.train.evaluate import val_slice
from talm.train.loader import EvalSlice, TokenLoader, check_shards
from talm.train.packing import ConversationEval, ConversationLoader

if TYPE_CHECKING:
    from talm.tokenizer.api import Tokenizer


def load_tokenizer(cfg: RunConfig, data: DataSet) -> Tokenizer:
    """The tokenizer to train with: -t if given (it must be the data's), else the one the manifest names."""
    from talm.tokenizer.api import Tokenizer  # noqa: F811 -- the runtime import of the name checked above

    want = data.tokenizer.get("fingerprint")
    if cfg.data.tokenizer_path:
        tok = Tokenizer.from_file(cfg.data.tokenizer_path)
        if tok.fingerprint != want:
            raise TalmError(
                f"tokenizer {cfg.data.tokenizer_path!r} is not the one {str(data.dir)!r} was made with "
                f"({data.tokenizer.get('path')!r}, fingerprint {str(want)[:12]}): drop -t to use the data's, "
                "or recreate the data with this tokenizer"
            )
        return tok
    recorded = data.tokenizer.get("path")
    candidates = [Path(recorded), data.dir / recorded] if recorded else []
    for path in candidates:
        if path.is_file():
            tok = Tokenizer.from_file(path)
            if tok.fingerprint == want:
                return tok
            raise TalmError(
                f"tokenizer file {str(path)!r} changed since {str(data.dir)!r} was made (fingerprint differs): "
                "pass the original with -t PATH, or recreate the data"
            )
    raise TalmError(
        f"the tokenizer {recorded!r} that {str(data.dir)!r} was made with is not found: pass it with -t PATH"
    )


def check_trained_with(meta: dict, tokenizer: Tokenizer, model_dir: Path, data_dir: Path) -> None:
    """TalmError (one line) if the checkpoint of `meta` (checkpoint.json) was trained with another tokenizer."""
    if meta["tokenizer"]["fingerprint"] != tokenizer.fingerprint:
        raise TalmError(
            f"{str(model_dir)!r} was trained with another tokenizer than {str(data_dir)!r} was made with: resume "
            "it on data made with its tokenizer.json, or pick a new --model-name"
        )


def accumulation(cfg: RunConfig, world_size: int) -> tuple[int, int]:
    """(tokens per optimizer step over all processes, micro-steps per process that reach it)."""
    B, T, W = cfg.train.batch_size, cfg.model.context_length, world_size
    micro_tokens = B * T * W
    tokens_per_step = cfg.train.tokens_per_step or micro_tokens
    if tokens_per_step % micro_tokens:
        raise TalmError(
            f"train.tokens_per_step={tokens_per_step} is not a multiple of batch_size x context_length x "
            f"processes = {B} x {T} x {W} = {micro_tokens}: use a multiple of {micro_tokens}"
        )
    return tokens_per_step, tokens_per_step // micro_tokens


def load_inputs(cfg: RunConfig) -> tuple[DataSet, Tokenizer]:
    """The data (every shard's header checked) and its tokenizer; fills in cfg.model.vocab_size if unset."""
    if cfg.train.objective == "grpo":  # prompts with reference answers, read by the objective (train/grpo.py)
        data = prompt_dataset(cfg.data.dir)
    else:
        data = read_data(cfg.data.dir, splits=("train",))  # without a val split: no evaluation
        check_shards(data)  # a truncated or overwritten shard fails now, before anything is written
    tokenizer = load_tokenizer(cfg, data)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise vocab_misfit(cfg, data, tokenizer)
    return data, tokenizer


def vocab_misfit(cfg: RunConfig, data: DataSet, tokenizer: Tokenizer) -> TalmError:
    """The refusal of a model vocabulary smaller than the tokenizer's, naming where each size came from: the
    --init-from source's config file or the run's settings; -t or the data's manifest."""
    if cfg.data.tokenizer_path:
        origin = f"tokenizer {str(cfg.data.tokenizer_path)!r} (-t)"
    else:
        origin = f"tokenizer {data.tokenizer.get('path')!r} (named by {str(data.dir)!r}'s manifest)"
    if cfg.train.init_from:
        from talm.train.init import resolve_source

        source = resolve_source(cfg.train.init_from)
        return TalmError(
            f"--init-from {cfg.train.init_from!r} has a vocabulary of {cfg.model.vocab_size} ids (vocab_size in "
            f"{str(source.config_file)!r}), fewer than the {tokenizer.vocab_size} of {origin}: its embeddings "
            "cannot hold every token of the data; pass another --init-from whose vocabulary covers its tokenizer"
        )
    return TalmError(
        f"model.vocab_size={cfg.model.vocab_size} (from --model.vocab_size, --config or --preset) is smaller "
        f"than the {tokenizer.vocab_size} ids of {origin}: leave it unset to take the tokenizer's"
    )


def make_loaders(
    cfg: RunConfig, data: DataSet, vocab_size: int, accum: int, ctx: dist.DistContext
) -> tuple[TokenLoader | ConversationLoader, EvalSlice | ConversationEval | None]:
    """This rank's train loader and val slice (None without a val split); every id must be below vocab_size.
    Conversation data (loss masks) gets rows packed from whole conversations (packing.py)."""
    t, T, W = cfg.train, cfg.model.context_length, ctx.world_size
    if data.loss_mask:
        return make_conversation_loaders(cfg, data, vocab_size, accum, ctx)
    loader = TokenLoader(
        data, batch_size=t.batch_size, context_length=T, seed=t.seed, rank=ctx.rank, world_size=W,
        device=ctx.device, vocab_size=vocab_size, accum_steps=accum,
    )  # fmt: skip
    return loader, val_slice(data, t, T, ctx, vocab_size=vocab_size)


def make_conversation_loaders(
    cfg: RunConfig, data: DataSet, vocab_size: int, accum: int, ctx: dist.DistContext
) -> tuple[ConversationLoader, ConversationEval | None]:
    """`make_loaders` for conversation data; padding is <|endoftext|> (never a learned target)."""
    t, T, W, pad = cfg.train, cfg.model.context_length, ctx.world_size, int(data.tokenizer["eot_id"])
    loader = ConversationLoader(
        data, batch_size=t.batch_size, context_length=T, seed=t.seed, pad_id=pad,
        isolate=t.isolate_conversations, rank=ctx.rank, world_size=W,
        device=ctx.device, vocab_size=vocab_size, accum_steps=accum,
    )  # fmt: skip
    return loader, val_slice(data, t, T, ctx, vocab_size=vocab_size)
