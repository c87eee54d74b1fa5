"""The whole pipeline through the real console scripts, offline: download_data on a local text file ->
train_model (tiny) -> generate, each checked for what it actually produced."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import BASE_TOKENIZER, SHAKESPEARE

from talm.tokenizer.api import Tokenizer
from talm.train.checkpoint import read_meta
from talm.train.metrics import read_metrics

BIN = Path(sys.executable).parent
TRAIN = (
    "--device cpu --model.context_length 32 --model.n_layer 1 --model.d_model 32 --model.n_head 2 "
    "--batch-size 4 --max-steps 12 --eval-every 6 --save-every 6 --log-every 1 --eval-tokens 256 "
    "--optim.lr 3e-3 --optim.warmup_steps 2 --seed 5"
).split()


def run(cwd: Path, script: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(BIN / script), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{script} {' '.join(argv)}:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def test_download_train_generate(tmp_path: Path) -> None:
    (tmp_path / "tokenizers").mkdir()
    shutil.copyfile(BASE_TOKENIZER, tmp_path / "tokenizers" / "base.json")
    # Four long documents (a .txt is split into documents at blank lines): <|endoftext|> is rare in training,
    # so the tiny model's samples run to the token budget.
    lines = [ln for ln in SHAKESPEARE.read_text(encoding="utf-8")[:80_000].splitlines() if ln.strip()]
    docs = ["\n".join(lines[i::4]) for i in range(4)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs), encoding="utf-8")

    # download_data: the manifest describes complete shards holding exactly the documents, in order
    out = run(tmp_path, "download_data", "mine", "--data-files", "corpus.txt", "--val-tokens", "100").stdout
    data = tmp_path / "data" / "mine" / "default"
    assert out.startswith("wrote data/mine/default:")
    meta = json.loads((data / "meta.json").read_text())
    tok = Tokenizer.from_file(BASE_TOKENIZER)
    assert meta["complete"] is True and meta["tokenizer"]["fingerprint"] == tok.fingerprint
    assert {s["split"] for s in meta["shards"]} == {"train", "val"}
    stream = np.concatenate([np.load(data / s["file"]) for s in meta["shards"]])
    assert [s["tokens"] for s in meta["shards"]] == [np.load(data / s["file"]).size for s in meta["shards"]]
    parts = np.split(stream, np.flatnonzero(stream == tok.eot_id))[1:]
    assert [tok.decode(p[1:]) for p in parts] == docs
    assert sum(s["documents"] for s in meta["shards"]) == 4

    # train_model: a checkpoint at the last step, metrics for every step, the loss went down
    run(tmp_path, "train_model", "-n", "e2e", "-d", str(data), *TRAIN)
    model_dir = tmp_path / "models" / "e2e"
    assert read_meta(model_dir / "latest")["step"] == 12
    assert read_meta(model_dir / "best")["val_loss"] is not None
    losses = [r["train_loss"] for r in read_metrics(model_dir) if "train_loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]

    # generate: the prompt continued by exactly the requested number of tokens; a seed repeats its text
    def sample(seed: str) -> tuple[str, str]:
        result = run(
            tmp_path, "generate", "-m", "models/e2e", "-p", "ROMEO:", "--max-new-tokens", "24",
            "--seed", seed, "--device", "cpu",
        )  # fmt: skip
        return result.stdout, result.stderr

    text, err = sample("7")
    assert re.search(r"generated 24 tokens in ", err), err
    assert text.startswith("ROMEO:") and text.endswith("\n") and len(text) > len("ROMEO:\n")
    assert sample("7")[0] == text
    assert sample("8")[0] != text
