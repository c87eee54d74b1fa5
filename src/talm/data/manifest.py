"""The one definition of a talm data directory: its file names, its manifest (meta.json) and its shards.

A data directory (data/<dataset>/<[prefix_]sample>/) holds 1-D `.npy` shards of token ids (the tokenizer's
token_dtype; every document preceded by <|endoftext|>) and a manifest per worker (`meta.json`, or
`meta.wIII-of-WWW.json` when several workers fill it) listing them. The writer (writer.py, shard_dir.py), the
reader (`read_data`, used by the training loader) and the tests all name files, build, read and check manifests
and shards through this module, so the format is defined here and nowhere else.

The manifest, a JSON object (written with `manifest_bytes`, read with `read_manifest`):

    format        FORMAT ("talm.shards/1")
    dataset, source, config, text_column, files    the text source (`sources.TextSource`)
    tokenizer     {path, fingerprint, vocab_size, eot_id}
    dtype         numpy dtype name of the shards' token ids
    shard_size    tokens per shard (the last shard of each split may hold fewer)
    worker        {index, count}: which worker's manifest this is
    val_tokens, max_tokens   this worker's share of the validation split / training tokens (None: no limit)
    arguments     what made the data; a rerun with other arguments is refused
    shards        [{file, split ("val" | "train"), tokens, documents, bytes, resume}] in stream order
    totals        {tokens, documents, bytes, empty_documents} of the listed shards
    resume        None once complete, else a `resume_point`: where the stream stands after the last shard
    complete      True once the stream (or max_tokens) ended and its last shard is listed
    kind          what the documents are: "text", "conversations" or "preferences" (`KINDS`; a manifest written
                  before the field reads as "conversations" if it has loss_mask, else "text")
    loss_mask     (conversation and preference data; absent in text data) True: every shard `X.npy` has a
                  loss-mask shard `X.mask.npy` beside it (`mask_name`), and "empty_documents" counts the
                  malformed conversations (pairs) that were skipped
                  A manifest with kind "prompts" (prompts with reference answers, `talm.data.prompts`) has its
                  own layout and no shards, and `read_manifest` refuses it.

A loss-mask shard is a 1-D uint8 array as long as its token shard, a set of bit flags per token: LEARN (the model
is trained to predict this token: assistant content and the `<|endoftext|>` closing its turn) and START (the
first token of a conversation; conversations may continue into the next shard). The rendering itself is
`talm.tokenizer.chat.ChatFormat`; conversation data is written without the <|endoftext|> before each document.
Preference data (`talm.data.preferences`) writes each pair as one document: the chosen conversation (its first
token flagged START), then the rejected one (its first token flagged REJECTED), LEARN on each side's last
assistant reply only.

A resume point is {stream_state, skip_tokens, split, empty_documents}: the stream position before the batch
that the next shard starts in (`TextStream.state_dict()`), how many tokens of that batch are already in shards,
which split is being filled, and the empty documents counted so far. Each shard entry records the resume point
after it too, so a damaged later shard can be made again from there, identically.

This module imports no torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from talm.errors import TalmError

FORMAT = "talm.shards/1"
MANIFEST_RE = re.compile(r"meta(\.w\d{3,}-of-(\d{3,}))?\.json")


def worker_tag(index: int, count: int) -> str:
    """The tag in a worker's file names: empty for a single worker, else ".wIII-of-WWW"."""
    return "" if count == 1 else f".w{index:03d}-of-{count:03d}"


# Loss-mask shards (conversation data): bit flags per token.
MASK_DTYPE = np.dtype("uint8")
LEARN = 1  # train on predicting this token
START = 2  # the first token of a conversation (of a preference pair: of its chosen side)
REJECTED = 4  # preference data: the first token of a pair's rejected side

# What a data directory's documents are (the manifest's "kind"); each objective of train_model takes one.
KINDS = ("text", "conversations", "preferences")


def mask_name(shard_file: str) -> str:
    """The loss-mask shard beside token shard `shard_file`: train_000001.npy -> train_000001.mask.npy."""
    assert shard_file.endswith(".npy")
    return shard_file[: -len(".npy")] + ".mask.npy"


def manifest_name(tag: str) -> str:
    return f"meta{tag}.json"


def lock_name(tag: str) -> str:
    """The worker's run lock (`talm.files.RunLock`): one per tag, so the workers of a layout may run at once."""
    return f".talm{tag}.lock"


def shard_name(split: str, index: int, tag: str) -> str:
    return f"{split}{tag}_{index:06d}.npy"


def layout(manifest: str) -> int:
    """Number of workers a manifest file name belongs to."""
    match = MANIFEST_RE.fullmatch(manifest)
    assert match
    return 1 if match.group(2) is None else int(match.group(2))


def manifest_paths(data_dir: Path) -> list[Path]:
    """Every manifest file of a data directory, sorted by name."""
    return sorted(p for p in data_dir.glob("meta*.json") if MANIFEST_RE.fullmatch(p.name))


def _files_re(tag: str) -> re.Pattern[str]:
    """Shards and manifests with a tag matching the regex `tag`, and their temp files (`talm.files.temp_path`)."""
    return re.compile(rf"\.?(val|train){tag}_\d{{6}}(\.mask)?\.npy(\.tmp)?|\.?meta{tag}\.json(\.tmp)?")


def worker_files_re(tag: str) -> re.Pattern[str]:
    """One worker's files (never another worker's): its shards, its manifest and their temp files."""
    return _files_re(re.escape(tag))


def layout_files_re(manifest: str) -> re.Pattern[str]:
    """Every file of the worker layout a manifest name belongs to (all workers' shards, manifests, temps)."""
    match = MANIFEST_RE.fullmatch(manifest)
    assert match
    return _files_re("" if match.group(1) is None else rf"\.w\d{{3,}}-of-{match.group(2)}")


# ------------------------------------------------------------------------------------------------ writing


def manifest_header(
    source: dict[str, Any],
    *,
    dtype: np.dtype,
    shard_size: int,
    worker_index: int,
    num_workers: int,
    val_tokens: int,
    max_tokens: int | None,
    arguments: dict[str, Any],
) -> dict[str, Any]:
    """The manifest's fixed part; `source` holds dataset, source, config, text_column, files and tokenizer."""
    return {
        "format": FORMAT,
        **source,
        "dtype": dtype.name,
        "shard_size": shard_size,
        "worker": {"index": worker_index, "count": num_workers},
        "val_tokens": val_tokens,
        "max_tokens": max_tokens,
        "arguments": arguments,
    }


def resume_point(
    stream_state: dict[str, Any] | None, skip_tokens: int, split: str, empty_documents: int
) -> dict[str, Any]:
    return {
        "stream_state": stream_state,
        "skip_tokens": skip_tokens,
        "split": split,
        "empty_documents": empty_documents,
    }


def shard_entry(file: str, split: str, tokens: int, documents: int, nbytes: int) -> dict[str, Any]:
    """A shard's manifest entry (its "resume" is added once the resume point after it is known)."""
    return {"file": file, "split": split, "tokens": tokens, "documents": documents, "bytes": nbytes}


def build_manifest(
    header: dict[str, Any],
    shards: list[dict[str, Any]],
    *,
    resume: dict[str, Any] | None,
    empty_documents: int,
) -> dict[str, Any]:
    """The whole manifest: header, shards, their totals; complete exactly when there is no resume point."""
    return {
        **header,
        "shards": shards,
        "totals": {
            "tokens": sum(s["tokens"] for s in shards),
            "documents": sum(s["documents"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "empty_documents": empty_documents,
        },
        "resume": resume,
        "complete": resume is None,
    }


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1) + "\n").encode("utf-8")


def read_previous(path: Path) -> dict[str, Any]:
    """A worker's own manifest, read back by the writer to resume; TalmError with the way out if unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise TalmError(f"{str(path)!r} is unreadable ({err}): pass --overwrite to start afresh") from None


# ------------------------------------------------------------------------------------------------ shards


@dataclass(frozen=True)
class Shard:
    path: Path
    split: str
    tokens: int
    bytes: int | None

    @property
    def mask_path(self) -> Path:
        """Its loss-mask shard (conversation data only)."""
        return self.path.with_name(mask_name(self.path.name))


def shard_problem(path: Path, tokens: int, dtype: np.dtype) -> str | None:
    """What is wrong with a shard file compared with its manifest entry, or None. Cheap: reads the header and
    the file size, never the tokens."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, found = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, found = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError, SyntaxError) as err:
        return f"has no valid .npy header ({type(err).__name__}: {err})"
    if found.hasobject or len(shape) != 1 or fortran:
        return f"holds a {found} array of shape {shape}, not 1-D token ids"
    if found != dtype or shape[0] != tokens:
        return f"holds {shape[0]:,} tokens of {found}, but the manifest lists {tokens:,} of {dtype}"
    if size != offset + tokens * dtype.itemsize:
        return f"is {size:,} bytes, not the {offset + tokens * dtype.itemsize:,} its header promises (truncated?)"
    return None


def open_shard(shard: Shard, dtype: np.dtype, vocab_size: int | None = None) -> np.ndarray:
    """A shard as a read-only memory map, checked against its manifest entry (and, given `vocab_size`, that
    every id is below it: one vectorised pass, done once per shard); TalmError naming the shard otherwise."""
    problem = shard_problem(shard.path, shard.tokens, dtype)
    fix = "rerun download_data with --overwrite to recreate the data directory"
    if problem:
        raise TalmError(f"shard {str(shard.path)!r} {problem}: {fix}")
    mm = np.load(shard.path, mmap_mode="r", allow_pickle=False)
    if vocab_size is not None and len(mm) and int(mm.max()) >= vocab_size:
        raise TalmError(
            f"shard {str(shard.path)!r} holds token id {int(mm.max())}, outside the vocabulary of {vocab_size}: "
            f"the data was made with another tokenizer or is damaged; {fix}"
        )
    return mm


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class DataSet:
    """The merged manifests of one data directory."""

    dir: Path
    tokenizer: dict[str, Any]  # path, fingerprint, vocab_size, eot_id (as the manifest recorded them)
    dtype: np.dtype
    shards: list[Shard]
    complete: bool
    loss_mask: bool = False  # conversation and preference data: every shard has a loss-mask shard
    kind: str = "text"  # one of KINDS

    def split(self, name: str) -> list[Shard]:
        return [s for s in self.shards if s.split == name]

    def tokens_per_byte(self, split: str = "val") -> float | None:
        """Tokens per UTF-8 byte of a split, from the manifest (what turns nats/token into bits/byte)."""
        shards = self.split(split)
        if not shards or any(s.bytes is None for s in shards):
            return None
        total_bytes = sum(s.bytes for s in shards)
        return sum(s.tokens for s in shards) / total_bytes if total_bytes else None


def data_kind(meta: dict[str, Any]) -> str:
    """A manifest's kind (`KINDS`); one written before the field by its loss masks, as it was read then."""
    return str(meta.get("kind") or ("conversations" if meta.get("loss_mask") else "text"))


def _manifest_error(path: Path, problem: str) -> TalmError:
    return TalmError(f"manifest {str(path)!r} {problem}: recreate the data directory with download_data")


def read_manifest(path: Path) -> dict[str, Any]:
    """One manifest file, parsed and checked for the fields every reader needs; TalmError if it is not one."""
    meta = None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        fmt, _, _, listed = meta["format"], meta["tokenizer"], np.dtype(meta["dtype"]), meta["shards"]
        for entry in listed:
            _ = str(entry["file"]), str(entry["split"]), int(entry["tokens"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        if isinstance(meta, dict) and meta.get("kind") == "prompts":  # talm.data.prompts: no token shards
            raise TalmError(
                f"{str(path.parent)!r} holds prompts with reference answers, not token shards: train on it with "
                "train_model --preset grpo --init-from models/CHAT, or pass a text or conversation data directory"
            ) from None
        raise _manifest_error(path, f"cannot be read ({type(err).__name__}: {err})") from None
    if fmt != FORMAT:
        raise _manifest_error(path, f"has format {fmt!r}, not {FORMAT!r}")
    return meta


def read_data(data_dir: str | Path, *, splits: tuple[str, ...] = ("train", "val")) -> DataSet:
    """Read and merge every manifest of `data_dir`; TalmError if there is no usable data (each of `splits` must
    hold tokens)."""
    data_dir = Path(data_dir)
    hint = "prepare one with `download_data tinyshakespeare` (or another dataset) and pass its directory"
    if not data_dir.is_dir():
        raise TalmError(f"data directory {str(data_dir)!r} not found: {hint}")
    manifests = manifest_paths(data_dir)
    if not manifests:
        raise TalmError(f"no manifest (meta.json) in {str(data_dir)!r}, so it holds no talm shards: {hint}")
    tokenizer: dict[str, Any] | None = None
    dtype: np.dtype | None = None
    shards: list[Shard] = []
    complete = True
    masked: set[bool] = set()
    kinds: set[str] = set()
    for path in manifests:
        meta = read_manifest(path)
        tok, dt = meta["tokenizer"], np.dtype(meta["dtype"])
        if tokenizer is None:
            tokenizer, dtype = tok, dt
        elif tok.get("fingerprint") != tokenizer.get("fingerprint") or dt != dtype:
            raise TalmError(
                f"the manifests in {str(data_dir)!r} disagree on the tokenizer or dtype ({path.name}): "
                "every worker must use the same tokenizer; remove the odd ones or recreate the directory"
            )
        complete = complete and bool(meta.get("complete", False))
        masked.add(bool(meta.get("loss_mask", False)))
        kinds.add(data_kind(meta))
        if len(masked) > 1 or len(kinds) > 1:
            raise _manifest_error(
                path,
                f"disagrees with the other manifests on the kind of data ({' and '.join(sorted(kinds))} mixed)",
            )
        for entry in meta["shards"]:
            shard_path = data_dir / entry["file"]
            if not shard_path.is_file():
                raise _manifest_error(path, f"lists {entry['file']!r}, which is missing")
            if meta.get("loss_mask") and not (data_dir / mask_name(entry["file"])).is_file():
                raise _manifest_error(
                    path, f"lists {entry['file']!r}, whose loss mask {mask_name(entry['file'])!r} is missing"
                )
            shards.append(Shard(shard_path, entry["split"], int(entry["tokens"]), entry.get("bytes")))
    shards.sort(key=lambda s: s.path.name)
    kind = kinds.pop() if kinds else "text"
    data = DataSet(
        data_dir, tokenizer or {}, dtype or np.dtype("uint16"), shards, complete, True in masked, kind
    )
    for split in splits:
        if not any(s.tokens > 0 for s in data.split(split)):
            raise TalmError(
                f"{str(data_dir)!r} has no {split} shards: rerun download_data to completion "
                f"(with --val-tokens > 0 for the val split)"
            )
    return data
