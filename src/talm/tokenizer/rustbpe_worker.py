"""The child process that trains with rustbpe (see talm.tokenizer.trainers for why a child). Kept apart and
small so the child starts fast: it imports rustbpe, tqdm and the text reader, nothing else of talm."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from talm.tokenizer.textfiles import progress_stream

# rustbpe takes this many text blocks from the iterator, then splits and counts them on all cores: with
# 64 KB blocks that is 16 MB of text in flight, enough to keep the cores busy and memory flat.
BUFFER_BLOCKS = 256


def train(
    conn: Any, files: list[Path], n_ordinary: int, pattern: str, block_bytes: int, progress: bool
) -> None:
    """Train a BPE of `n_ordinary` tokens (the 256 bytes included) and send back ("ok", token bytes in rank
    order), or ("error", the exception)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent answers Ctrl-C and stops this process
    try:
        import rustbpe
        from tqdm import tqdm

        total = sum(p.stat().st_size for p in files)
        with tqdm(total=total, unit="B", unit_scale=True, desc="reading", disable=not progress) as bar:
            trainer = rustbpe.Tokenizer()
            stream = progress_stream(files, block_bytes, bar)
            trainer.train_from_iterator(stream, n_ordinary, buffer_size=BUFFER_BLOCKS, pattern=pattern)
        ranked = sorted(trainer.get_mergeable_ranks(), key=lambda item: item[1])
        conn.send(("ok", [bytes(token) for token, _ in ranked]))
    except BaseException as err:  # noqa: BLE001 (handed to the parent, which raises it)
        conn.send(("error", err))
    finally:
        conn.close()
