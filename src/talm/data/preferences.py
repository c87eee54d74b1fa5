"""Preference data: rows holding a prompt and two replies to it, the chosen and the rejected, rendered with talm's
chat format into token ids and loss-mask flags for preference tuning (DPO: `talm.train.dpo`).

A row is either two whole conversations, `chosen` and `rejected` (lists of {role, content} messages that share
everything before their last, assistant, message: ultrafeedback's layout), or a `prompt` (a list of messages, or
the user's text) plus `chosen` and `rejected` replies (text, or assistant messages). Each pair is written as ONE
document of the shard stream (so the val split and shard cuts never part its sides): the chosen conversation, its
first token flagged START, then the rejected one, its first token flagged REJECTED (`talm.data.manifest`); LEARN
marks each side's last assistant reply (its content and closing `<|endoftext|>`), the tokens DPO scores.

A malformed pair (a missing side, a side that is not a conversation or whose last turn is not the assistant's,
sides that continue different conversations, chosen identical to rejected) is skipped and counted as conversations
are, the first few named by file and line; a source with no valid pair is refused, leaving nothing written.
Sides longer than a model's context are cut when training (`fit_side`), where the context is known.

This module imports no torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from talm.data.conversations import ConversationEncoder, content_bytes, json_kind, with_text_contents
from talm.data.manifest import LEARN, MASK_DTYPE, REJECTED, START
from talm.data.writer import TokenBatch
from talm.errors import TalmError

SIDES = ("chosen", "rejected")


class BadPair(str):
    """Why a row is not a usable preference pair."""


def pair_bytes(row: Any) -> int:
    """UTF-8 bytes of a row's prompt and replies (what the reader sizes its batches by)."""
    if not isinstance(row, dict):
        return 0
    total = 0
    for value in row.values():
        if isinstance(value, str):
            total += len(value.encode("utf-8", "surrogatepass"))
        elif isinstance(value, list):
            total += content_bytes(value)
        elif isinstance(value, dict):
            total += content_bytes([value])
    return total


def _prompt_messages(prompt: Any) -> list[Any] | BadPair:
    if isinstance(prompt, str) and prompt:
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt:
        return prompt
    if prompt is None:
        return BadPair("a reply without a prompt: add a 'prompt' (messages, or the user's text)")
    return BadPair(f"'prompt' is {json_kind(prompt)}, not messages or text")


def side_conversation(prompt: Any, side: Any, name: str) -> list[Any] | BadPair:
    """One side of a row as a whole conversation: itself if it is one (starts with a system or user turn), else
    the prompt followed by it (a reply: text, one assistant message, or a list of them)."""
    if side is None or side == "" or side == []:
        return BadPair(f"a missing side: no {name!r}")
    if isinstance(side, str):
        reply: list[Any] = [{"role": "assistant", "content": side}]
    elif isinstance(side, dict):
        reply = [side]
    elif isinstance(side, list) and all(isinstance(m, dict) for m in side):
        if side[0].get("role") != "assistant":
            return side  # a whole conversation
        reply = side
    else:
        return BadPair(f"{name!r} is {json_kind(side)}, not a reply or a conversation")
    prompt_messages = _prompt_messages(prompt)
    return prompt_messages if isinstance(prompt_messages, BadPair) else [*prompt_messages, *reply]


def pair_conversations(row: Any) -> tuple[list[dict[str, str]], list[dict[str, str]]] | BadPair:
    """The chosen and rejected conversations of a row, checked (`check_messages`, both ending with the assistant,
    sharing all before the last reply, different); a BadPair saying what is wrong."""
    from talm.tokenizer.chat import BadConversation, check_messages

    if not isinstance(row, dict):
        return BadPair(f"the row is {json_kind(row)}, not an object")
    sides = []
    for name in SIDES:
        conversation = side_conversation(row.get("prompt"), row.get(name), name)
        if isinstance(conversation, BadPair):
            return conversation
        conversation = with_text_contents(conversation)
        try:
            if isinstance(conversation, BadConversation):
                raise conversation
            sides.append(check_messages(conversation, ends_with="assistant"))
        except BadConversation as err:
            return BadPair(f"{name}: {err}")
    chosen, rejected = sides
    if chosen == rejected:
        return BadPair("chosen and rejected are identical")
    if chosen[:-1] != rejected[:-1]:
        return BadPair(
            "chosen and rejected continue different conversations (all but the last reply must match)"
        )
    return chosen, rejected


def last_reply_only(ids: list[int], learn: list[int], assistant_id: int) -> list[int]:
    """`learn` kept on the last assistant turn only (earlier ones are context both sides share): everything after
    the last `<|assistant|>` token (content is never read as special tokens, so that one opens the last turn)."""
    last = len(ids) - 1 - ids[::-1].index(assistant_id)
    return [0] * (last + 1) + learn[last + 1 :]


class PreferenceEncoder(ConversationEncoder):
    """Renders batches of preference rows into `TokenBatch`es, one document per pair (the `encode` of
    `prepare.write_shards`); counts the valid pairs and the malformed ones (naming the first few)."""

    def __call__(self, batch: Any, state_before: dict) -> TokenBatch:
        pairs = [pair_conversations(r) for r in batch.texts]
        good = [p for p in pairs if not isinstance(p, BadPair)]
        rendered = iter(self.chat.render_batch([side for p in good for side in p]))
        doc_tokens = np.zeros(len(pairs), dtype=np.int64)
        doc_bytes = np.zeros(len(pairs), dtype=np.int64)
        ids: list[int] = []
        flags: list[int] = []
        for i, pair in enumerate(pairs):
            if isinstance(pair, BadPair):  # a zero-length document: the writer counts it as skipped
                where = batch.places[i] if batch.places else f"pair {self.valid + self.skipped + 1}"
                self.malformed.add(where, str(pair))
                continue
            for side, flag in zip(pair, (START, REJECTED), strict=True):
                side_ids, learn = next(rendered)  # type: ignore[misc]
                learn = last_reply_only(side_ids, learn, self.chat.role_ids["assistant"])
                flags += [LEARN * m for m in learn]
                flags[len(ids)] |= flag
                ids += side_ids
                doc_tokens[i] += len(side_ids)
                doc_bytes[i] += content_bytes(side)
            self.valid += 1
        return TokenBatch(
            np.asarray(ids, dtype=self.dtype),
            doc_tokens,
            doc_bytes,
            state_before,
            mask=np.asarray(flags, dtype=MASK_DTYPE),
        )

    def no_valid_conversation(self, source: Any) -> TalmError:
        """The refusal when the whole source held no valid pair."""
        first = self.malformed.first
        why = f" (the first: {first[0]})" if first else ""
        return TalmError(
            f"{source.source} held no valid preference pair: {self.skipped:,} malformed ones skipped{why}; each "
            "row needs chosen and rejected conversations ending with different assistant replies, or a prompt and "
            "the two replies"
        )


# ------------------------------------------------------------------------------------------------ reading


def split_pair(ids: np.ndarray, flags: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """A stored pair's (ids, learn) of its chosen side, then of its rejected side (split at the REJECTED flag)."""
    cut = int(np.flatnonzero(flags & REJECTED)[0])
    learn = (flags & LEARN) != 0
    return (ids[:cut], learn[:cut]), (ids[cut:], learn[cut:])


def fit_side(ids: np.ndarray, learn: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A side cut to at most `limit` tokens from the left, the prompt losing its start and the reply kept whole
    (with the token before it, which predicts its first); None when the reply alone does not fit."""
    if len(ids) <= limit:
        return ids, learn
    first = int(np.argmax(learn)) if learn.any() else len(ids)
    cut = len(ids) - limit
    if cut > first - 1:
        return None
    return ids[cut:], learn[cut:]
