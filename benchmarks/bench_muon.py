"""Muon's optimizer step under DDP and FSDP (gloo, CPU): one talm against another, interleaved.

Times `Muon.step` alone (the momentum, the Newton-Schulz iterations and their collectives; forward, backward and
AdamW are the same either way) on the hidden matrices of a preset's model, with random gradients, on N processes
launched by torchrun (one thread each). Each `--src` is a talm source tree put first on PYTHONPATH, so the same
script times two versions of optim.py:

    python benchmarks/bench_muon.py --src before=/path/to/main/src --src after=src --presets tiny,small
    python benchmarks/bench_muon.py --src after=src --nproc 1 --layout per-projection,fused

Prints, per preset and parallel mode, each version's median step time of every round and the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(preset: str, parallel: str, steps: int, layout: str) -> None:
    """One process of a launch: build the preset's model (sharded under fsdp), its Muon (per projection or
    fused), and time its steps."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from talm.model.config import ModelConfig
    from talm.model.gpt import GPT
    from talm.train.config import PRESETS, OptimConfig
    from talm.train.optim import build_optimizer

    torch.distributed.init_process_group("gloo")
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=512, **PRESETS[preset]["model"]))
    if parallel == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    cfg = OptimConfig(**PRESETS[preset]["optim"], muon_per_projection=layout == "per-projection")
    optim = build_optimizer(model, cfg, torch.device("cpu"))
    muon = optim.optimizers["muon"]
    params = [p for group in muon.param_groups for p in group["params"]]
    times = []
    for step in range(steps + 3):  # 3 warm-up steps
        gen = torch.Generator().manual_seed(step)  # the same gradient on every process: DDP's all-reduced one
        for p in params:
            grad = torch.randn(p.shape, generator=gen)
            p.grad = distribute_tensor(grad, p.device_mesh, p.placements) if parallel == "fsdp" else grad
        torch.distributed.barrier()
        start = time.perf_counter()
        muon.step()
        torch.distributed.barrier()
        times.append(time.perf_counter() - start)
    if rank == 0:
        print(json.dumps({"median_s": statistics.median(times[3:])}))
    torch.distributed.destroy_process_group()


def launch(src: str, preset: str, parallel: str, steps: int, nproc: int, layout: str) -> float:
    """The median Muon step time of one torchrun launch of this script's worker with `src` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += [__file__, "--worker", preset, parallel, str(steps), layout]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["median_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", action="append", default=[], help="NAME=PATH of a talm src tree (repeat)")
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--parallel", default="ddp,fsdp")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--steps", type=int, default=10, help="timed steps per launch (after 3 warm-up steps)"
    )
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--layout", default="per-projection", help="per-projection, fused, or both (comma)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], args.worker[1], int(args.worker[2]), args.worker[3])
    versions = [(f"{name} {layout}", src, layout) for name, src in (s.split("=", 1) for s in args.src)
                for layout in args.layout.split(",")]  # fmt: skip
    for preset in args.presets.split(","):
        for parallel in args.parallel.split(","):
            times: dict[str, list[float]] = {name: [] for name, _, _ in versions}
            for _ in range(args.rounds):
                for name, src, layout in versions:  # interleaved: the machine's load hits every version alike
                    times[name].append(launch(src, preset, parallel, args.steps, args.nproc, layout))
            for name, ts in times.items():
                rounds = " ".join(f"{t * 1e3:.1f}" for t in ts)
                how = f"{parallel} x{args.nproc}" if args.nproc > 1 else "one process"
                print(f"{preset} {how} {name}: median {statistics.median(ts) * 1e3:.1f} ms ({rounds})")
    return None


if __name__ == "__main__":
    main()
