"""Supervised fine-tuning, end to end: the loss mask is what teaches a model to answer.

A tiny model is trained from scratch, through the real data stage (`prepare` with conversations) and the real
trainer, on synthetic conversations made here: the user asks "repeat 4 7 1 9" and the assistant answers
"4 7 1 9". The task is learned in a few seconds by a rule (copy the digits after "repeat"), so held-out prompts,
digit strings never seen in training, are answered only if the model learned to write the assistant's turn.
The same run with the loss mask inverted (training on the user's turns and the role tokens instead) is the
control: it sees exactly the same tokens, and cannot answer.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from talm.data.config import DownloadConfig
from talm.data.manifest import LEARN
from talm.data.prepare import prepare
from talm.tokenizer.api import Tokenizer
from talm.tokenizer.chat import ChatFormat
from talm.train.config import RunConfig
from talm.train.loop import Trainer

BASE = Path(__file__).resolve().parents[2] / "tokenizers" / "base.json"
DIGITS = 4


def repeat(digits: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"repeat {digits}"}, {"role": "assistant", "content": digits}]


@pytest.fixture(scope="module")
def copy_task(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """(conversation data directory, held-out digit strings): 1,400 training strings, 50 held out."""
    root = tmp_path_factory.mktemp("sft")
    rng = random.Random(0)
    strings = sorted({" ".join(str(rng.randrange(10)) for _ in range(DIGITS)) for _ in range(1_600)})
    rng.shuffle(strings)
    held_out, train = strings[:50], strings[50:]
    with open(root / "chats.jsonl", "w", encoding="utf-8") as f:
        for i, digits in enumerate(train):
            messages = repeat(digits)
            if i % 3 == 0:  # some two-turn conversations: every assistant turn is learned
                messages += repeat(train[(i + 1) % len(train)])
            f.write(json.dumps({"messages": messages}) + "\n")
    cfg = DownloadConfig(
        dataset="copy",
        data_files=[str(root / "chats.jsonl")],
        conversations=True,
        tokenizer_path=BASE,
        data_root=root / "data",
        val_tokens=300,
    )
    result = prepare(cfg, progress=False)
    assert result.manifest["loss_mask"] and result.manifest["totals"]["empty_documents"] == 0
    return result.out_dir, held_out


def fine_tune(data: Path, model_dir: Path) -> torch.nn.Module:
    cfg = RunConfig.model_validate(
        {
            "model": {"context_length": 64, "n_layer": 2, "n_head": 2, "d_model": 64, "qk_norm": True},
            "optim": {"name": "muon", "lr": 3e-3, "warmup_steps": 20, "schedule": "wsd"},
            "train": {"max_steps": 100, "batch_size": 8, "eval_every": 100, "eval_tokens": 256}
            | {"save_every": 1000, "log_every": 50, "device": "cpu", "seed": 3},
            "data": {"dir": str(data)},
        }
    )
    trainer = Trainer(cfg, model_dir)
    trainer.run()
    return trainer.model.eval()


@torch.no_grad()
def answers(model: torch.nn.Module, prompts: list[str]) -> list[str]:
    """Greedy replies to "repeat DIGITS", generated from the chat prompt the REPL and server would send."""
    chat = ChatFormat(Tokenizer.from_file(BASE))
    ids = torch.tensor([chat.render_prompt(repeat(p)[:1]) for p in prompts])  # all the same length
    for _ in range(2 * DIGITS + 1):
        logits, _ = model(ids, last_only=True)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    replies = []
    for row in ids[:, -(2 * DIGITS + 1) :].tolist():
        end = row.index(chat.end_id) if chat.end_id in row else len(row)
        replies.append(chat.tokenizer.decode(row[:end]))
    return replies


def accuracy(model: torch.nn.Module, held_out: list[str]) -> float:
    return float(np.mean([got == want for got, want in zip(answers(model, held_out), held_out, strict=True)]))


def test_fine_tuning_with_the_loss_mask_answers_held_out_prompts(
    copy_task: tuple[Path, list[str]], tmp_path: Path
) -> None:
    data, held_out = copy_task
    model = fine_tune(data, tmp_path / "models" / "sft")
    assert accuracy(model, held_out) >= 0.9


def test_the_same_run_with_the_mask_inverted_cannot_answer(
    copy_task: tuple[Path, list[str]], tmp_path: Path
) -> None:
    data, held_out = copy_task
    inverted = tmp_path / "inverted"
    shutil.copytree(data, inverted)
    for path in inverted.glob("*.mask.npy"):  # learn the user's turns and role tokens, not the assistant's
        np.save(path, np.load(path) ^ LEARN)
    model = fine_tune(inverted, tmp_path / "models" / "inverted")
    assert accuracy(model, held_out) <= 0.1
