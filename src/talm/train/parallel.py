"""How a run's model is spread over processes: one process, DDP or FSDP2; compiled or not; with activation
checkpointing or not. The model file knows none of this.

`--train.parallel` picks the wrapper: `ddp` keeps a whole copy of the model and its optimizer state on every
process and averages the gradients; `fsdp` (PyTorch's FSDP2, `fully_shard` per block, then the root) keeps
1/N of each on each of N processes and gathers a block's weights just for its forward and backward; `auto`
takes DDP when the model, its gradients and the optimizer state fit comfortably (half) in one device's memory,
else FSDP. On one process `auto` uses neither (nothing to average or shard); an explicit `ddp` or `fsdp` on one
process still wraps (a world of one), which is what a single-GPU comparison of the two measures.

`Parallel` is the one small API the loop uses: building it chooses the strategy, `build` makes the model for it
(before the optimizer is built over its parameters), `wrap` (compile and DDP, after the checkpoint is restored),
`micro_step` (no gradient sync before the last micro-step of an accumulation) and `grad_norm` (the global norm
of gradients that may be sharded).

Under FSDP no process ever holds the whole model: it is built on the meta device (shapes only, no memory),
sharded, and only then given memory on the device (each process its shards) and initialised, each parameter
drawn whole on the CPU, one at a time, as `GPT()` draws it, and cut to this process's rows. So the weights are
exactly those of `GPT(config)` after the same seed (tested), on any number of processes. The price is CPU time:
the RNG is run over the whole model twice (GPT() draws its submodules' default inits before its own), as GPT()
does on every process without FSDP.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from talm.errors import TalmError
from talm.model.config import ModelConfig
from talm.model.gpt import GPT
from talm.train import dist
from talm.train.config import TrainConfig
from talm.train.precision import Precision

# What one parameter costs in memory during training, in bytes: float32 weight and gradient (4 + 4) and the
# optimizer's state (AdamW: two float32 moments, 8; Muon: one momentum, 4, so AdamW's is the upper bound).
BYTES_PER_PARAM = 16
# "Fits comfortably": the weights, gradients and optimizer state take at most this share of a device's memory;
# the rest is for activations, which grow with batch size and context length.
COMFORTABLE_SHARE = 0.5


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory one process may count on: the GPU's, or this machine's RAM shared by its processes."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return ram // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def choose(requested: str, model: torch.nn.Module, ctx: dist.DistContext) -> tuple[str, str]:
    """("single" | "ddp" | "fsdp", the banner's words for why)."""
    if requested != "auto":
        return requested, f"{requested} (as asked, {ctx.world_size} process(es))"
    if not ctx.distributed:
        return "single", "none (one process: neither DDP nor FSDP is needed)"
    need = sum(p.numel() for p in model.parameters()) * BYTES_PER_PARAM
    have = device_memory(ctx.device)
    gb = lambda n: f"{n / 2**30:.1f} GB"  # noqa: E731
    if have is None or need <= COMFORTABLE_SHARE * have:
        of = f" of {gb(have)}" if have else ""
        return "ddp", f"ddp (auto: weights, gradients and optimizer state ~{gb(need)}{of} per device fit)"
    return (
        "fsdp",
        f"fsdp (auto: weights, gradients and optimizer state ~{gb(need)} exceed half of {gb(have)})",
    )


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing per block: each block's forward keeps only its input and recomputes the rest
    in the backward pass. The block's own forward is replaced (not the module), so parameter names, and so
    checkpoints, are unchanged; dropout masks are replayed (torch saves and restores the RNG state)."""
    for block in model.get_submodule("blocks"):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def replay_default_inits(model: torch.nn.Module) -> None:
    """Draw from the RNG what building `model` off the meta device would have drawn: each submodule's own default
    init (nn.Linear's, nn.Embedding's), in the order GPT() builds them, on a CPU twin of one submodule at a time.
    GPT.reset_parameters overwrites those values, but they move the RNG, and so the weights it draws next."""
    for module in model.modules():
        if (
            module is not model
            and hasattr(module, "reset_parameters")
            and list(module.parameters(recurse=False))
        ):
            twin = copy.deepcopy(module).to_empty(device="cpu")
            twin.reset_parameters()


@torch.no_grad()
def init_sharded(model: GPT) -> None:
    """Initialise a sharded model that `to_empty` gave memory: each parameter drawn whole on the CPU, in
    `GPT.reset_parameters`' order and way, and this process's rows of it kept; the RoPE tables recomputed. After
    `replay_default_inits`, the RNG draws are GPT()'s, so the weights (and the RNG state after) are those of
    `GPT(config)` built whole."""
    for name, p in model.named_parameters():
        whole = torch.empty(p.shape, dtype=p.dtype)  # on the CPU, where GPT() draws its weights
        model.init_parameter(name, whole)
        if isinstance(p, DTensor):  # this process's rows, sliced locally (every process drew the whole)
            p.copy_(distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None))
        else:
            p.copy_(whole)
    model.init_buffers()


class Parallel:
    """The run's parallel strategy over `ctx`'s processes (see the module docstring)."""

    def __init__(
        self, cfg: TrainConfig, config: ModelConfig, ctx: dist.DistContext, precision: Precision
    ) -> None:
        """Choose the strategy for a GPT of `config` (counted on the meta device: no memory)."""
        self.ctx, self.config, self.precision = ctx, config, precision
        self.checkpointing = cfg.activation_checkpointing
        with torch.device("meta"):
            shapes_only = GPT(config)
        self.strategy, self.description = choose(cfg.parallel, shapes_only, ctx)
        if self.strategy != "single" and not torch.distributed.is_initialized():
            raise TalmError(  # dist.setup joins a group of one for an explicit ddp/fsdp; this is a bug guard
                f"--train.parallel {self.strategy} needs a process group: run under torchrun"
            )
        if self.sharded and precision.dtype == torch.float16:
            raise TalmError(
                "--train.parallel fsdp with float16 is not supported (its loss scaler is untested on sharded "
                "gradients): use --train.dtype bfloat16, or --train.parallel ddp"
            )

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    def build(self) -> GPT:
        """The run's GPT on the device with its random init (drawn from the RNG as it stands), prepared for the
        strategy: activation checkpointing if asked; under FSDP built on the meta device, sharded, then each
        process's shards given memory and initialised (`init_sharded`), so it never exists whole."""
        if not self.sharded:
            model = GPT(self.config).to(self.ctx.device)
            if self.checkpointing:
                checkpoint_blocks(model)
            return model
        with torch.device("meta"):
            model = GPT(self.config)
        replay_default_inits(model)
        if self.checkpointing:
            checkpoint_blocks(model)
        self.shard(model)
        model.to_empty(device=self.ctx.device)
        init_sharded(model)
        return model

    def shard(self, model: torch.nn.Module) -> None:
        """FSDP2 in place: each block, then the root (which holds the embedding, final norm and output layer).
        With bfloat16 on a GPU, FSDP gathers the weights in bfloat16 for compute and reduces gradients in
        float32; the weights it keeps (and the optimizer updates) stay float32."""
        on_gpu_bf16 = self.ctx.device.type == "cuda" and self.precision.dtype == torch.bfloat16
        param_dtype = torch.bfloat16 if on_gpu_bf16 else None
        # The model returns its logits as a view (the vocabulary's padding cut off); FSDP warns that an in-place
        # op on such a view would skip its hooks. Nothing here changes the logits in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(self.ctx.device.type, (torch.distributed.get_world_size(),))
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in model.get_submodule("blocks"):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)

    def wrap(self, model: torch.nn.Module, *, compile: bool) -> torch.nn.Module:
        """What the training steps call: `model`, compiled if asked, in DDP if that is the strategy (evaluation
        and saves use `model` itself)."""
        net = torch.compile(model) if compile else model
        if self.strategy == "ddp":
            device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            net = DDP(net, device_ids=device_ids)
        return net

    @contextmanager
    def micro_step(self, net: torch.nn.Module, model: torch.nn.Module, last: bool) -> Iterator[None]:
        """Around one micro-step's forward and backward: gradients are averaged over processes on the last
        micro-step only (DDP's no_sync; FSDP's gradient sync off, and the gathered weights kept between
        micro-steps so the next forward need not gather them again)."""
        if self.strategy == "ddp" and not last:
            assert isinstance(net, DDP)
            with net.no_sync():
                yield
            return
        if self.sharded:
            assert isinstance(model, FSDPModule)
            model.set_requires_gradient_sync(last)
            model.set_reshard_after_backward(last)
        yield

    def grad_norm(self, model: torch.nn.Module, clip: float) -> torch.Tensor:
        """Clip the global gradient norm to `clip` (inf: measure only) and return it, a plain tensor. Under FSDP
        the gradients are shards (DTensors): torch computes the norm over all of them, across processes."""
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
