"""Shared test fixtures. Every test runs on CPU with tiny models and tiny data."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "tiny-shakespeare.txt"
BASE_TOKENIZER = ROOT / "tokenizers" / "base.json"
ORIGINAL_TOKENIZER = ROOT / "tests" / "fixtures" / "talm-original-base.json"


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test inside an empty temporary directory (paths resolve against the current directory)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def project(in_tmp: Path) -> Path:
    """A temp dir set up like the project root: tokenizers/base.json and tiny-shakespeare.txt."""
    (in_tmp / "tokenizers").mkdir()
    shutil.copyfile(BASE_TOKENIZER, in_tmp / "tokenizers" / "base.json")
    shutil.copyfile(SHAKESPEARE, in_tmp / "tiny-shakespeare.txt")
    return in_tmp


@pytest.fixture(autouse=True)
def _offline_hub(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the Hugging Face Hub or write to the user's cache."""
    hf_home = tmp_path_factory.getbasetemp() / "hf_home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", os.environ.get("TOKENIZERS_PARALLELISM", "true"))


@pytest.fixture(autouse=True)
def _hints_name_the_commands_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every user error a console script prints in a test is checked: each flag it names is a flag of the command
    it names it for (the printing one, unless the hint names another, "rerun download_data with --conversations")."""
    from hints import wrong_flags

    import talm.cli.common as common

    print_error = common.user_error

    def checked(parser: Any, message: str) -> Any:
        wrong = wrong_flags(message, parser.prog)
        assert not wrong, f"{parser.prog}'s message names {wrong}: {message}"
        return print_error(parser, message)

    monkeypatch.setattr(common, "user_error", checked)


def write_token_shards(
    out_dir: Path,
    text: str,
    tokenizer_path: Path = BASE_TOKENIZER,
    *,
    val_docs: int = 80,
    shard_tokens: int = 40_000,
) -> Path:
    """A data directory laid out as download_data writes it (docs/design.md §2): documents = paragraphs of `text`,
    each preceded by <|endoftext|>; the first `val_docs` go to val_000000.npy, the rest to train shards of
    about `shard_tokens` tokens (whole documents); meta.json describes them."""
    import json

    import numpy as np

    from talm.tokenizer.api import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    docs = [d for d in text.split("\n\n") if d.strip()]
    ids = tok.encode_batch(docs)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: list[tuple[str, list[int]]] = [("val", list(range(min(val_docs, len(docs)))))]
    current: list[int] = []
    for i in range(len(groups[0][1]), len(docs)):
        current.append(i)
        if sum(len(ids[j]) + 1 for j in current) >= shard_tokens:
            groups.append(("train", current))
            current = []
    if current:
        groups.append(("train", current))
    shards = []
    for n, (split, members) in enumerate(groups):
        arr = np.concatenate([np.concatenate(([tok.eot_id], ids[j])) for j in members]).astype(
            tok.token_dtype
        )
        name = f"{split}_{n:06d}.npy"
        np.save(out_dir / name, arr)
        shards.append(
            {
                "file": name,
                "split": split,
                "tokens": int(arr.size),
                "documents": len(members),
                "bytes": sum(len(docs[j].encode("utf-8")) for j in members),
            }
        )
    meta = {
        "format": "talm.shards/1",
        "dataset": "test",
        "source": "test",
        "config": "default",
        "tokenizer": {
            "path": str(tokenizer_path),
            "fingerprint": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
        },
        "dtype": np.dtype(tok.token_dtype).name,
        "shard_size": shard_tokens,
        "shards": shards,
        "complete": True,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out_dir


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token shards of the first 150 kB of tiny-shakespeare with the base tokenizer (read-only: copy to modify)."""
    text = SHAKESPEARE.read_text(encoding="utf-8")[:150_000]
    return write_token_shards(tmp_path_factory.mktemp("tiny_data") / "data", text)


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """`tmp_path/models/tiny`: a checkpoint in the layout train_model writes (latest/ and best/, tokenizer.json
    copied from tokenizers/base.json), holding a tiny GPT with random weights, for the stages that use models."""
    import torch

    from talm.model.config import ModelConfig
    from talm.model.gpt import GPT
    from talm.tokenizer.api import Tokenizer

    tokenizer = Tokenizer.from_file(BASE_TOKENIZER)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=64, n_layer=2, n_head=4, d_model=64)
    torch.manual_seed(0)
    model = GPT(config)
    return save_model_dir(tmp_path / "models" / "tiny", model, step=10, val_loss=6.5, val_bpb=3.2)


def save_model_dir(model_dir: Path, model: Any, *, step: int, **scores: float) -> Path:
    """`model` written as train_model lays out models/NAME (latest/ and best/, with tokenizers/base.json as its
    tokenizer.json), as if trained `step` steps of 4096 tokens."""
    import shutil

    from talm.tokenizer.api import Tokenizer
    from talm.train.checkpoint import save_checkpoint

    model_dir.mkdir(parents=True)
    shutil.copyfile(BASE_TOKENIZER, model_dir / "tokenizer.json")
    meta = {
        "step": step,
        "tokens_seen": 4096 * step,
        "config": {"model": model.config.model_dump(mode="json")},
        "tokenizer": {
            "file": "tokenizer.json",
            "fingerprint": Tokenizer.from_file(BASE_TOKENIZER).fingerprint,
        },
        **scores,
    }
    for which in ("latest", "best"):
        save_checkpoint(model_dir / which, model, meta)
    return model_dir


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(model_dir: Path, steps: int = 60, eval_every: int = 20, scale: float = 1.0) -> list[dict]:
    """A metrics.jsonl as the trainer writes it (docs/design.md §4): a falling loss, an evaluation every few steps."""
    model_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for step in range(1, steps + 1):
        tokens = step * 4096
        loss = 2.0 + 5.0 * math.exp(-step / (15 * scale)) + 0.05 * math.sin(step)
        records.append(
            {
                "step": step,
                "tokens": tokens,
                "time": step * 0.3,
                "train_loss": loss,
                "lr": 1e-3,
                "tokens_per_s": 1e4,
            }
        )
        if step % eval_every == 0:
            val = loss + 0.1
            records.append(
                {
                    "step": step,
                    "tokens": tokens,
                    "time": step * 0.3,
                    "val_loss": val,
                    "val_ppl": math.exp(val),
                    "val_bpb": val / math.log(2) / 3,
                }
            )
    (model_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 10_000 and path.read_bytes()[:8] == PNG_MAGIC


def one_line_error(capsys: pytest.CaptureFixture[str], main: Callable[[list[str]], None], *args: str) -> str:
    """Run a console script's `main` expecting a user error: exit status 2 and one line on stderr (returned)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error: " in err, err
    return err


def varied_model(*, vocab: int = 100, context: int = 32, n_kv_head: int | None = None, seed: int = 0) -> Any:
    """A tiny GPT whose random weights are large enough that different tokens give clearly different logits
    (and greedy decoding does not repeat one token)."""
    import torch

    from talm.model.config import ModelConfig
    from talm.model.gpt import GPT

    torch.manual_seed(seed)
    model = GPT(
        ModelConfig(
            vocab_size=vocab, context_length=context, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=32
        )
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def endless_chat_model_dir(model_dir: Path, *, context: int = 64) -> Path:
    """models/NAME holding a tiny GPT (base tokenizer, with its role tokens) that never picks <|endoftext|> at
    temperature 0: its tied embedding row is zero, so that token always scores 0 while the likeliest other token
    scores far above. A reply then lasts as long as its token budget (for tests that stop one midway)."""
    import torch

    from talm.tokenizer.api import Tokenizer

    tokenizer = Tokenizer.from_file(BASE_TOKENIZER)
    model = varied_model(vocab=tokenizer.vocab_size, context=context)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eot_id].zero_()
    return save_model_dir(model_dir, model, step=1)


def drop_role_tokens(model_dir: Path) -> Path:
    """Give models/NAME (as `save_model_dir` writes it) a tokenizer without <|system|>, <|user|>, <|assistant|>,
    as a tokenizer made by another tool may be, recorded in its checkpoints as the one it was trained with."""
    from talm.tokenizer.api import Tokenizer

    spec = json.loads(BASE_TOKENIZER.read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] == "<|endoftext|>"]
    (model_dir / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    fingerprint = Tokenizer.from_file(model_dir / "tokenizer.json").fingerprint
    for which in ("latest", "best"):
        meta_path = model_dir / which / "checkpoint.json"
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        meta["tokenizer"]["fingerprint"] = fingerprint
        meta_path.write_text(json.dumps(meta), encoding="utf-8")
    return model_dir


def fill_disk_in_shard(monkeypatch: pytest.MonkeyPatch, number: int) -> None:
    """The disk fills up while shard file `number` (1-based) is written: its header and part of its tokens
    reach the disk, then a write fails with ENOSPC. `monkeypatch.delattr(talm.data.shard_dir, "open")` ends it."""
    opened = [0]

    class FullDisk:
        def __init__(self, f: Any) -> None:
            self.f, self.writes = f, 0

        def write(self, data: Any) -> int:
            self.writes += 1
            if self.writes == 1:
                return self.f.write(data)
            self.f.write(bytes(data)[:5])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

    def fake_open(path: Any, mode: str = "r", *args: Any, **kw: Any) -> Any:
        f = open(path, mode, *args, **kw)
        if str(path).endswith(".npy.tmp") and "w" in mode:
            opened[0] += 1
            if opened[0] == number:
                return FullDisk(f)
        return f

    import talm.data.shard_dir

    monkeypatch.setattr(talm.data.shard_dir, "open", fake_open, raising=False)
