"""The exported tokenizer's chat_template renders conversations to exactly talm's chat format's ids
(`transformers.PreTrainedTokenizerFast.apply_chat_template` against `talm.tokenizer.chat.ChatFormat`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from talm.tokenizer.api import Tokenizer
from talm.tokenizer.chat import ChatFormat
from talm.use.export import write_tokenizer_files

BASE = Path(__file__).resolve().parents[2] / "tokenizers" / "base.json"

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be terse.\nAnswer in English."},
        {"role": "user", "content": "what is 17 plus 25?"},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "  and times two? "},
        {"role": "assistant", "content": " 84\n\n"},
    ],
    [
        {"role": "user", "content": "naïve café — 日本語 🙂\ttabs"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Thou art a villain, quoth he.\r\nAy."},
        {"role": "assistant", "content": "O Romeo, Romeo! wherefore art thou Romeo?"},
    ],
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[ChatFormat, object]:
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("export")
    tokenizer = Tokenizer.from_file(BASE)
    write_tokenizer_files(tokenizer, out, context_length=256)
    return ChatFormat(tokenizer), PreTrainedTokenizerFast.from_pretrained(str(out))


def ids_of(rendered: object) -> list[int]:
    """apply_chat_template's ids, whether it returns a list or (newer transformers) a BatchEncoding."""
    return list(rendered["input_ids"]) if hasattr(rendered, "keys") else list(rendered)


@pytest.mark.parametrize(
    "messages", CONVERSATIONS, ids=["one-turn", "system-and-two-turns", "unicode-and-empty"]
)
def test_apply_chat_template_gives_talms_ids(exported: tuple, messages: list[dict[str, str]]) -> None:
    chat, hf = exported
    assert hf.chat_template
    ids, _ = chat.render(messages)
    assert ids_of(hf.apply_chat_template(messages, tokenize=True)) == ids
    # the prompt for the last reply: the conversation up to its last user turn, then <|assistant|>
    prompt = messages[:-1]
    expected = chat.render_prompt(prompt)
    assert ids_of(hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)) == expected
    assert expected[-1] == chat.role_ids["assistant"]


def test_the_template_refuses_an_unknown_role(exported: tuple) -> None:
    _, hf = exported
    with pytest.raises(Exception, match="unknown role tool"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_a_tokenizer_without_role_tokens_exports_without_a_template(tmp_path: Path) -> None:
    import json

    tokenizer = Tokenizer.from_file(BASE)
    tokenizer.special_tokens = {"<|endoftext|>": tokenizer.eot_id}  # as a tokenizer imported from elsewhere
    write_tokenizer_files(tokenizer, tmp_path, context_length=64)
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
