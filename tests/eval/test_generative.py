"""Generative evaluation: `evaluate --tasks gsm8k` renders each question as a chat prompt, generates a greedy
reply and compares its final number with the reference; `generate_replies` (shared with GRPO) gives each prompt
the reply it would get alone, cut at <|endoftext|>, also when every batch must run to a fixed length."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import BASE_TOKENIZER, save_model_dir, varied_model
from fixtures.hub_layout import GSM8K_ROWS, write_gsm8k_repo

from talm.cli.evaluate import main
from talm.eval.generative import generate_replies
from talm.eval.runner import read_results
from talm.model.config import ModelConfig
from talm.model.gpt import GPT
from talm.tokenizer.api import Tokenizer


def always_model(token: int, vocab: int, *, ended_by: int | None = None) -> GPT:
    """A GPT whose greedy choice is always `token` (and `ended_by` after it, if given, never chosen first):
    every weight zero but one embedding dimension, read by the output row of `token`."""
    model = GPT(ModelConfig(vocab_size=vocab, context_length=128, n_layer=1, n_head=2, d_model=16,
                            tie_embeddings=False))  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.norm.weight.fill_(1.0)
        model.tok_emb.weight[:, 0] = 1.0
        model.lm_head.weight[token, 0] = 1.0
    return model.eval()


def test_gsm8k_accuracy_is_the_final_number_against_the_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokenizer = Tokenizer.from_file(BASE_TOKENIZER)
    (seven,) = tokenizer.encode("7")
    model_dir = save_model_dir(
        tmp_path / "models" / "sevens", always_model(seven, tokenizer.vocab_size), step=3
    )
    rows = [{**GSM8K_ROWS[0], "answer": "... #### 777"}, {**GSM8K_ROWS[1], "answer": "... #### 77"}]
    write_gsm8k_repo(tmp_path / "tasks", {"main": (GSM8K_ROWS[:1], rows)})
    main(["-m", str(model_dir), "--tasks", "gsm8k", "--tasks-dir", str(tmp_path / "tasks"),
          "--max-new-tokens", "3", "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    assert any(line.split()[:3] == ["gsm8k", "acc", "0.5000"] for line in out.splitlines()), out
    saved = read_results(model_dir / "evals" / "3.json")["tasks"]["gsm8k"]
    assert saved["repo"] == "openai/gsm8k" and saved["split"] == "test" and saved["metrics"]["acc"] == 0.5
    main(["-m", str(model_dir), "--tasks", "gsm8k", "--tasks-dir", str(tmp_path / "tasks"),
          "--max-new-tokens", "3", "--limit", "1", "--device", "cpu"])  # fmt: skip
    assert any(
        line.split()[:3] == ["gsm8k", "acc", "1.0000"] for line in capsys.readouterr().out.splitlines()
    )


def test_replies_are_what_each_prompt_gets_alone_and_end_at_eot() -> None:
    model = varied_model(vocab=60, context=32)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
    eot = 7
    alone = [generate_replies(model, [p], max_new_tokens=12, eot_id=eot)[0] for p in prompts]
    batched = generate_replies(model, prompts, max_new_tokens=12, eot_id=eot, batch_size=3)
    fixed = generate_replies(model, prompts, max_new_tokens=12, eot_id=eot, fixed_length=True)
    assert batched == alone == fixed
    for reply in alone:
        assert eot not in reply[:-1] and (reply[-1] == eot or len(reply) == 12)
    sampled = [generate_replies(model, prompts, max_new_tokens=8, eot_id=eot, temperature=1.0, seed=5)
               for _ in range(2)]  # fmt: skip
    assert sampled[0] == sampled[1]  # a seed repeats the samples
