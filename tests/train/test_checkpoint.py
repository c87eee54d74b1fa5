"""Checkpoint directories: atomic save, weights-only load, resolving latest / best (docs/design.md §3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from talm.errors import TalmError
from talm.model.config import ModelConfig
from talm.model.gpt import GPT
from talm.train.checkpoint import (
    load_model,
    load_trainer_state,
    read_meta,
    recover_interrupted_save,
    resolve_checkpoint,
    save_checkpoint,
)
from talm.train.config import RunConfig


def make(tmp_path: Path, step: int = 3) -> tuple[GPT, torch.optim.Optimizer, Path]:
    cfg = RunConfig(model=ModelConfig(vocab_size=100, n_layer=2, n_head=2, d_model=32, context_length=16))
    torch.manual_seed(step)
    model = GPT(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16)))[1].backward()
    opt.step()
    meta = {
        "step": step,
        "tokens_seen": 32 * step,
        "config": cfg.model_dump(mode="json"),
        "tokenizer": {"file": "tokenizer.json", "fingerprint": "abc"},
        "val_loss": 1.5,
        "val_bpb": 0.9,
    }
    state = {
        "step": step,
        "tokens_seen": 32 * step,
        "elapsed": 1.0,
        "best_val_loss": 1.5,
        "optimizer": opt.state_dict(),
        "loader": {"epoch": 0, "cursor": 5, "seed": 1},
        "rng": [torch.get_rng_state()],
    }
    path = save_checkpoint(tmp_path / "models" / "m" / "latest", model, meta, state)
    return model, opt, path


def test_round_trip(tmp_path: Path) -> None:
    model, opt, path = make(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == [
        "checkpoint.json",
        "model.safetensors",
        "trainer_state.pt",
    ]
    loaded, meta = load_model(resolve_checkpoint(tmp_path / "models" / "m"))
    assert not loaded.training and meta["format"] == "talm.checkpoint/1" and meta["step"] == 3
    assert meta["config"]["model"]["vocab_size"] == 100
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randint(0, 100, (1, 16))
    assert torch.equal(model.eval()(x)[0], loaded(x)[0])
    with safe_open(str(path / "model.safetensors"), "pt") as f:  # clean names, the tied matrix stored once
        keys = list(f.keys())
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in keys)
    assert ("tok_emb.weight" in keys) != ("lm_head.weight" in keys)
    state = load_trainer_state(path)  # torch.load(weights_only=True) inside
    assert state["loader"]["cursor"] == 5
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_saving_again_replaces_atomically_and_leaves_no_temporaries(tmp_path: Path) -> None:
    make(tmp_path, step=3)
    make(tmp_path, step=4)
    model_dir = tmp_path / "models" / "m"
    assert sorted(p.name for p in model_dir.iterdir()) == ["latest"]
    assert read_meta(model_dir / "latest")["step"] == 4


def test_crash_between_renames_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    _, _, path = make(tmp_path, step=3)
    aside = path.with_name(".latest.old")
    os.replace(path, aside)  # as if the process died after moving the old checkpoint aside
    (path.parent / ".latest.tmp-123").mkdir()  # and a half-written new one
    assert resolve_checkpoint(path.parent) == aside
    recover_interrupted_save(path)
    assert read_meta(path)["step"] == 3 and not aside.exists()
    assert not (path.parent / ".latest.tmp-123").exists()


def test_resolve_errors(tmp_path: Path) -> None:
    with pytest.raises(TalmError, match="not found"):
        resolve_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TalmError, match="holds no checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
    _, _, path = make(tmp_path)
    with pytest.raises(TalmError, match="no best checkpoint"):
        resolve_checkpoint(path.parent, "best")
    assert resolve_checkpoint(path.parent, str(path)) == path
    assert resolve_checkpoint(path) == path  # a checkpoint directory itself
    with pytest.raises(TalmError, match="not a checkpoint directory"):
        resolve_checkpoint(path.parent, str(tmp_path / "empty"))


def test_foreign_or_damaged_checkpoints_are_refused(tmp_path: Path) -> None:
    _, _, path = make(tmp_path)
    meta = json.loads((path / "checkpoint.json").read_text())
    (path / "checkpoint.json").write_text(json.dumps({**meta, "format": "other/9"}))
    with pytest.raises(TalmError, match="format"):
        load_model(path)
    meta["config"]["model"]["n_layer"] = 3
    (path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(TalmError, match="another architecture"):
        load_model(path)


def test_every_file_of_a_checkpoint_gets_the_same_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        _, _, path = make(tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()}
    assert modes == {"checkpoint.json": 0o644, "model.safetensors": 0o644, "trainer_state.pt": 0o644}


@pytest.mark.parametrize("fails", ["weights", "trainer state", "rename"])
def test_a_failed_save_keeps_the_previous_checkpoint_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    import errno

    import talm.files
    import talm.train.checkpoint

    _, _, path = make(tmp_path, step=3)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    failed = []

    def disk_full(*args, **kwargs):
        if fails == "rename" and (failed or ".tmp-" not in str(args[0])):
            return real_replace(*args, **kwargs)  # moving the old one aside works, renaming the new one fails
        failed.append(args)
        raise OSError(errno.ENOSPC, "No space left on device")

    real_replace = os.replace
    if fails == "weights":
        monkeypatch.setattr(talm.train.checkpoint, "save_safetensors_from", disk_full)
    elif fails == "trainer state":
        monkeypatch.setattr(talm.train.checkpoint.torch, "save", disk_full)
    else:
        monkeypatch.setattr(talm.files.os, "replace", disk_full)
    with pytest.raises(TalmError) as info:
        make(tmp_path, step=4)
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        f"could not save checkpoint {str(path)!r} (OSError: [Errno 28]"
    )
    assert "the previous checkpoint is kept" in message
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest"]  # no .latest.tmp-PID/, no .latest.old/


def test_damaged_meta_is_one_line_naming_the_file(tmp_path: Path) -> None:
    _, _, path = make(tmp_path)
    for text in ("[1, 2]", '{"format": "talm.checkpoint/1"}', "\xff\xfe garbage"):
        (path / "checkpoint.json").write_text(text, encoding="latin-1")
        with pytest.raises(
            TalmError, match=r"cannot load '.*checkpoint\.json' \(.*\): the checkpoint is damaged"
        ):
            read_meta(path)
