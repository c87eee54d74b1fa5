"""Conversation batches (talm.train.packing): packing whole conversations, the mask of each target, counts,
the step's loss over its learned targets, attention kept inside conversations, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from talm.data.config import DownloadConfig
from talm.data.manifest import read_data
from talm.data.prepare import prepare
from talm.model.config import ModelConfig
from talm.model.gpt import GPT
from talm.tokenizer.api import Tokenizer
from talm.tokenizer.chat import ChatFormat
from talm.train import dist
from talm.train.packing import ConversationEval, ConversationLoader, conversation_step, pack

BASE = Path(__file__).resolve().parents[2] / "tokenizers" / "base.json"
ROW = 48  # context_length 47


def conversation(i: int) -> list[dict[str, str]]:
    """Varied lengths; every 9th is far longer than a row (dropped)."""
    words = " ".join(["word"] * (40 if i % 9 == 4 else i % 5))
    messages = [{"role": "user", "content": f"q{i} {words}"}, {"role": "assistant", "content": f"a{i}"}]
    if i % 4 == 1:
        messages = [
            {"role": "system", "content": "sys"},
            *messages,
            *messages[:1],
            {"role": "assistant", "content": f"b{i}"},
        ]
    return messages


@pytest.fixture(scope="module")
def conv_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("conv")
    with open(root / "c.jsonl", "w", encoding="utf-8") as f:
        for i in range(120):
            f.write(json.dumps({"messages": conversation(i)}) + "\n")
    cfg = DownloadConfig(
        dataset="c", data_files=[str(root / "c.jsonl")], conversations=True, tokenizer_path=BASE,
        data_root=root / "data", val_tokens=200, shard_size=500,  # conversations cross shard boundaries
    )  # fmt: skip
    return prepare(cfg, progress=False).out_dir


@pytest.fixture(scope="module")
def chat() -> ChatFormat:
    return ChatFormat(Tokenizer.from_file(BASE))


def loader(data_dir: Path, **kwargs) -> ConversationLoader:
    args = {"batch_size": 4, "context_length": ROW - 1, "seed": 7, "pad_id": 1020} | kwargs
    return ConversationLoader(read_data(data_dir), **args)


def test_pack_fills_rows_in_order_and_never_cuts_a_conversation() -> None:
    lengths = np.array([5, 3, 4, 8, 1, 1, 6, 2])
    bounds = pack(lengths, 8)
    rows = [lengths[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert [r.tolist() for r in rows] == [[5, 3], [4], [8], [1, 1, 6], [2]]
    assert all(r.sum() <= 8 for r in rows)


def test_rows_hold_whole_conversations_and_targets_carry_the_mask_of_the_predicted_token(
    conv_data: Path, chat: ChatFormat
) -> None:
    rendered = {tuple(ids): mask for ids, mask in map(chat.render, map(conversation, range(120)))}
    long = sum(1 for ids in rendered if len(ids) > ROW)
    ld = loader(conv_data, isolate=True, batch_size=1)
    assert 0 < ld.dropped <= long  # (some long ones are in the val split)
    seen = 0
    for _ in range(ld.total_windows):  # one epoch
        x, y, docs, count = ld.next_batch()
        assert docs is not None and x.shape == y.shape == docs.shape == (1, ROW - 1)
        assert count == int((y >= 0).sum()) > 0
        for row_x, row_y, row_d in zip(x.tolist(), y.tolist(), docs.tolist(), strict=True):
            for d in sorted(set(row_d)):
                where = [t for t, v in enumerate(row_d) if v == d]
                piece = [row_x[t] for t in where]
                if set(piece) == {1020} and d == max(row_d):
                    assert all(row_y[t] == -1 for t in where)  # padding is never learned
                    continue
                whole = [k for k in rendered if list(k[: len(piece)]) == piece]
                assert whole, "a row holds something that is not the start of a conversation"
                ids, mask = list(whole[0]), rendered[whole[0]]
                assert where == list(range(where[0], where[0] + len(piece)))  # contiguous
                for k, t in enumerate(where):  # the target of position k is token k + 1 with *its* mask
                    want = ids[k + 1] if k + 1 < len(ids) and mask[k + 1] else -1
                    assert row_y[t] == want
                if where[-1] < ROW - 2:  # not at the row's end: the conversation is whole
                    assert len(piece) == len(ids)
                seen += 1
    assert seen == ld.conversations and ld.epoch == 0  # each conversation once


def test_the_eval_slice_packs_the_val_split(conv_data: Path) -> None:
    ev = ConversationEval(
        read_data(conv_data), eval_tokens=1000, context_length=ROW - 1, batch_size=2, pad_id=1020
    )
    batches = list(ev)
    assert batches and all(b[3] == int((b[1] >= 0).sum()) > 0 for b in batches)
    assert ev.tokens_per_byte is None


def test_the_step_loss_is_the_mean_over_every_learned_target_of_the_step(conv_data: Path) -> None:
    """Micro-batches learn different numbers of targets: the scaled sums must add up to the mean over all."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=1024, context_length=ROW - 1, n_layer=1, n_head=2, d_model=32))
    ld = loader(conv_data, batch_size=2, accum_steps=3)
    step = conversation_step(
        ld, 3, dist.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    )
    counts = [int((y >= 0).sum()) for _, y, _, _ in step]
    assert len(set(counts)) > 1  # the case that a mean of means gets wrong
    with torch.no_grad():
        scaled = sum(model(x, y, reduction="sum")[1] * scale for x, y, _, scale in step) / 3
        logits = torch.cat([model(x)[0].flatten(0, 1) for x, _, _, _ in step])
        direct = F.cross_entropy(logits, torch.cat([y.flatten() for _, y, _, _ in step]), ignore_index=-1)
    torch.testing.assert_close(scaled, direct)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_doc_ids_keep_attention_inside_each_conversation(conv_data: Path, arch: str) -> None:
    """A conversation packed after another gives the logits it gives alone: attention stays inside it, and its
    positions count from its own start (what gpt2's learned position table needs; RoPE is relative)."""
    torch.manual_seed(0)
    size = {"vocab_size": 1024, "context_length": ROW - 1, "n_layer": 2, "n_head": 2, "d_model": 32}
    model = GPT(ModelConfig(**size, arch=arch, **({"mlp": "gelu"} if arch == "gpt2" else {}))).eval()
    assert loader(conv_data, isolate=False).next_batch()[2] is None  # --no-train.isolate_conversations
    x, _, docs, _ = loader(conv_data).next_batch()
    assert docs is not None
    row, ids = x[0], docs[0]
    second = (ids == 1).nonzero().flatten()
    assert len(second) > 0, "the first row should hold two conversations"
    with torch.no_grad():
        packed = model(x[:1], doc_ids=docs[:1])[0][0, second]
        alone = model(row[second][None])[0][0]
        crossing = model(x[:1])[0][0, second]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(crossing, alone, atol=1e-3)


def test_resume_continues_with_the_same_batches(conv_data: Path) -> None:
    first = loader(conv_data)
    for _ in range(5):
        first.next_batch()
    state = first.state_dict()
    want = [first.next_batch() for _ in range(30)]  # crosses into the next epoch
    second = loader(conv_data)
    second.load_state_dict(state)
    got = [second.next_batch() for _ in range(30)]
    assert first.epoch >= 1
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[3] == b[3]


def test_ranks_take_disjoint_rows(conv_data: Path) -> None:
    r0, r1 = loader(conv_data, rank=0, world_size=2), loader(conv_data, rank=1, world_size=2)
    x0, x1 = r0.next_batch()[0], r1.next_batch()[0]
    one = loader(conv_data, batch_size=8).next_batch()[0]
    assert torch.equal(torch.cat([x0, x1]), one)


def test_a_fine_tuning_run_stopped_and_resumed_repeats_the_uninterrupted_losses(
    conv_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import talm.train.loop as loop
    from talm.config import validate
    from talm.train.config import RunConfig
    from talm.train.metrics import read_metrics
    from talm.train.run import resolve_run, train

    layer = {
        "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "context_length": ROW - 1},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"max_steps": 8, "batch_size": 2, "tokens_per_step": 4 * (ROW - 1), "eval_every": 4}
        | {"save_every": 100, "log_every": 1, "eval_tokens": 200, "device": "cpu", "deterministic": True},
        "data": {"dir": str(conv_data)},
    }
    train(validate(RunConfig, layer), tmp_path / "whole")

    class StopInStep4(loop.StopRequest):
        asked = 0

        @property
        def requested(self) -> bool:
            type(self).asked += 1
            return type(self).asked >= 4

        @requested.setter
        def requested(self, value: bool) -> None:
            pass

    monkeypatch.setattr(loop, "StopRequest", StopInStep4)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in step 4: saved, then stopped
        loop.Trainer(validate(RunConfig, layer), tmp_path / "cut").run()
    monkeypatch.undo()
    cfg, resume_from = resolve_run(tmp_path / "cut", [layer])
    train(cfg, tmp_path / "cut", resume_from=resume_from)

    def losses(name: str, key: str) -> dict[int, float]:
        return {r["step"]: r[key] for r in read_metrics(tmp_path / name) if key in r}

    whole, cut = losses("whole", "train_loss"), losses("cut", "train_loss")
    assert sorted(cut) == list(range(1, 9))
    assert [cut[s] for s in range(5, 9)] == pytest.approx([whole[s] for s in range(5, 9)], rel=1e-6)
    assert losses("cut", "val_loss")[8] == pytest.approx(losses("whole", "val_loss")[8], rel=1e-6)


def conversations_dir(root: Path, convs: list[list[dict[str, str]]], **kwargs) -> Path:
    """Conversation data made by the real data stage from `convs` (DownloadConfig fields in kwargs)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "c.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"messages": c}) + "\n" for c in convs)
    args = {"dataset": "c", "data_files": [str(root / "c.jsonl")], "conversations": True} | kwargs
    return prepare(
        DownloadConfig(**args, tokenizer_path=BASE, data_root=root / "data"), progress=False
    ).out_dir


class Batches:
    """A stand-in loader handing out fixed batches."""

    def __init__(self, batches: list) -> None:
        self.batches = iter(batches)

    def next_batch(self) -> tuple:
        return next(self.batches)


def test_a_micro_batch_with_no_learned_target_adds_nothing_to_the_step() -> None:
    """A fully masked micro-batch (a row holding only a conversation cut before its answer) leaves the step's
    loss finite and its gradient exactly that of the other micro-batches (a mean over no target is NaN)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=1024, context_length=ROW - 1, n_layer=1, n_head=2, d_model=32))
    ctx = dist.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    x = torch.randint(0, 1024, (1, ROW - 1))
    y = torch.where(torch.arange(ROW - 1) % 3 == 0, torch.randint(0, 1024, (1, ROW - 1)), -1)
    learned, empty = (x, y, None, int((y >= 0).sum())), (x.flip(1), torch.full_like(y, -1), None, 0)

    def step_gradient(batches: list) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        total = 0.0
        for x, y, _, scale in conversation_step(Batches(batches), len(batches), ctx):
            loss = model(x, y, reduction="sum")[1] * scale / len(batches)  # as the trainer does
            loss.backward()
            total += loss.item()
        return total, [p.grad.clone() for p in model.parameters()]

    loss_with_empty, with_empty = step_gradient([empty, learned])
    loss_alone, alone = step_gradient([learned])
    assert np.isfinite(loss_with_empty) and loss_with_empty == pytest.approx(loss_alone, rel=1e-6)
    for a, b in zip(with_empty, alone, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_a_conversation_cut_before_its_answer_trains_with_batch_one(tmp_path: Path) -> None:
    """--max-tokens cutting the last conversation after its question leaves a conversation with nothing to
    learn: it is dropped (and said), not trained on as a batch whose loss is NaN ('diverged')."""
    from talm.config import validate
    from talm.train.config import RunConfig
    from talm.train.metrics import read_metrics
    from talm.train.run import train

    convs = [
        [
            {"role": "user", "content": f"question {i} " + "word " * 12},
            {"role": "assistant", "content": f"a{i}"},
        ]
        for i in range(12)
    ]
    chat = ChatFormat(Tokenizer.from_file(BASE))
    lengths = [len(chat.render(c)[0]) for c in convs]
    question = len(chat.render_prompt(convs[-1][:1])) - 1  # the last one's role token and question only
    data = conversations_dir(tmp_path, convs, val_tokens=0, max_tokens=sum(lengths[:-1]) + question)
    ld = ConversationLoader(
        read_data(data, splits=("train",)), batch_size=1, context_length=max(lengths), seed=0, pad_id=1020
    )
    assert (
        ld.conversations == len(convs) - 1 and "1 with no assistant token to learn dropped" in ld.describe()
    )
    layer = {
        "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "context_length": max(lengths)},
        "train": {"max_steps": 12, "batch_size": 1, "log_every": 1, "save_every": 100, "device": "cpu"},
        "data": {"dir": str(data)},
    }
    train(validate(RunConfig, layer), tmp_path / "run")
    losses = [r["train_loss"] for r in read_metrics(tmp_path / "run") if "train_loss" in r]
    assert len(losses) == 12 and np.isfinite(losses).all()


def test_a_val_split_with_nothing_to_score_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every val conversation longer than the context: train_model says so in one line at the start, exit 2,
    and models/NAME is not made (before: it trained, then died with ZeroDivisionError at the first eval)."""
    from talm.cli import train_model

    long = [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    data = conversations_dir(tmp_path, [long] * 3 + [short] * 40, val_tokens=150)
    assert read_data(data).split("val")
    monkeypatch.chdir(tmp_path)
    argv = ["train_model", "-n", "sft", "-d", str(data), "--device", "cpu", "--model.context_length", "32"]
    argv += "--model.n_layer 1 --model.d_model 32 --model.n_head 2 --batch-size 1 --max-steps 4".split()
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exit:
        train_model.main()
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and len(err.splitlines()) == 1, err
    assert "val split has nothing to score (3 conversation(s): 3 longer than context_length+1=33" in err
    assert "--model.context_length" in err and not (tmp_path / "models" / "sft").exists()
