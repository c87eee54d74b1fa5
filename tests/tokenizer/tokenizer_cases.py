"""Shared cases for the tokenizer tests: the two shipped tokenizers (one per file format) and sample texts."""

from __future__ import annotations

import random

import pytest
from conftest import BASE_TOKENIZER, ORIGINAL_TOKENIZER, SHAKESPEARE

from talm.tokenizer.api import Tokenizer

BASE = Tokenizer.from_file(BASE_TOKENIZER)
ORIGINAL = Tokenizer.from_file(ORIGINAL_TOKENIZER)
BOTH = pytest.mark.parametrize("tok", [BASE, ORIGINAL], ids=["talm", "original"])

SAMPLES = [
    "",
    "Hello, world!",
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n\n\n",
    "naïve café — “quotes” «guillemets» ½ № ™",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "combining: e\u0301 a\u0308\u0323 Z\u0351\u0345\u036b",
    "controls: \x00\x01\x07\x1b[0m\x7f\x85\u2028\u2029 tabs\t\tand\r\nCRLF\r",
    "code: def f(x):\n    return x**2  # 1234567890 3.14159\n\tif (a && b) { c++; }\n",
    "specials as text: <|endoftext|> <|user|>hi<|assistant|> <|system|> <|endoftext",
    "   leading and trailing spaces   \n  \n",
    "I'll we've they're it's DON'T WE'LL",
    "Русский текст, ελληνικά, עברית, العربية, हिन्दी",
    "\ufeffBOM and zero\u200bwidth\u200d joiners \ufffd replacement",
]


def hf_ids(tok: Tokenizer, text: str) -> list[int]:
    """The reference ids: HF's own encoder (for original files, the converted HF tokenizer)."""
    return tok._hf.encode(text, add_special_tokens=False).ids


def varied_documents(n: int, seed: int = 0) -> list[str]:
    """Shakespeare slices of random lengths mixed with the multilingual / emoji / code samples."""
    rng = random.Random(seed)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    docs = []
    for _ in range(n):
        start = rng.randrange(len(text))
        doc = text[start : start + rng.choice([0, 1, 7, 150, 1000, 5000])]
        if rng.random() < 0.3:
            doc = doc + rng.choice(SAMPLES) + doc[: rng.randrange(50)]
        docs.append(doc)
    return docs
