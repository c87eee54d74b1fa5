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
    return rows, np.fromiter(map(content_bytes, rows), dtype=np.int64, count=len(rows))


def content_bytes(messages: Any) -> int:
    """UTF-8 bytes of a conversation's message contents (0 for what is not a conversation)."""
    if not isinstance(messages, list):
        return 0
    total = 0
    for m in messages:
        text = message_text(m.get("content")) if isinstance(m, dict) else None
        total += len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else 0
    return total


def message_text(content: Any) -> str | BadContent:
    """A message's content as text: a string as it is, OpenAI-style content parts ([{"type": "text", "text":
    ...}, ...]) joined; anything else a `BadContent` saying what it is."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "".join(texts)
        return BadContent(
            "a list of content parts that are not all text parts ({'type': 'text', 'text': str})"
        )
    return BadContent(f"{json_kind(content)}, not text")


class BadContent(str):
    """Why a message's content is not text."""


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, in words ("a number", "an object")."""
    kinds = {bool: "a boolean", int: "a number", float: "a number", dict: "an object", str: "a string"}
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    return "null" if value is None else kinds.get(type(value), f"a {type(value).__name__}")


def with_text_contents(messages: Any) -> Any:
    """`messages` with each message's content made text (`message_text`), for `ChatFormat` to check and render;
    a BadConversation saying which message's content is not text. What is not a list of messages is returned
    as it is (ChatFormat says what is wrong with it)."""
    from talm.tokenizer.chat import BadConversation

    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return messages
    out = []
    for i, m in enumerate(messages):
        text = message_text(m.get("content"))
        if isinstance(text, BadContent):
            return BadConversation(f"message {i}'s content is {text}")
        out.append(m if text is m.get("content") else {**m, "content": text})
    return out


class MalformedRows:
    """Rows skipped as malformed: how many, and the first few, each named by where it is and why."""

    NAMED = 3

    def __init__(self) -> None:
        self.count = 0
        self.first: list[str] = []

    def add(self, where: str, why: str) -> None:
        self.count += 1
        if len(self.first) < self.NAMED:
            self.first.append(f"{where}: {why}")


class ConversationEncoder:
    """Renders batches of conversations into `TokenBatch`es with loss-mask flags (the `encode` of
    `prepare.write_shards`); counts the valid ones and the malformed ones (naming the first few)."""

    def __init__(self, tokenizer: Any) -> None:
        from talm.tokenizer.chat import ChatFormat

        self.chat = ChatFormat(tokenizer)
        self.dtype = tokenizer.token_dtype
        self.valid = 0
        self.malformed = MalformedRows()

    @property
    def skipped(self) -> int:
        return self.malformed.count

    def __call__(self, batch: Any, state_before: dict) -> TokenBatch:
        from talm.tokenizer.chat import BadConversation

        rows = [with_text_contents(r) for r in batch.texts]
        rendered = self.chat.render_batch([[] if isinstance(r, BadConversation) else r for r in rows])
        doc_tokens = np.zeros(len(rows), dtype=np.int64)
        ids: list[int] = []
        flags: list[int] = []
        for i, result in enumerate(rendered):
            result = rows[i] if isinstance(rows[i], BadConversation) else result
            if isinstance(result, BadConversation):  # a zero-length document: the writer counts it as skipped
                where = batch.places[i] if batch.places else f"conversation {self.valid + self.skipped + 1}"
                self.malformed.add(where, str(result))
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
            np.where(doc_tokens > 0, batch.utf8_bytes, 0),
            state_before,
            mask=np.asarray(flags, dtype=MASK_DTYPE),
        )

    def no_valid_conversation(self, source: Any) -> TalmError:
        """The refusal when the whole source held no valid conversation."""
        first = self.malformed.first
        why = f" (the first: {first[0]})" if first else ""
        return TalmError(
            f"{source.source} held no valid conversation: {self.skipped:,} malformed ones skipped{why}; each row's "
            f"{source.text_column!r} must be a list of {{role, content}} messages, user and assistant alternating "
            "and ending with the assistant (pass the right column with --text-column)"
        )
