"""Runs train_model's Python entry point once per job, under torchrun: `torchrun ... dist_worker.py JOBS.json`.

JOBS.json is a list of {"name": model name, "data": data dir, "flags": {"train": {...}, ...}} (with
"eot_on_rank1": EOT_ID, rank 1's sampling always picks that token), or of
{"check": a function of this file, "out": a directory}: the check writes what each rank saw to
out/CHECK-RANK.json for the test to assert on. One launch runs several tiny runs (DDP and FSDP, AdamW and Muon)
and checks so that a test pays for starting torch and the processes once. The runs share one process group:
each train_model would tear it down at its end, and a group created again in the same processes may meet the
previous group's addresses in torchrun's store (gloo then fails to connect).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

from talm.model.config import ModelConfig
from talm.model.gpt import GPT
from talm.train import dist, optim
from talm.train.config import OptimConfig, TrainConfig
from talm.train.parallel import Parallel
from talm.train.precision import Precision
from talm.train.run import train_model

CPU = torch.device("cpu")


def whole_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model, on every rank."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The names whose tensors differ in any bit (or are missing from one side)."""
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))


def meta_init(ctx: dist.DistContext) -> dict[str, Any]:
    """FSDP's model (built on the meta device, sharded, then initialised) against GPT(config), the same seed: its
    gathered weights, RoPE tables and the RNG state after, for the llama family and GPT-2's (biases, position
    embedding, untied output layer)."""
    result: dict[str, Any] = {}
    for family in ("llama", "gpt2"):
        kw = {"arch": "gpt2", "mlp": "gelu", "tie_embeddings": False} if family == "gpt2" else {}
        cfg = ModelConfig(vocab_size=300, context_length=16, n_layer=2, n_head=2, d_model=32, **kw)
        torch.manual_seed(7)
        plain, plain_next = GPT(cfg), torch.rand(4)
        parallel = Parallel(TrainConfig(device="cpu", parallel="fsdp"), cfg, ctx, Precision("float32", CPU))
        torch.manual_seed(7)
        sharded = parallel.build()
        result[family] = {
            "differ": same(whole_state(sharded), plain.state_dict()),
            "rng_after_same": torch.equal(torch.rand(4), plain_next),
            "rope_same": torch.equal(sharded.rope_cos, plain.rope_cos)
            and torch.equal(sharded.rope_sin, plain.rope_sin),
            "local_rows": sharded.tok_emb.weight.to_local().shape[0],
            "rows": sharded.tok_emb.weight.shape[0],
        }
    return result


def muon_case(case: str, mode: str, mesh: Any) -> tuple[torch.nn.Module, list[torch.Tensor], optim.Muon]:
    """A model of `case` (a GPT fused or per projection, or odd row counts: 5, 1 and 7 rows, uneven shards) and
    its Muon, for `mode`: "plain" (one process's computation, on every rank), "fsdp" (sharded over `mesh`) or
    "ddp" (whole, Muon as build_optimizer makes it under several processes)."""
    torch.manual_seed(3)
    if case.startswith("gpt"):
        model = GPT(ModelConfig(vocab_size=300, context_length=16, n_layer=2, n_head=2, d_model=32))
    else:
        model = torch.nn.Sequential(*(torch.nn.Linear(i, o, bias=False) for i, o in ((6, 5), (5, 1), (1, 7))))
    if mode == "fsdp":
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    params = optim.hidden_matrices(model) if case.startswith("gpt") else list(model.parameters())
    rows = model.fused_row_blocks() if case == "gpt_projections" else {}
    blocks = {p: rows[name] for name, p in model.named_parameters() if name in rows}
    if mode == "ddp" and case.startswith("gpt"):
        cfg = OptimConfig(name="muon", muon_lr=0.05, muon_weight_decay=0.1, muon_momentum=0.9,
                          muon_per_projection=case == "gpt_projections")  # fmt: skip
        muon = optim.build_optimizer(model, cfg, CPU).optimizers["muon"]
        muon.ns_dtype = torch.float32  # as the plain one's, whatever this CPU's bf16
        return model, params, muon
    group = {"process_group": torch.distributed.group.WORLD} if mode == "ddp" else {}
    muon = optim.Muon(params, ns_dtype=torch.float32, row_blocks=blocks, lr=0.05, weight_decay=0.1, momentum=0.9,
                      nesterov=True, adjust_lr_fn=optim.MUON_ADJUST_LR, **group)  # fmt: skip
    return model, params, muon


def muon_split(ctx: dist.DistContext) -> dict[str, Any]:
    """Muon over FSDP's sharded matrices, and Muon as a DDP run builds it, against Muon over the same whole
    matrices on one process, three steps with the same gradients: the weights must be the same bits; and which
    matrices this rank orthogonalised (each as its shape and first element, which tells them apart)."""
    calls: list[tuple[Any, ...]] = []  # the matrices orthogonalised on this rank
    real = optim.orthogonalize

    def counted(x: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.extend((*m.shape, round(m[0, 0].item(), 5)) for m in (x if x.dim() == 3 else x[None]))
        return real(x, *args)

    optim.orthogonalize = counted
    mesh = init_device_mesh("cpu", (ctx.world_size,))
    result: dict[str, Any] = {}
    try:
        for mode in ("fsdp", "ddp"):
            for case in ("gpt", "gpt_projections", "odd"):
                (plain, plain_params, plain_muon) = muon_case(case, "plain", mesh)
                (split, split_params, split_muon) = muon_case(case, mode, mesh)
                before = {k: v.clone() for k, v in plain.state_dict().items()}
                gen = torch.Generator().manual_seed(11)
                split_calls, plain_calls = [], []
                for _ in range(3):
                    for p, q in zip(plain_params, split_params, strict=True):
                        grad = torch.randn(p.shape, generator=gen)
                        p.grad = grad.clone()
                        q.grad = grad.clone() if mode == "ddp" else distribute_tensor(
                            grad, q.device_mesh, q.placements, src_data_rank=None)  # fmt: skip
                    calls.clear()
                    plain_muon.step()
                    plain_calls.append(sorted(calls))
                    calls.clear()
                    split_muon.step()
                    split_calls.append(list(calls))
                state = whole_state(split) if mode == "fsdp" else split.state_dict()
                result[f"{mode}-{case}"] = {
                    "differ": same(state, plain.state_dict()),
                    "moved": same(plain.state_dict(), before),
                    "matrices": len(plain_params),
                    "orthogonalised": split_calls,  # per step, the matrices this rank orthogonalised
                    "all": plain_calls,  # per step, the matrices one process orthogonalises
                }
    finally:
        optim.orthogonalize = real
    return result


def always_eot(eot_id: int) -> None:
    """This rank's sampling picks <|endoftext|> every time: its generation would end at once, the other rank's
    go on (how ranks whose sampling differs behave)."""
    import talm.model.engine

    real = talm.model.engine.Engine._pick
    talm.model.engine.Engine._pick = lambda self, seq, logits: [real(self, seq, logits), eot_id][1]


def main(jobs_file: str) -> None:
    teardown, dist.teardown = dist.teardown, lambda: None
    try:
        for job in json.loads(open(jobs_file, encoding="utf-8").read()):
            if "check" in job:
                ctx = dist.setup("cpu", group=True)
                result = globals()[job["check"]](ctx)
                out = Path(job["out"]) / f"{job['check']}-{ctx.rank}.json"
                out.write_text(json.dumps(result), encoding="utf-8")
            else:
                if "eot_on_rank1" in job and dist.setup("cpu", group=True).rank == 1:
                    always_eot(job["eot_on_rank1"])
                train_model(job["name"], job["data"], overrides=job["flags"])
    finally:
        teardown()


if __name__ == "__main__":
    main(sys.argv[1])
