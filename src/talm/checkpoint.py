"""Checkpoints on disk: atomic save and code-free load of weights, trainer state, config and tokenizer id.

A checkpoint is a directory (see README, "Training"):

    model.safetensors   the GPT's weights (clean keys: no "_orig_mod." / "module." prefixes)
    checkpoint.json     {"format": "talm.checkpoint/1", "step", "tokens_seen", "config", "tokenizer",
                         "val_loss", "val_bpb"}
    trainer_state.pt    optimizer, loader position, every rank's RNG states: plain tensors and containers,
                        loaded with torch.load(weights_only=True)

A model directory `models/NAME/` holds `latest/` and `best/`. A save writes a fresh temporary directory,
fsyncs it, moves the old checkpoint aside, renames the new one into place and only then deletes the old one,
so a crash at any instant leaves either the old or the new checkpoint complete (`resolve_checkpoint` finds the
old one if the crash fell between the two renames).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as load_safetensors_into
from safetensors.torch import save_model as save_safetensors_from

from talm.config import ModelConfig
from talm.errors import TalmError
from talm.files import aside_path, replace_dir, staging_dir
from talm.model import GPT

FORMAT = "talm.checkpoint/1"
WEIGHTS = "model.safetensors"
META = "checkpoint.json"
TRAINER_STATE = "trainer_state.pt"


def save_checkpoint(
    target: str | Path,
    model: torch.nn.Module,
    meta: dict[str, Any],
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write `model`'s weights, `meta` (checkpoint.json) and `trainer_state` atomically as directory `target`.

    `model` must be the plain GPT (not its torch.compile or DDP wrapper) so that the weight names are clean.
    """
    target = Path(target)
    tmp = staging_dir(target)
    save_safetensors_from(model, str(tmp / WEIGHTS))
    (tmp / META).write_text(json.dumps({"format": FORMAT, **meta}, indent=2) + "\n", encoding="utf-8")
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_STATE)
    replace_dir(tmp, target)
    return target


def recover_interrupted_save(target: str | Path) -> None:
    """Undo what a crash mid-save can leave: put a moved-aside checkpoint back, drop temporary directories."""
    target = Path(target)
    old = aside_path(target)
    if old.exists():
        if target.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, target)
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def is_checkpoint(path: Path) -> bool:
    return (path / META).is_file() and (path / WEIGHTS).is_file()


def resolve_checkpoint(model_dir: str | Path, which: str = "latest") -> Path:
    """The checkpoint directory for `which` ("latest", "best" or a checkpoint directory path) of a model.

    `model_dir` is `models/NAME` (or a checkpoint directory itself). Raises TalmError naming the fix if absent.
    """
    model_dir = Path(model_dir)
    if which not in ("latest", "best"):
        path = Path(which)
        if not path.is_dir() or not is_checkpoint(path):
            raise TalmError(
                f"{str(path)!r} is not a checkpoint directory (it needs {META} and {WEIGHTS}): "
                "pass latest, best or the path of a checkpoint directory"
            )
        return path
    if is_checkpoint(model_dir):
        return model_dir
    if not model_dir.is_dir():
        raise TalmError(
            f"model directory {str(model_dir)!r} not found: train one with `train_model -n NAME` "
            "or pass the path of an existing models/NAME directory"
        )
    path = model_dir / which
    if is_checkpoint(path):
        return path
    if is_checkpoint(aside_path(path)):  # a save was interrupted between its two renames
        return aside_path(path)
    if which == "best":
        raise TalmError(
            f"{str(model_dir)!r} has no best checkpoint yet (it is written at the first evaluation): "
            "use --checkpoint latest, or train longer"
        )
    raise TalmError(
        f"{str(model_dir)!r} holds no checkpoint: train it with `train_model -n {model_dir.name}` first "
        "(checkpoints are saved every --save-every steps and at the end)"
    )


def read_meta(checkpoint_dir: str | Path) -> dict[str, Any]:
    """checkpoint.json of a checkpoint directory, checked for its format."""
    path = Path(checkpoint_dir) / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise TalmError(
            f"cannot read {str(path)!r} ({err}): the checkpoint is damaged; use another"
        ) from None
    if meta.get("format") != FORMAT:
        raise TalmError(
            f"{str(path)!r} has format {meta.get('format')!r}, not {FORMAT!r}: it was not written by this talm"
        )
    return meta


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """The GPT stored in a checkpoint directory, on `device` in eval mode, and its checkpoint.json."""
    checkpoint_dir = Path(checkpoint_dir)
    meta = read_meta(checkpoint_dir)
    model = GPT(ModelConfig.model_validate(meta["config"]["model"]))
    load_weights(model, checkpoint_dir, device)
    return model.eval(), meta


def load_weights(model: GPT, checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> None:
    """Fill `model` (moved to `device`) with the weights of a checkpoint directory; no code is executed."""
    model.to(device)
    path = Path(checkpoint_dir) / WEIGHTS
    try:
        load_safetensors_into(model, str(path), strict=True, device=str(device))
    except (RuntimeError, OSError) as err:
        raise TalmError(
            f"cannot load weights from {str(path)!r} ({str(err).splitlines()[0]}): the checkpoint is damaged "
            "or belongs to another architecture"
        ) from None


def load_trainer_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """trainer_state.pt of a checkpoint directory (plain tensors and containers only)."""
    path = Path(checkpoint_dir) / TRAINER_STATE
    if not path.is_file():
        raise TalmError(f"{str(path)!r} is missing: this checkpoint holds weights only and cannot be resumed")
    return torch.load(path, map_location="cpu", weights_only=True)
