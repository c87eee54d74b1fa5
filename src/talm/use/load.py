"""Loading a trained model: a checkpoint directory (or models/NAME) to its GPT, its tokenizer and its
checkpoint.json. `generate`, `export_model` and `talm.load` all load through here.

The model may know more token ids than its tokenizer (training allows a `model.vocab_size` above the
tokenizer's, e.g. rounded up to a multiple of 64): such a model loads; its extra ids are never a real token, so
generation never picks them (`talm.use.sample`) and an export keeps the model's size (`talm.use.export`). A model that
knows fewer ids than its tokenizer makes would fail on the first such id, and is refused.

(This module is not called `load`: `talm.load`, the function, is the public API, and a submodule of that name
would shadow it.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from talm.errors import TalmError
from talm.model.gpt import GPT
from talm.tokenizer.api import Tokenizer
from talm.train.checkpoint import load_model, read_meta, resolve_checkpoint
from talm.train.dist import pick_device


def find_tokenizer(checkpoint_dir: Path, meta: dict[str, Any], model_dir: Path | None = None) -> Tokenizer:
    """The tokenizer a checkpoint was trained with: its file beside the checkpoint (models/NAME/tokenizer.json),
    checked against the fingerprint the checkpoint recorded."""
    info = meta.get("tokenizer") or {}
    name = info.get("file", "tokenizer.json")
    candidates = [checkpoint_dir / name, checkpoint_dir.parent / name]
    if model_dir is not None:
        candidates.append(model_dir / name)
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise TalmError(
            f"tokenizer file {str(checkpoint_dir.parent / name)!r} is missing: copy the tokenizer the model was "
            "trained with there (the checkpoint records its fingerprint)"
        )
    tokenizer = Tokenizer.from_file(path)
    expected = info.get("fingerprint")
    if expected and tokenizer.fingerprint != expected:
        raise TalmError(
            f"tokenizer {str(path)!r} (fingerprint {tokenizer.fingerprint[:12]}) is not the one the checkpoint "
            f"was trained with (fingerprint {expected[:12]}): put the training tokenizer back at that path"
        )
    return tokenizer


def check_vocab(model: GPT, tokenizer: Tokenizer, where: str) -> None:
    """Refuse a tokenizer that makes ids the model does not know (more ids than the model is fine)."""
    if model.config.vocab_size < tokenizer.vocab_size:
        raise TalmError(
            f"{where} has a vocabulary of {model.config.vocab_size} tokens but its tokenizer makes "
            f"{tokenizer.vocab_size}: use the tokenizer the model was trained with"
        )


def load_checkpoint(
    model_dir: str | Path,
    checkpoint: str = "latest",
    device: str | torch.device = "auto",
    *,
    for_generation: bool = False,
) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """The model (eval mode, on `device`), tokenizer and checkpoint.json (step, tokens seen, validation loss,
    run config) of a trained model directory.

    `checkpoint` is "latest", "best" or the path of a checkpoint directory; `model_dir` may also be a
    checkpoint directory itself (models/NAME/best). `device` "auto" picks cuda, then mps, then cpu.
    `for_generation`: the model only generates and scores (no saving, no training), so on CPU its weights are
    stored in the order one-token steps read fastest (`GPT.store_weights_column_major`).
    """
    if isinstance(device, str):
        device = pick_device(device)
    try:
        checkpoint_dir = resolve_checkpoint(model_dir, checkpoint)
    except TalmError:
        refuse_transformers_dir(Path(model_dir))
        raise
    tokenizer = find_tokenizer(checkpoint_dir, read_meta(checkpoint_dir), Path(model_dir))
    model, meta = load_model(checkpoint_dir, device)
    check_vocab(model, tokenizer, f"checkpoint {str(checkpoint_dir)!r}")
    if for_generation and torch.device(device).type == "cpu":
        model.store_weights_column_major()
    return model, tokenizer, meta


def refuse_transformers_dir(path: Path) -> None:
    """A transformers model directory (an `export_model` output: config.json and model.safetensors) where a talm
    model directory was expected: say what it is and what to pass instead, rather than "train it first"."""
    weights = [*path.glob("model*.safetensors"), *path.glob("pytorch_model*.bin")]
    if (path / "config.json").is_file() and weights:
        raise TalmError(
            f"{str(path)!r} is a transformers model directory (config.json and {weights[0].name}, as export_model "
            "writes), not a talm model: pass the talm model directory it was exported from (models/NAME), or "
            "load it with transformers"
        )


def load(
    model_dir: str | Path, checkpoint: str = "latest", device: str | torch.device = "auto"
) -> tuple[GPT, Tokenizer]:
    """The model (eval mode, on `device`) and tokenizer of a trained model directory (see `load_checkpoint`).

    model, tokenizer = talm.load("models/shakespeare")            # or checkpoint="best"
    """
    model, tokenizer, _ = load_checkpoint(model_dir, checkpoint, device)
    return model, tokenizer


def describe_checkpoint(name: str, meta: dict[str, Any]) -> str:
    """`name` with what checkpoint.json says of its training, as one line:
    `models/NAME (step 500, 8,192,000 training tokens, val bits/byte 1.712)`."""
    facts = []
    if isinstance(meta.get("step"), int):
        facts.append(f"step {meta['step']}")
    if isinstance(meta.get("tokens_seen"), int):
        facts.append(f"{meta['tokens_seen']:,} training tokens")
    if isinstance(meta.get("val_bpb"), (int, float)):
        facts.append(f"val bits/byte {meta['val_bpb']:.3f}")
    return f"{name} ({', '.join(facts)})" if facts else name
