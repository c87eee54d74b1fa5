"""talm's chat format: how a conversation becomes token ids. The one definition, used by the conversation data
writer (ids + loss mask), the chat REPL and server (prompts), and the exported Hugging Face chat template.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`: an optional
system message first, then user and assistant turns alternating, starting with the user. Each message is its role
token followed by the tokens of its content (special-token spellings in content are ordinary text, so a message
cannot forge a turn); an assistant message ends with `<|endoftext|>`, which is also where generation stops:

    <|system|>Be terse.<|user|>Hi<|assistant|>Hello!<|endoftext|><|user|>Thanks<|assistant|>...

The loss mask is 1 on what the model must learn to write, the assistant's content and its closing
`<|endoftext|>`, and 0 on the role tokens and on system and user content. A prompt for generation is the
conversation so far (ending with a user turn) followed by `<|assistant|>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from talm.errors import TalmError
from talm.tokenizer.api import Tokenizer
from talm.tokenizer.formats import EOT

ROLES = ("system", "user", "assistant")


def role_token(role: str) -> str:
    """The special token that opens a `role` message: `<|user|>` for "user"."""
    return f"<|{role}|>"


class BadConversation(ValueError):
    """A conversation that does not follow the format; the message says what is wrong (one line)."""


def check_messages(messages: Any, *, ends_with: str) -> list[dict[str, str]]:
    """`messages` as a list of {"role", "content"} dicts if it is a valid conversation whose last message is from
    `ends_with` ("assistant" for training data, "user" for a prompt); else BadConversation saying why."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise BadConversation("a conversation must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise BadConversation(f"message {i} must be an object with string 'role' and 'content'")
        role = m["role"]
        if role not in ROLES:
            raise BadConversation(f"message {i} has role {role!r}: the roles are {', '.join(ROLES)}")
        first = 1 if out and out[0]["role"] == "system" else 0
        if role == "system" and i != 0:
            raise BadConversation(f"message {i} is a system message: only the first message may be one")
        if role != "system":
            expected = "user" if (i - first) % 2 == 0 else "assistant"
            if role != expected:
                raise BadConversation(
                    f"message {i} is from {role!r} where {expected!r} was expected (turns alternate)"
                )
        out.append({"role": role, "content": m["content"]})
    if out[-1]["role"] != ends_with:
        raise BadConversation(f"the last message is from {out[-1]['role']!r}; it must be from {ends_with!r}")
    return out


class ChatFormat:
    """Renders conversations to token ids with a tokenizer that has talm's role tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        missing = [t for t in (*map(role_token, ROLES), EOT) if t not in tokenizer.special_tokens]
        if missing:
            raise TalmError(
                f"tokenizer {tokenizer.path} has no {', '.join(missing)} token(s), which talm's chat format needs: "
                "use a tokenizer trained by train_tokenizer (it reserves them)"
            )
        self.tokenizer = tokenizer
        self.role_ids = {role: tokenizer.special_tokens[role_token(role)] for role in ROLES}
        self.end_id = tokenizer.special_tokens[EOT]

    def _append(self, ids: list[int], mask: list[int], m: dict[str, str]) -> None:
        learn = int(m["role"] == "assistant")
        content = self.tokenizer.encode(m["content"])
        ids += [self.role_ids[m["role"]], *content]
        mask += [0] + [learn] * len(content)
        if learn:
            ids.append(self.end_id)
            mask.append(1)

    def render(self, messages: Any) -> tuple[list[int], list[int]]:
        """Token ids of a whole conversation (ending with an assistant turn) and the loss mask of each id."""
        ids: list[int] = []
        mask: list[int] = []
        for m in check_messages(messages, ends_with="assistant"):
            self._append(ids, mask, m)
        return ids, mask

    def render_prompt(self, messages: Any) -> list[int]:
        """Token ids of the conversation so far (ending with a user turn), then `<|assistant|>`: what the model
        continues; its reply ends at `<|endoftext|>` (`end_id`)."""
        ids: list[int] = []
        for m in check_messages(messages, ends_with="user"):
            self._append(ids, [], m)
        return [*ids, self.role_ids["assistant"]]
