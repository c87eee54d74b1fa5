"""Checkpoints on disk: atomic save and code-free load of weights, trainer state, config and tokenizer id.

A checkpoint is a directory (see README, "Training"):

    model.safetensors   the GPT's weights (clean keys: no "_orig_mod." / "module." prefixes)
    checkpoint.json     {"format": "talm.checkpoint/1", "step", "tokens_seen", "config", "tokenizer",
                         "val_loss", "val_bpb"}
    trainer_state.pt    optimizer, loader position, every rank's RNG states: plain tensors and containers,
                        loaded with torch.load(weights_only=True)
    sharded/            only from an FSDP run: the weights and the optimizer's tensors as each process held its
                        shards, written by torch.distributed.checkpoint (DCP) and loadable on any process count;
                        trainer_state.pt then holds the optimizer's param groups (no tensors) instead of its
                        state, and model.safetensors the whole model, gathered (so every reader works unchanged)

A model directory `models/NAME/` holds `latest/` and `best/`. A save writes a fresh temporary directory,
fsyncs it, moves the old checkpoint aside, renames the new one into place and only then deletes the old one,
so a crash at any instant leaves either the old or the new checkpoint complete (`resolve_checkpoint` finds the
old one if the crash fell between the two renames).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors_into
from safetensors.torch import save_model as save_safetensors_from
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.futures import Future

from talm.errors import TalmError
from talm.files import aside_path, replace_dir, staging_dir
from talm.model.config import ModelConfig
from talm.model.gpt import GPT

FORMAT = "talm.checkpoint/1"
WEIGHTS = "model.safetensors"
META = "checkpoint.json"
TRAINER_STATE = "trainer_state.pt"
SHARDS = "sharded"

# What to do about a damaged checkpoint file, said with the flags of the command that loads it: this is the
# commands that use a model (generate, chat, serve, evaluate, export_model); train_model says its own
# (`DamagedCheckpoint.with_fix`, see talm.train.rundir.damaged_fix).
DAMAGED_FIX = (
    "the checkpoint is damaged: load another one (--checkpoint best, or a checkpoint directory's path)"
)


def _reason(err: BaseException) -> str:
    """What went wrong, short: the error's type and first sentence."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0].split('. ')[0]}" if text else type(err).__name__


class DamagedCheckpoint(TalmError):
    """A checkpoint file that is missing, cannot be read or holds non-finite values: one line naming the file,
    what is wrong and `fix`, the way out with the flags of the command that loaded it."""

    def __init__(self, path: Path, reason: str, fix: str = DAMAGED_FIX) -> None:
        # all three to the base: the error pickles (it crosses processes under torchrun)
        super().__init__(path, reason, fix)
        self.path, self.reason, self.fix = Path(path), reason, fix

    def __str__(self) -> str:
        return f"cannot load {str(self.path)!r} ({self.reason}): {self.fix}"

    def with_fix(self, fix: str) -> DamagedCheckpoint:
        return DamagedCheckpoint(self.path, self.reason, fix)


def damaged(path: Path, err: BaseException | str) -> DamagedCheckpoint:
    """The one-line error for a checkpoint file that cannot be loaded."""
    if isinstance(err, FileNotFoundError):
        err = "missing"
    return DamagedCheckpoint(path, err if isinstance(err, str) else _reason(err))


def first_non_finite(tensors: Any, where: str = "") -> str | None:
    """The name of the first floating-point tensor in `tensors` (nested dicts, lists and tuples of tensors)
    holding a NaN or an infinity, or None: a checkpoint never holds one (a diverging run stops before it saves),
    so one means the file's bytes were damaged."""
    if isinstance(tensors, torch.Tensor):
        if tensors.is_floating_point() and not bool(torch.isfinite(tensors).all()):
            return where or "a tensor"
        return None
    if isinstance(tensors, dict):
        items = list(tensors.items())
    elif isinstance(tensors, (list, tuple)):
        items = list(enumerate(tensors))
    else:
        return None
    for key, value in items:
        found = first_non_finite(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def save_failed(target: Path, err: BaseException) -> TalmError:
    """The one-line error for a checkpoint that could not be written (the previous one is kept)."""
    return TalmError(
        f"could not save checkpoint {str(target)!r} ({_reason(err)}): free some disk space (or fix the "
        "directory's permissions) and rerun the same command to resume; the previous checkpoint is kept"
    )


def save_checkpoint(
    target: str | Path,
    model: torch.nn.Module,
    meta: dict[str, Any],
    trainer_state: dict[str, Any] | None = None,
    *,
    staged: Path | None = None,
) -> Path:
    """Write `model`'s weights, `meta` (checkpoint.json) and `trainer_state` atomically as directory `target`.

    `model` must be the plain GPT (not its torch.compile or DDP wrapper) so that the weight names are clean.
    `staged`: the staging directory (`staging_dir(target)`) the processes of an FSDP run already wrote sharded/
    into (`save_shards`); it becomes `target` with the rest, or is removed if the save fails.
    """
    target = Path(target)
    tmp: Path | None = staged
    try:
        if tmp is None:
            tmp = staging_dir(target)
        for shard in (tmp / SHARDS).glob("*"):  # replace_dir syncs the directory's own files, not these
            fsync_file(shard)
        (tmp / META).write_text(json.dumps({"format": FORMAT, **meta}, indent=2) + "\n", encoding="utf-8")
        save_safetensors_from(model, str(tmp / WEIGHTS))  # replace_dir gives it the mode of every other file
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        replace_dir(tmp, target)
    except (OSError, SafetensorError, RuntimeError) as err:
        # A full disk, say: drop the half-written staging directory and keep (or put back) the previous one.
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            recover_interrupted_save(target)
        except OSError:
            pass
        raise save_failed(target, err) from None
    return target


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------------------
# Sharded checkpoints (FSDP): DCP holds tensors only. Its reader unpickles two things, and neither may execute
# code here: the .metadata file (read below with an unpickler that builds only DCP's own metadata classes and
# torch's sizes and dtypes) and any non-tensor value (refused: talm never writes one; the optimizer's
# hyperparameters go into trainer_state.pt). Tensors it reads with torch.load(weights_only=True).

DCP_METADATA = ".metadata"  # the file DCP's FileSystemWriter writes its metadata to
# What DCP's metadata pickle names: its own dataclasses and enums, torch's sizes, dtypes and layouts (looked up by
# name), and the checkpoint's path. None of them runs anything when built. Exact (module, name) pairs only: pickle
# resolves dotted names attribute by attribute, so allowing a whole module would allow what it imports (e.g. `os`).
_DCP_METADATA_CLASSES = (
    "BytesStorageMetadata", "ChunkStorageMetadata", "Metadata", "MetadataIndex", "StorageMeta",
    "TensorProperties", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING",
)  # fmt: skip
SAFE_PICKLE_NAMES = {("torch.distributed.checkpoint.metadata", name) for name in _DCP_METADATA_CLASSES} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if "." not in name:
            if (module, name) in SAFE_PICKLE_NAMES:
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's metadata")


class DamagedShard(Exception):
    """A file of sharded/ that could not be read or held non-finite values (raised inside DCP, on any rank)."""

    def __init__(self, file: str, why: str) -> None:
        super().__init__(file, why)
        self.file, self.why = file, why


class NonFinite(ValueError):
    """A tensor read from sharded/ holds a NaN or an infinity."""


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader, its metadata read through `MetadataUnpickler` (DCP's own uses pickle.load), and any
    failure to read a file of sharded/ said as a `DamagedShard` naming that file."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        try:
            with open(Path(self.path) / DCP_METADATA, "rb") as f:
                metadata = MetadataUnpickler(f).load()
        except Exception as err:  # noqa: BLE001 -- missing, truncated or garbled: any unpickling error
            raise DamagedShard(DCP_METADATA, damaged(Path(DCP_METADATA), err).reason) from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        per_file: dict[str, list[Any]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for file, items in per_file.items():
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except NonFinite as err:
                raise DamagedShard(file, str(err)) from None
            except Exception as err:  # noqa: BLE001 -- missing, truncated or garbled: zip, pickle, EOF errors
                raise DamagedShard(file, damaged(Path(file), err).reason) from None
        done: Future[None] = Future()
        done.set_result(None)
        return done


class TensorsOnlyPlanner(dcp.DefaultLoadPlanner):
    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise ValueError(
            f"{read_item.dest_index.fqn} is not a tensor (talm's sharded checkpoints hold only tensors)"
        )

    def commit_tensor(self, read_item: Any, tensor: torch.Tensor) -> None:
        if first_non_finite(tensor):
            raise NonFinite(f"non-finite values in {read_item.dest_index.fqn}")
        super().commit_tensor(read_item, tensor)


def first_failure(err: BaseException) -> BaseException:
    """The first rank's own error inside DCP's CheckpointException (a BaseException holding every rank's)."""
    if isinstance(err, CheckpointException) and err.failures:
        return next(iter(err.failures.values()))[0]
    return err


def save_shards(path: Path, state: dict[str, Any]) -> None:
    """Every process writes its shards of `state` (nested dicts of tensors and DTensors) into directory `path`."""
    dcp.save(state, checkpoint_id=path)


def load_shards(path: Path, state: dict[str, Any]) -> None:
    """Fill `state` (the same layout as saved, each tensor already where and as sharded as it is wanted) from
    sharded/ directory `path`, on any number of processes; `DamagedCheckpoint` naming the file (a missing one,
    one that cannot be read, one holding non-finite values) if it cannot."""
    if not path.is_dir():
        raise damaged(path, "missing: the checkpoint's weights and optimizer state are kept in it")
    try:
        SafeReader(path).read_metadata()  # first, alone: DCP would log a traceback for each way it tries
    except DamagedShard as err:
        raise damaged(path / err.file, err.why) from None
    try:
        alone = not torch.distributed.is_initialized()  # one process without a group (resuming without FSDP)
        with warnings.catch_warnings():  # alone, DCP warns it assumes one process: it is right
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=SafeReader(path), planner=TensorsOnlyPlanner(), no_dist=alone)
    except (Exception, CheckpointException) as err:  # noqa: BLE001 -- missing keys, bad files, any rank's
        failure = first_failure(err)
        if isinstance(failure, DamagedShard):
            raise damaged(path / failure.file, failure.why) from None
        raise damaged(path, failure) from None


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
    if path.is_dir() and any(path.iterdir()):  # a checkpoint that lost a file
        missing = next(f for f in (META, WEIGHTS) if not (path / f).is_file())
        raise damaged(path / missing, "missing")
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
    """checkpoint.json of a checkpoint directory, checked for its format and the fields every reader uses."""
    path = Path(checkpoint_dir) / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise damaged(path, err) from None
    if not isinstance(meta, dict):
        raise damaged(path, f"holds a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise TalmError(
            f"{str(path)!r} has format {meta.get('format')!r}, not {FORMAT!r}: it was not written by this talm"
        )
    config, tokenizer = meta.get("config"), meta.get("tokenizer")
    problem = None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        problem = "no config.model settings"
    elif not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("fingerprint"), str):
        problem = "no tokenizer fingerprint"
    elif not isinstance(meta.get("step"), int) or isinstance(meta.get("step"), bool):
        problem = "no integer step"
    if problem:
        raise damaged(path, problem)
    return meta


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """The GPT stored in a checkpoint directory, on `device` in eval mode, and its checkpoint.json."""
    checkpoint_dir = Path(checkpoint_dir)
    meta = read_meta(checkpoint_dir)
    try:
        config = ModelConfig.model_validate(meta["config"]["model"])
    except ValidationError as err:
        raise damaged(
            checkpoint_dir / META, f"invalid model settings: {err.errors()[0].get('msg')}"
        ) from None
    model = GPT(config)
    load_weights(model, checkpoint_dir, device)
    return model.eval(), meta


def load_weights(model: GPT, checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> None:
    """Fill `model` (moved to `device`) with the weights of a checkpoint directory; no code is executed.
    `DamagedCheckpoint` naming model.safetensors if it is missing, unreadable or holds non-finite values."""
    model.to(device)
    path = Path(checkpoint_dir) / WEIGHTS
    if not path.is_file():
        raise damaged(path, "missing")
    try:
        load_safetensors_into(model, str(path), strict=True, device=str(device))
    except RuntimeError as err:  # missing or unexpected tensors, wrong shapes
        raise damaged(
            path,
            f"{str(err).strip().splitlines()[0]}; it belongs to another architecture than its {META} says",
        ) from None
    except (
        SafetensorError,
        OSError,
        ValueError,
    ) as err:  # truncated or garbled: SafetensorError is no OSError
        raise damaged(path, err) from None
    bad = first_non_finite(model.state_dict())
    if bad:
        raise damaged(path, f"non-finite values in {bad}")


TRAINER_STATE_KEYS = ("step", "tokens_seen", "elapsed", "best_val_loss", "optimizer", "loader", "rng")


def load_trainer_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """trainer_state.pt of a checkpoint directory (plain tensors and containers only: no code is executed)."""
    path = Path(checkpoint_dir) / TRAINER_STATE
    if not path.is_file():
        raise TalmError(f"{str(path)!r} is missing: this checkpoint holds weights only and cannot be resumed")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- truncated or garbled: zip, pickle, EOF or unpickler errors
        raise damaged(path, err) from None
    if not isinstance(state, dict) or any(k not in state for k in TRAINER_STATE_KEYS):
        raise damaged(path, "not a talm trainer state")
    bad = first_non_finite(state["optimizer"], "optimizer")
    if bad:
        raise damaged(path, f"non-finite values in {bad}")
    shards = Path(checkpoint_dir) / SHARDS
    sharded = isinstance(state["optimizer"], dict) and set(state["optimizer"]) == {"param_groups"}
    if sharded and not shards.is_dir():  # an FSDP run's: its optimizer's tensors are in sharded/
        raise damaged(shards, f"missing: {TRAINER_STATE} keeps its optimizer state there")
    return state
