"""parallel.py in one process: which strategy `auto` picks, activation checkpointing's equality, --init-from
into a model built sharded, and FSDP's sharded checkpoints (atomic saves; loading executes no code), on an FSDP
world of one."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import BASE_TOKENIZER
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from talm.errors import TalmError
from talm.model.config import ModelConfig
from talm.model.gpt import GPT
from talm.tokenizer.api import Tokenizer
from talm.train import dist, init, parallel, state
from talm.train.checkpoint import SHARDS, load_model, load_shards, load_trainer_state
from talm.train.config import TrainConfig
from talm.train.dist import DistContext
from talm.train.metrics import read_metrics
from talm.train.precision import Precision
from talm.train.run import train_model


def ctx(world_size: int) -> DistContext:
    return DistContext(0, 0, world_size, torch.device("cpu"))


def test_auto_picks_none_on_one_process_ddp_when_it_fits_else_fsdp(monkeypatch: pytest.MonkeyPatch) -> None:
    model = GPT(ModelConfig(vocab_size=256, context_length=16, n_layer=1, n_head=2, d_model=32))
    need = model.num_params() * parallel.BYTES_PER_PARAM
    assert parallel.choose("auto", model, ctx(1))[0] == "single"
    assert "neither DDP nor FSDP" in parallel.choose("auto", model, ctx(1))[1]
    monkeypatch.setattr(parallel, "device_memory", lambda device: 2 * need)  # exactly half: fits
    assert parallel.choose("auto", model, ctx(2))[0] == "ddp"
    monkeypatch.setattr(parallel, "device_memory", lambda device: 2 * need - 1)
    strategy, why = parallel.choose("auto", model, ctx(2))
    assert strategy == "fsdp" and "exceed half" in why
    assert parallel.choose("ddp", model, ctx(1))[0] == "ddp"  # as asked, even on one process


def test_activation_checkpointing_gives_the_same_loss_and_gradients() -> None:
    cfg = ModelConfig(vocab_size=256, context_length=16, n_layer=2, n_head=2, d_model=32, dropout=0.1)
    idx = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg)
        if checkpointed:
            parallel.checkpoint_blocks(model)
        torch.manual_seed(1)  # the same dropout masks, which the recomputation must replay
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, model))
    (loss_a, grads_a, plain), (loss_b, grads_b, checkpointed_model) = results
    assert torch.equal(loss_a, loss_b)
    for name, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[name], rtol=0, atol=1e-7), name
    assert plain.state_dict().keys() == checkpointed_model.state_dict().keys()  # checkpoints are unchanged
    # honest: the checkpointed forward really recomputes (a forward hook of a block fires twice per step)
    calls = []
    checkpointed_model.blocks[0].attn.register_forward_hook(lambda *a: calls.append(1))
    _, loss = checkpointed_model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert len(calls) == 2


def test_init_from_fills_a_model_built_sharded(tiny_model_dir: Path) -> None:
    """Under FSDP the model is built sharded (on the meta device first), so --init-from's weights go in after the
    sharding (rank 0 reads them, each process keeps its rows): they arrive whole; a source that does not fit the
    model is refused in one line."""
    source, _ = load_model(tiny_model_dir / "latest")
    tokenizer = Tokenizer.from_file(BASE_TOKENIZER)
    fsdp = TrainConfig(device="cpu", parallel="fsdp")
    context = dist.setup("cpu", group=True)
    try:
        model = parallel.Parallel(fsdp, source.config, context, Precision("float32", context.device)).build()
        assert isinstance(model.tok_emb.weight, parallel.DTensor)
        init.initialize(model, str(tiny_model_dir), tokenizer, "data/x")
        whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        assert whole.keys() == source.state_dict().keys()
        for name, tensor in source.state_dict().items():
            assert torch.equal(whole[name], tensor), name
        shallower = source.config.model_copy(update={"n_layer": 1})
        model = parallel.Parallel(fsdp, shallower, context, Precision("float32", context.device)).build()
        with pytest.raises(
            TalmError, match=r"do not fit its config \(unexpected blocks\.1\.attn\.proj\.weight"
        ):
            init.initialize(model, str(tiny_model_dir), tokenizer, "data/x")
    finally:
        dist.teardown()


def tiny(**train: object) -> dict:
    return {
        "model": {"context_length": 32, "n_layer": 1, "d_model": 32, "n_head": 2},
        "optim": {"name": "muon", "warmup_steps": 1},
        "train": {"device": "cpu", "parallel": "fsdp", "batch_size": 4, "max_steps": 3, "log_every": 1}
        | {"eval_every": 100, "save_every": 1, "eval_tokens": 256}
        | train,
    }


def test_a_failed_sharded_save_keeps_the_previous_checkpoint(
    tiny_data: Path, in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save, calls = state.save_shards, []

    def full_disk_at_step_2(path: Path, content: dict) -> None:
        calls.append(path)
        real_save(path, content)  # the shards are written into the staging directory...
        if len(calls) == 2:
            raise OSError(28, "No space left on device")  # ...and then the disk fills

    monkeypatch.setattr(state, "save_shards", full_disk_at_step_2)
    with pytest.raises(TalmError, match="could not save checkpoint .*the previous checkpoint is kept"):
        train_model("m", tiny_data, overrides=tiny())
    latest = Path("models/m/latest")
    assert sorted(p.name for p in Path("models/m").iterdir() if p.name.startswith(".")) == [".talm.lock"]
    assert calls[1].parent.name.startswith(".latest.tmp-")  # it was staged beside latest/, then removed
    assert load_model(latest)[1]["step"] == 1 and load_trainer_state(latest)["step"] == 1
    assert (latest / SHARDS / ".metadata").is_file()
    # and the run resumes from it, on a world of one without FSDP too
    monkeypatch.setattr(state, "save_shards", real_save)
    train_model("m", tiny_data, overrides=tiny(parallel="auto"))
    assert [r["step"] for r in read_metrics("models/m") if "train_loss" in r] == [1, 2, 3]


class Boom:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch pwned",))


def test_loading_sharded_checkpoints_runs_no_code(tiny_data: Path, in_tmp: Path) -> None:
    train_model("m", tiny_data, overrides=tiny(max_steps=1))
    shards = Path("models/m/latest") / SHARDS
    model_state = {k: torch.zeros_like(v) for k, v in load_model("models/m/latest")[0].state_dict().items()}
    wanted = {"model": model_state}
    load_shards(shards, wanted)  # the real metadata passes the restricted unpickler
    assert any(v.abs().sum() > 0 for v in wanted["model"].values())
    (shards / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(TalmError, match=r"cannot load .*sharded.*refusing to load posix.system"):
        load_shards(shards, {"model": model_state})
    assert not Path("pwned").exists()


def _global_call(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle that calls module.name(arg) (pickle resolves a dotted name attribute by attribute)."""

    def text(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()  # SHORT_BINUNICODE

    return (
        b"\x80\x04" + text(module) + text(name) + b"\x93" + text(arg) + b"\x85R."
    )  # STACK_GLOBAL TUPLE1 REDUCE


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("torch.distributed.checkpoint.metadata", "os.system"),  # the module imports os
        ("torch.distributed.checkpoint.metadata", "torch.load"),
        ("torch", "os.system"),
        ("pathlib", "os.system"),
        ("torch.distributed.checkpoint.metadata", "dataclass"),  # in the module, not a metadata class
    ],
)
def test_dotted_or_unlisted_names_in_sharded_metadata_run_no_code(
    tiny_data: Path, in_tmp: Path, module: str, name: str
) -> None:
    train_model("m", tiny_data, overrides=tiny(max_steps=1))
    shards = Path("models/m/latest") / SHARDS
    model_state = {k: torch.zeros_like(v) for k, v in load_model("models/m/latest")[0].state_dict().items()}
    payload = _global_call(module, name, "touch pwned")
    if name == "os.system":  # the payload is a real exploit: plain pickle runs it
        assert pickle.loads(_global_call(module, name, "true")) == 0
    (shards / ".metadata").write_bytes(payload)
    with pytest.raises(TalmError, match=rf"cannot load .*sharded.*refusing to load {module}.{name}"):
        load_shards(shards, {"model": model_state})
    assert not Path("pwned").exists()
