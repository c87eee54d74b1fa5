"""Training text on disk: the checks a text file must pass (exists, regular, readable, not empty, UTF-8) and
the bounded-memory streaming reader that feeds training.

Kept apart from training because the data stage uses the same UTF-8 check (`check_utf8`), so both stages
name a bad byte the same way. Imports no torch and no tokenizers.
"""

from __future__ import annotations

import codecs
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from talm.errors import TalmError

READ_BLOCK_BYTES = 1 << 16  # streaming read size while training; bounded memory whatever the file size
_MAX_CARRY_CHARS = 1 << 20  # text without any safe cut point for 1M chars is cut anyway
_LETTER_SPACE_LETTER = re.compile(r"[^\W\d_] [^\W\d_]")


def check_text_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Every training file must exist, be a readable regular file and hold some text."""
    if not paths:
        raise TalmError("no text files given: pass --text-file FILE [FILE ...]")
    checked = []
    for p in map(Path, paths):
        if not p.exists():
            raise TalmError(f"text file {str(p)!r} not found: pass an existing UTF-8 text file")
        if p.is_dir():
            raise TalmError(f"{str(p)!r} is a directory: pass the text files inside it (e.g. {p}/*.txt)")
        if not p.is_file():
            raise TalmError(f"{str(p)!r} is not a regular file: pass a UTF-8 text file")
        if not os.access(p, os.R_OK):
            raise TalmError(f"text file {str(p)!r} is not readable: fix its permissions")
        if p.stat().st_size == 0:
            raise TalmError(f"text file {str(p)!r} is empty: pass a file with training text")
        checked.append(p)
    return checked


def _safe_cut(text: str) -> int:
    """Where to cut a block of text so the regex split is unchanged (0 if there is no such point).

    No piece of SPLIT_PATTERN (talm.tokenizer.formats) spans a newline followed by a non-space, nor the space
    of "letter, space, letter" (the piece before ends at the letter; " word" starts a new piece), so cutting
    there is exact.
    """
    end = len(text) - 1
    while (i := text.rfind("\n", 0, end)) != -1:
        if not text[i + 1].isspace():
            return i + 1
        end = i
    # No such newline (e.g. every line indented): fall back to a space between letters near the end.
    spaces = list(_LETTER_SPACE_LETTER.finditer(text, max(0, len(text) - READ_BLOCK_BYTES)))
    return spaces[-1].start() + 1 if spaces else 0


def _not_utf8(path: str | os.PathLike[str], byte: int, offset: int, line: int) -> TalmError:
    """The one message for a text file that is not UTF-8 (train_tokenizer and download_data say the same)."""
    return TalmError(
        f"{str(path)!r} is not UTF-8 text: invalid byte 0x{byte:02x} at byte offset {offset} (line {line}): "
        "convert it to UTF-8 first, e.g. `iconv -f latin1 -t utf-8`"
    )


def _utf8_blocks(f: Any, path: str | os.PathLike[str], block_bytes: int) -> Iterator[tuple[str, int, bool]]:
    """Decode a binary file as UTF-8 block by block: (text, raw bytes read, final). Bytes that are not UTF-8
    raise a TalmError naming the file, byte offset and line."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0  # raw bytes read so far
    newlines = 0  # b"\n" in fully decoded blocks
    while True:
        data = f.read(block_bytes)
        final = not data
        pending = decoder.getstate()[0]
        try:
            text = decoder.decode(data, final=final)
        except UnicodeDecodeError as err:
            seen = pending + data
            line = newlines + seen[: err.start].count(b"\n") + 1
            raise _not_utf8(path, seen[err.start], offset - len(pending) + err.start, line) from None
        offset += len(data)
        newlines += data.count(b"\n")
        yield text, len(data), final
        if final:
            return


def check_utf8(f: Any, path: str | os.PathLike[str], *, block_bytes: int = 1 << 20) -> None:
    """Read binary file object `f` (named `path`) to its end; TalmError at the first byte that is not UTF-8."""
    for _ in _utf8_blocks(f, path, block_bytes):
        pass


def read_text_blocks(path: Path, *, block_bytes: int = READ_BLOCK_BYTES) -> Iterator[tuple[str, int]]:
    """Stream a UTF-8 file as (text block, raw bytes consumed) in bounded memory; blocks end at points where
    the pre-tokenizer's split is unchanged, so training on the stream equals training on the whole file.
    Bytes that are not UTF-8 raise a TalmError naming the file, byte offset and line."""
    carry = ""
    with open(path, "rb") as f:
        for text, n_bytes, final in _utf8_blocks(f, path, block_bytes):
            text = carry + text
            if final:
                if text:
                    yield text, n_bytes
                return
            cut = _safe_cut(text)
            if cut == 0 and len(text) > _MAX_CARRY_CHARS:
                cut = len(text)  # no safe point in 1M chars: cut anyway, memory must stay bounded
            carry = text[cut:]
            yield text[:cut], n_bytes


def text_stream(
    files: Sequence[Path], block_bytes: int, on_block: Callable[[str, int], None] | None = None
) -> Iterator[str]:
    """Every file's text as blocks (see read_text_blocks), empty ones skipped; `on_block(text, raw bytes)`
    sees each block first."""
    for path in files:
        for text, n_bytes in read_text_blocks(path, block_bytes=block_bytes):
            if on_block is not None:
                on_block(text, n_bytes)
            if text:
                yield text


def progress_stream(files: Sequence[Path], block_bytes: int, bar: Any, stop: Any = None) -> Iterator[str]:
    """text_stream feeding a trainer: the tqdm `bar` counts the bytes read, then says learning has started.
    A set `stop` (threading.Event) ends the stream with KeyboardInterrupt (an abandoned training thread)."""

    def on_block(_text: str, n_bytes: int) -> None:
        if stop is not None and stop.is_set():
            raise KeyboardInterrupt
        bar.update(n_bytes)

    yield from text_stream(files, block_bytes, on_block)
    bar.set_description(f"read {bar.n / 1e6:.0f} MB, now learning the merges")
