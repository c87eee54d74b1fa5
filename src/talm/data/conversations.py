"""Conversation data: rows holding a list of messages, rendered with talm's chat format into token ids and
loss-mask flags for supervised fine-tuning.

The stream (streaming.py) hands over each row's messages as Python lists (`conversation_rows`); `ConversationEncoder`
renders a batch of them with `talm.tokenizer.chat.ChatFormat` (the one definition of the format) into a
`TokenBatch` whose `mask` holds, per token, the flags `talm.data.manifest` defines: LEARN on what the model must
learn to write (assistant content and the `<|endoftext|>` that ends its turn), START on each conversation's
first token. Conversations are written back to back, without the `<|endoftext|>` that precedes text documents:
the START flag is what separates them, and a conversation begins exactly as a chat prompt does.

Malformed conversations (not a list of {role, content} messages, an unknown role, turns out of order, not
ending with an assistant turn) are skipped and counted: the writer counts them as it counts empty documents
("empty_documents" in the manifest), the summary line reports them with the first reason, and a source with no
valid conversation at all is refused.

This module imports no torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from talm.data.manifest import LEARN, MASK_DTYPE, START
from talm.data.writer import TokenBatch
from talm.errors import TalmError


def conversation_rows(source: Any, values: Any) -> tuple[list[Any], np.ndarray]:
    """The messages of each row of Arrow column `values`, and the UTF-8 bytes of each row's contents (what the
    reader's batches are sized by and the manifest's byte counts come from)."""
    import pyarrow as pa

    if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)):
        raise TalmError(
            f"column {source.text_column!r} of {source.source} holds {values.type}, not lists of messages: pass "
            "the column holding the conversations with --text-column"
        )
    rows = values.to_pylist()
    return rows, np.fromiter(map(_content_bytes, rows), dtype=np.int64, count=len(rows))


def _content_bytes(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(
        len(m["content"].encode("utf-8", "surrogatepass"))
        for m in messages
        if isinstance(m, dict) and isinstance(m.get("content"), str)
    )


class ConversationEncoder:
    """Renders batches of conversations into `TokenBatch`es with loss-mask flags (the `encode` of
    `prepare.write_shards`); counts the valid ones and keeps the first reason a conversation was skipped."""

    def __init__(self, tokenizer: Any) -> None:
        from talm.tokenizer.chat import ChatFormat

        self.chat = ChatFormat(tokenizer)
        self.dtype = tokenizer.token_dtype
        self.valid = 0
        self.skipped = 0
        self.first_problem: str | None = None

    def __call__(self, rows: list[Any], utf8_bytes: np.ndarray, state_before: dict) -> TokenBatch:
        from talm.tokenizer.chat import BadConversation

        rendered = self.chat.render_batch(rows)
        doc_tokens = np.zeros(len(rows), dtype=np.int64)
        ids: list[int] = []
        flags: list[int] = []
        for i, result in enumerate(rendered):
            if isinstance(result, BadConversation):  # a zero-length document: the writer counts it as skipped
                self.skipped += 1
                if self.first_problem is None:
                    self.first_problem = f"conversation {self.valid + self.skipped}: {result}"
                continue
            conv_ids, learn = result
            doc_tokens[i] = len(conv_ids)
            ids += conv_ids
            flags += [LEARN * m for m in learn]
            flags[len(ids) - len(conv_ids)] |= START
            self.valid += 1
        return TokenBatch(
            np.asarray(ids, dtype=self.dtype),
            doc_tokens,
            np.where(doc_tokens > 0, utf8_bytes, 0),
            state_before,
            mask=np.asarray(flags, dtype=MASK_DTYPE),
        )

    def no_valid_conversation(self, source: Any) -> TalmError:
        """The refusal when the whole source held no valid conversation."""
        why = f" (the first: {self.first_problem})" if self.first_problem else ""
        return TalmError(
            f"{source.source} held no valid conversation: {self.skipped:,} malformed ones skipped{why}; each row's "
            f"{source.text_column!r} must be a list of {{role, content}} messages, user and assistant alternating "
            "and ending with the assistant (pass the right column with --text-column)"
        )
