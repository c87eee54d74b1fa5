"""From a base model to an assistant, through the real console scripts, as docs/finetuning-chat.md tells a user:
download_data tinyshakespeare -> train_model --preset tiny (a base model as scripts/demo makes it, smaller;
tokenizers/base.json is the very file the demo's `train_tokenizer -vs 1024` writes) -> a conversation .jsonl ->
download_data --conversations -> train_model --init-from --preset sft -> chat (stdin) -> serve + the openai
client -> export_model + transformers (apply_chat_template, generate).

The conversations all get the same reply, which a tiny model learns in a few dozen steps: the base model does not
say it, the fine-tuned one says it to prompts it never saw, in every front end."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BASE_TOKENIZER, ROOT, SHAKESPEARE, one_line_error

from talm.cli import download_data, train_model
from talm.tokenizer.chat import ChatFormat
from talm.train.checkpoint import read_meta
from talm.train.metrics import read_metrics
from talm.use.chat import stream_reply
from talm.use.config import SampleConfig
from talm.use.load import load

BIN = Path(sys.executable).parent
REPLY = "Hello from talm."
BASE_SHAPE = (
    "--device cpu --model.context_length 64 --model.n_layer 1 --model.d_model 64 --model.n_head 2 "
    "--batch-size 8 --eval-tokens 512 --seed 1"
).split()
# --preset sft as documented, at the tiny preset's learning rates: the preset's 2% rates are for real base
# models and real runs (1,000 steps); a 1-layer model fine-tuned for 40 steps needs the pretraining rates.
SFT = (
    "--device cpu --batch-size 8 --max-steps 40 --eval-every 20 --eval-tokens 1024 --log-every 1 --seed 1 "
    "--optim.muon_lr 0.02 --optim.lr 3e-3"
).split()


def env() -> dict[str, str]:
    src = str(ROOT / "src")
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
    }


def run(cwd: Path, script: str, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(BIN / script), *argv],
        cwd=cwd,
        env=env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{script} {' '.join(argv)}:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def write_conversations(path: Path, count: int) -> None:
    """Conversations asking anything (lines of tiny-shakespeare), sometimes with a system message, sometimes two
    exchanges long; the assistant always answers REPLY."""
    lines = [ln for ln in SHAKESPEARE.read_text(encoding="utf-8")[:60_000].splitlines() if ln.strip()]
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(count):
            messages = [{"role": "system", "content": "Be kind."}] if rng.random() < 0.3 else []
            for _ in range(rng.choice([1, 1, 2])):
                messages += [
                    {"role": "user", "content": rng.choice(lines)},
                    {"role": "assistant", "content": REPLY},
                ]
            f.write(json.dumps({"messages": messages}) + "\n")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def greedy_reply(model_dir: Path, messages: list[dict[str, str]], max_new_tokens: int = 12) -> str:
    model, tokenizer = load(model_dir, device="cpu")
    chat = ChatFormat(tokenizer)
    config = SampleConfig(max_new_tokens=max_new_tokens, temperature=0)
    return "".join(stream_reply(model, tokenizer, chat.render_prompt(messages), config, end_id=chat.end_id))


def test_base_model_to_assistant_in_every_front_end(tmp_path: Path) -> None:
    # 1. a base model as the README's quick start makes it (a shorter tiny run on a slice of tiny-shakespeare)
    (tmp_path / "tiny-shakespeare.txt").write_text(
        SHAKESPEARE.read_text(encoding="utf-8")[:200_000], encoding="utf-8"
    )
    (tmp_path / "tokenizers").mkdir()
    shutil.copyfile(
        BASE_TOKENIZER, tmp_path / "tokenizers" / "base.json"
    )  # download_data's default tokenizer
    run(tmp_path, "download_data", "tinyshakespeare")
    base_args = ["-d", "data/tinyshakespeare/default", "--preset", "tiny", *BASE_SHAPE]
    run(tmp_path, "train_model", "-n", "base", *base_args, "--max-steps", "10", "--eval-every", "10")
    asked = [{"role": "user", "content": "Who are you?"}]
    assert greedy_reply(tmp_path / "models" / "base", asked) != REPLY

    # 2. a conversation file -> token shards with loss masks, with the base model's tokenizer
    write_conversations(tmp_path / "chats.jsonl", 600)
    out = run(
        tmp_path, "download_data", "chats", "--data-files", "chats.jsonl", "--conversations",
        "-t", "models/base/tokenizer.json", "--val-tokens", "2000",
    ).stdout  # fmt: skip
    assert out.startswith("wrote data/chats/default:") and "(0 malformed skipped)" in out, out
    assert json.loads((tmp_path / "data/chats/default/meta.json").read_text())["loss_mask"] is True

    # 3. supervised fine-tuning from the base model: the base's shape and tokenizer, the loss falls
    sft = run(
        tmp_path, "train_model", "-n", "chat", "-d", "data/chats/default", "--init-from", "models/base",
        "--preset", "sft", *SFT,
    )  # fmt: skip
    assert "training models/chat from models/base" in sft.stderr
    assert "loss on the assistant's tokens only" in sft.stderr
    chat_dir = tmp_path / "models" / "chat"
    saved = read_meta(chat_dir / "latest")["config"]
    base = read_meta(tmp_path / "models" / "base" / "latest")["config"]
    assert saved["model"] == base["model"] and saved["train"]["init_from"] == "models/base"
    assert saved["optim"]["schedule"] == "wsd" and saved["optim"]["weight_decay"] == 0.0  # the sft preset's
    records = read_metrics(chat_dir)
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    val_losses = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5, losses
    assert val_losses[-1] < 0.3 * losses[0], val_losses

    # 4. chat in the terminal, one message per stdin line: the conversation goes on, the learned reply comes back
    said = run(
        tmp_path, "chat", "-m", "models/chat", "--temperature", "0", "--max-new-tokens", "12",
        stdin="What is your name?\nAnd where do you live?\n",
    )  # fmt: skip
    assert said.stdout.splitlines() == [REPLY, REPLY], (said.stdout, said.stderr)

    # 5. serve, and the openai package as its client (a reply, and a streamed one)
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn", reason="the talm[serve] extra is not installed")
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "serve"), "-m", "models/chat", "--port", str(port), "--device", "cpu"],
        cwd=tmp_path,
        env=env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "as model 'chat'" in server.stderr.readline()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 60
        while True:  # the banner comes just before uvicorn binds
            try:
                assert [m.id for m in client.models.list()] == ["chat"]
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "serve never answered"
                time.sleep(0.2)
        messages = [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Tell me a story."},
        ]
        reply = client.chat.completions.create(model="chat", messages=messages, max_tokens=12, temperature=0)
        assert reply.choices[0].message.content == REPLY and reply.choices[0].finish_reason == "stop"
        stream = client.chat.completions.create(
            model="chat", messages=asked, max_tokens=12, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == REPLY
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stderr.close()

    # 6. export: transformers renders talm's prompt with the exported chat_template and generates the reply
    transformers = pytest.importorskip("transformers")
    run(tmp_path, "export_model", "-m", "models/chat", "-o", "exported")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    talm_tokenizer = load(chat_dir, device="cpu")[1]
    for conversation in (asked, messages):
        rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)
        ids = list(rendered["input_ids"])
        assert ids == ChatFormat(talm_tokenizer).render_prompt(conversation)
        prompt = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
        assert tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True) == REPLY


def test_the_example_conversations_and_the_hints_on_the_way(in_tmp: Path, capsys) -> None:
    """scripts/make_conversations writes what download_data --conversations reads, and the mistakes a user makes
    on this path (forgetting --conversations, the default validation split of a small file, forgetting
    --init-from) each say what to do."""
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_conversations"), "chats.jsonl", "--count", "300"],
        check=True,
        capture_output=True,
    )
    (in_tmp / "tokenizers").mkdir()
    shutil.copyfile(BASE_TOKENIZER, in_tmp / "tokenizers" / "base.json")
    err = one_line_error(capsys, download_data.main, "chats", "--data-files", "chats.jsonl")
    assert "has no column 'text' (conversations: add --conversations)" in err
    conversations = ["chats", "--data-files", "chats.jsonl", "--conversations"]
    err = one_line_error(capsys, download_data.main, *conversations)  # 1M validation tokens by default
    suggested = err.rsplit("--val-tokens ", 1)[1].rstrip(")")
    assert "lower --val-tokens (a tenth of this stream" in err and int(suggested) > 0
    download_data.main([*conversations, "--val-tokens", suggested])
    assert "300 conversations (0 malformed skipped)" in capsys.readouterr().out

    tiny = "--model.n_layer 1 --model.d_model 32 --model.n_head 2 --model.context_length 64 --max-steps 1"
    train_model.main(["-n", "scratch", "-d", "data/chats/default", "--preset", "sft", *tiny.split()])
    assert "from scratch (random weights; to fine-tune a base model" in capsys.readouterr().err
