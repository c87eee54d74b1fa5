"""--optim.name muon: torch's Muon for the hidden matrices and AdamW for the rest, stepped as one optimizer that
the trainer, GradScaler, clipping and checkpoints use unchanged; a Muon run resumes bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_ddp import ARGS, curve
from test_resume import stop_after

import talm.train.loop as trainer_module  # the module whose loop looks up StopRequest
import talm.train.optim as optim_module
from talm.config import validate
from talm.errors import TalmError
from talm.model.config import ModelConfig
from talm.model.gpt import GPT
from talm.train.checkpoint import load_trainer_state, read_meta
from talm.train.config import OptimConfig, RunConfig
from talm.train.loop import Trainer
from talm.train.metrics import read_metrics
from talm.train.optim import (
    Muon,
    MuonAdamW,
    apply_schedule,
    build_optimizer,
    fast_bf16,
    is_muon,
    muon_momentum,
    orthogonalize,
)
from talm.train.run import resolve_run, train

CPU = torch.device("cpu")


def gpt(tie: bool) -> GPT:
    return GPT(
        ModelConfig(vocab_size=100, n_layer=2, n_head=2, d_model=32, context_length=16, tie_embeddings=tie)
    )


@pytest.mark.parametrize("tie", [True, False])
def test_every_parameter_in_exactly_one_group_hidden_matrices_in_muon(tie: bool) -> None:
    model = gpt(tie)
    opt = build_optimizer(model, OptimConfig(name="muon"), CPU)
    assert isinstance(opt.optimizers["muon"], torch.optim.Muon)
    listed = [p for g in opt.param_groups for p in g["params"]]
    assert sorted(map(id, listed)) == sorted(id(p) for p in model.parameters())  # each once, none left out
    muon = {id(p) for g in opt.param_groups if is_muon(g) for p in g["params"]}
    hidden = {
        id(p) for name, p in model.named_parameters() if name.startswith("blocks.") and name.endswith(".weight")
        and p.dim() == 2
    }  # fmt: skip
    assert muon == hidden and len(muon) == 4 * 2  # qkv, proj, gate_up, down per block
    adamw = {id(p) for g in opt.optimizers["adamw"].param_groups for p in g["params"]}
    assert {id(model.tok_emb.weight), id(model.lm_head.weight), id(model.norm.weight)} <= adamw


def test_groups_keep_their_peak_ratio_and_muon_momentum_warms_up() -> None:
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.05, muon_momentum=0.95, muon_momentum_warmup=300)
    opt = build_optimizer(gpt(True), cfg, CPU)
    for step, mult in ((0, 0.01), (150, 1.0), (400, 0.3)):
        apply_schedule(opt, cfg, step, mult)
        muon = [g for g in opt.param_groups if is_muon(g)]
        adamw = [g for g in opt.param_groups if not is_muon(g)]
        assert all(g["lr"] == pytest.approx(0.05 * mult) for g in muon)
        assert all(g["lr"] == pytest.approx(1e-3 * mult) for g in adamw)
        assert all(g["momentum"] == muon_momentum(cfg, step) for g in muon)
    assert [muon_momentum(cfg, s) for s in (0, 150, 300, 1000)] == pytest.approx([0.85, 0.9, 0.95, 0.95])
    assert muon_momentum(cfg.model_copy(update={"muon_momentum_warmup": 0}), 0) == 0.95


def test_grad_scaler_unscales_and_skips_through_the_pair() -> None:
    torch.manual_seed(0)
    model = gpt(False)
    opt = build_optimizer(model, OptimConfig(name="muon"), CPU)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randint(0, 100, (2, 16))
    _, loss = model(x, x)
    scaler.scale(loss).backward()
    scaled = model.blocks[0].attn.qkv.weight.grad.clone()
    scaler.unscale_(opt)  # reaches Muon's and AdamW's gradients
    assert torch.allclose(model.blocks[0].attn.qkv.weight.grad * 1024, scaled)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    opt.zero_grad(set_to_none=True)
    _, loss = model(x, x)
    scaler.scale(loss * float("inf")).backward()  # an overflow: both optimizers skip the step
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_float32_newton_schulz_is_torchs_muon_computed_more_precisely(shape: tuple[int, int]) -> None:
    """Where bf16 is emulated, talm's Muon runs Newton-Schulz in float32: the update torch's (bf16) Muon makes,
    to bf16's precision, with the same state; in bfloat16 it is torch's exactly."""
    torch.manual_seed(0)
    kw = {"lr": 0.02, "weight_decay": 0.01, "momentum": 0.9, "nesterov": True, "adjust_lr_fn": "original"}
    start = torch.randn(shape)
    params = {name: torch.nn.Parameter(start.clone()) for name in ("torch", "bf16", "fp32")}
    opts = {
        "torch": torch.optim.Muon([params["torch"]], **kw),
        "bf16": Muon([params["bf16"]], ns_dtype=torch.bfloat16, **kw),
        "fp32": Muon([params["fp32"]], ns_dtype=torch.float32, **kw),
    }
    for _ in range(3):
        grad = torch.randn(shape)
        for name, opt in opts.items():
            params[name].grad = grad.clone()
            opt.step()
    assert torch.equal(params["bf16"], params["torch"])
    moved_torch, moved_fp32 = params["torch"] - start, params["fp32"] - start
    assert not torch.equal(moved_fp32, moved_torch)  # really computed in another precision
    assert torch.allclose(moved_fp32, moved_torch, rtol=0, atol=0.02 * moved_torch.abs().max().item())
    assert opts["fp32"].state_dict()["state"][0].keys() == opts["torch"].state_dict()["state"][0].keys()


def layer(data: Path, **optim: Any) -> dict[str, Any]:
    return {
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "context_length": 32, "dropout": 0.1},
        "optim": {"name": "muon", "lr": 3e-3, "warmup_steps": 3, "muon_momentum_warmup": 4} | optim,
        "train": {
            "max_steps": 10,
            "batch_size": 4,
            "tokens_per_step": 256,
            "eval_every": 5,
            "save_every": 100,
        }
        | {"log_every": 1, "eval_tokens": 256, "device": "cpu", "deterministic": True},
        "data": {"dir": str(data)},
    }


def test_muon_run_resumes_bit_for_bit(tiny_data: Path, in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after step 4 and resumed: every later train and val loss, and the final weights, equal to the bit
    those of an uninterrupted run (2 micro-steps per step, clipping on, dropout on)."""
    train(validate(RunConfig, layer(tiny_data)), in_tmp / "whole")
    monkeypatch.setattr(trainer_module, "StopRequest", stop_after(4))
    with pytest.raises(KeyboardInterrupt):
        Trainer(validate(RunConfig, layer(tiny_data)), in_tmp / "cut").run()
    monkeypatch.undo()
    assert read_meta(in_tmp / "cut" / "latest")["step"] == 4
    saved = load_trainer_state(in_tmp / "cut" / "latest")["optimizer"]  # loads with weights_only=True
    kinds = {k for entry in saved["state"].values() for k in entry}  # by parameter name: Muon's and AdamW's
    assert {"momentum_buffer", "exp_avg", "exp_avg_sq"} <= kinds
    cfg, resume_from = resolve_run(in_tmp / "cut", [layer(tiny_data)])
    train(cfg, in_tmp / "cut", resume_from=resume_from)

    def losses(d: Path) -> list[tuple[int, str, float]]:
        return [(r["step"], k, r[k]) for r in read_metrics(d) for k in ("train_loss", "val_loss") if k in r]

    whole, cut = losses(in_tmp / "whole"), losses(in_tmp / "cut")
    assert [x for x in cut if x[0] > 4] == [x for x in whole if x[0] > 4] and len(whole) == 12
    assert whole[-2][2] < whole[0][2]  # and it learns
    a = torch.load(in_tmp / "whole" / "latest" / "trainer_state.pt", weights_only=True)["optimizer"]
    b = torch.load(in_tmp / "cut" / "latest" / "trainer_state.pt", weights_only=True)["optimizer"]
    assert set(a["state"]) == set(b["state"])
    for k, s in a["state"].items():
        assert all(torch.equal(v, b["state"][k][j]) for j, v in s.items() if torch.is_tensor(v))


def test_switching_optimizer_on_resume_is_one_line(tiny_data: Path, in_tmp: Path) -> None:
    train(
        validate(
            RunConfig,
            layer(tiny_data, name="adamw") | {"train": layer(tiny_data)["train"] | {"max_steps": 2}},
        ),
        in_tmp / "m",
    )
    cfg, resume_from = resolve_run(in_tmp / "m", [{"optim": {"name": "muon"}, "train": {"max_steps": 3}}])
    with pytest.raises(
        TalmError, match=r"with optim.name adamw -> muon .*: keep --optim.name adamw, or pass"
    ):
        Trainer(cfg, in_tmp / "m", resume_from=resume_from)  # resume.py's decision, before the model is built
    assert isinstance(build_optimizer(gpt(True), OptimConfig(name="muon"), CPU), MuonAdamW)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_embedding_lr_is_the_untied_embeddings_own_rate(name: str) -> None:
    torch.manual_seed(0)
    model = gpt(False)
    cfg = OptimConfig(name=name, lr=1e-3, embedding_lr=0.1)
    opt = build_optimizer(model, cfg, CPU)
    listed = [p for g in opt.param_groups for p in g["params"]]
    assert sorted(map(id, listed)) == sorted(id(p) for p in model.parameters())  # each once, none left out
    (embedding,) = [g for g in opt.param_groups if g.get("embedding")]
    assert len(embedding["params"]) == 1 and embedding["params"][0] is model.tok_emb.weight
    apply_schedule(opt, cfg, 10, 0.5)
    assert embedding["lr"] == pytest.approx(0.05)
    rest = [g for g in opt.param_groups if not is_muon(g) and not g.get("embedding")]
    assert all(g["lr"] == pytest.approx(5e-4) for g in rest)
    assert any(p is model.lm_head.weight for g in rest for p in g["params"])
    # Adam's first step moves each touched element by about its lr: 0.05 for the embedding, 5e-4 for the head.
    emb, head = model.tok_emb.weight.detach().clone(), model.lm_head.weight.detach().clone()
    _, loss = model(torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16)))
    loss.backward()
    opt.step()
    assert (model.tok_emb.weight - emb).abs().max().item() == pytest.approx(0.05, rel=0.05)
    assert (model.lm_head.weight - head).abs().max().item() == pytest.approx(5e-4, rel=0.05)


def test_embedding_lr_with_a_tied_head_is_refused() -> None:
    with pytest.raises(
        TalmError, match=r"untied output head: pass --no-model.tie_embeddings, or --optim.embedding_lr none"
    ):
        build_optimizer(gpt(True), OptimConfig(name="muon", embedding_lr=0.1), CPU)


def test_setting_embedding_lr_on_resume_is_one_line(tiny_data: Path, in_tmp: Path) -> None:
    untied = layer(tiny_data)
    untied["model"]["tie_embeddings"] = False
    train(validate(RunConfig, untied | {"train": untied["train"] | {"max_steps": 2}}), in_tmp / "m")
    cfg, resume_from = resolve_run(
        in_tmp / "m", [{"optim": {"embedding_lr": 0.1}, "train": {"max_steps": 3}}]
    )
    with pytest.raises(TalmError, match=r"trained without --optim.embedding_lr.*resume without it, or pass"):
        Trainer(cfg, in_tmp / "m", resume_from=resume_from)


@pytest.mark.slow
def test_muon_under_two_process_ddp_matches_one_process(tiny_data: Path, in_tmp: Path) -> None:
    """Muon's processes split the orthogonalisation of the all-reduced gradient (each its share, then an
    all_gather): 2 processes (gloo) train like 1 process accumulating 2 micro-batches, up to float rounding
    (Newton-Schulz runs in bfloat16, so a last-bit difference in a gradient can round differently: a looser
    tolerance than AdamW's test_ddp)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-d", str(tiny_data), *ARGS, "--optim.name", "muon"]
    single = subprocess.run(
        [sys.executable, "-m", "talm.cli.train_model", *args, "-n", "one"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    ddp = subprocess.run(
        [*torchrun, "-m", "talm.cli.train_model", *args, "-n", "two"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ddp.returncode == 0 and "2 process(es)" in ddp.stderr, ddp.stderr
    (train_1, val_1), (train_2, val_2) = curve("models/one"), curve("models/two")
    assert len(train_1) == len(train_2) == 8
    assert train_2 == pytest.approx(train_1, rel=1e-3) and val_2 == pytest.approx(val_1, rel=1e-3)
    assert train_1[-1] < train_1[0]


@pytest.mark.parametrize("kv_heads", [None, 1])  # q, k, v of equal rows, and grouped-query's smaller k, v
def test_muon_orthogonalises_each_projection_of_a_fused_weight_alone(kv_heads: int | None) -> None:
    """Per projection (the default), a step of qkv is each of q, k, v orthogonalised as a matrix of its own at
    its own shape's lr scale, and gate_up's halves likewise; fused, the whole weight as one matrix."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=100, n_layer=1, n_head=4, n_kv_head=kv_heads, d_model=32, context_length=16
    )
    steps = {}
    for per_projection in (True, False):
        model = GPT(config)
        torch.manual_seed(1)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        cfg = OptimConfig(name="muon", muon_momentum=0.0, muon_per_projection=per_projection)
        build_optimizer(model, cfg, CPU).step()
        steps[per_projection] = {n: before[n] - p.detach() for n, p in model.named_parameters()}
        grads = {n: p.grad for n, p in model.named_parameters()}
    ns_dtype = torch.bfloat16 if fast_bf16(CPU) else torch.float32  # as build_optimizer chooses
    muon = {"lr": cfg.muon_lr, "eps": 1e-7, "ns_steps": 5, "ns_coefficients": (3.4445, -4.775, 2.0315)}

    def step_of(matrix: torch.Tensor) -> torch.Tensor:
        return (
            cfg.muon_lr
            * orthogonalize(matrix[None], muon, ns_dtype)[0].float()
            * max(1, matrix.size(0) / matrix.size(1)) ** 0.5
        )

    rows = GPT(config).fused_row_blocks()
    assert sorted(rows) == ["blocks.0.attn.qkv.weight", "blocks.0.mlp.gate_up.weight"]
    for name, sizes in rows.items():
        alone = torch.cat([step_of(block) for block in grads[name].split(sizes)])
        torch.testing.assert_close(steps[True][name], alone, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(steps[False][name], step_of(grads[name]), rtol=1e-4, atol=1e-6)
        assert not torch.allclose(steps[True][name], steps[False][name], atol=1e-4)
    q, k, v = steps[True]["blocks.0.attn.qkv.weight"].split(rows["blocks.0.attn.qkv.weight"])
    rms = [b.pow(2).mean().sqrt().item() for b in (q, k, v)]
    assert max(rms) / min(rms) < 1.5  # each projection moves by its own orthogonal step


@pytest.mark.parametrize(("per_projection", "kv_heads"), [(True, None), (True, 1), (False, None)])
def test_same_shape_matrices_are_one_batched_newton_schulz(
    per_projection: bool, kv_heads: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One step of a 3-layer GPT's Muon runs one Newton-Schulz per shape (q, k, v and proj of every block
    together, ...), not one per matrix; each matrix's update is the one it gets orthogonalised alone, to the
    bit (a batched matmul computes each matrix as the single one does: what lets processes split a stack)."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=100, n_layer=3, n_head=4, n_kv_head=kv_heads, d_model=32, context_length=16
    )
    model = GPT(config)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    stacks: list[torch.Size] = []
    # (a matrix's update from its stack, its update orthogonalised alone)
    alone: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(x: torch.Tensor, group: dict, dtype: torch.dtype) -> torch.Tensor:
        stacks.append(x.shape)
        out = orthogonalize(x, group, dtype)
        alone.extend((o, orthogonalize(m[None], group, dtype)[0]) for m, o in zip(x, out, strict=True))
        return out

    monkeypatch.setattr(optim_module, "orthogonalize", spy)
    build_optimizer(model, OptimConfig(name="muon", muon_per_projection=per_projection), CPU).step()
    kv = 32 if kv_heads is None else 8  # rows of k and v: kv_heads * head_dim
    if per_projection:  # q and proj (32 x 32; k, v too without GQA), gate and up (128 x 32), down (32 x 128)
        gqa = [] if kv == 32 else [(6, kv, 32)]  # k and v: a shape of their own
        want = [(12 if kv == 32 else 6, 32, 32), (6, 128, 32), (3, 32, 128), *gqa]
    else:  # qkv (96 or 48 x 32), proj, gate_up (256 x 32), down
        want = [(3, 32 + 2 * kv, 32), (3, 32, 32), (3, 256, 32), (3, 32, 128)]
    assert sorted(map(tuple, stacks)) == sorted(want)
    assert len(alone) == sum(count for count, _, _ in want)
    assert all(torch.equal(stacked, single) for stacked, single in alone)
