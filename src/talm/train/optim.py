"""The optimizer and its learning-rate schedule.

Two optimizers (`--optim.name`): AdamW for every parameter, or Muon for the hidden matrices (the attention and
MLP projections inside the blocks) with AdamW for the rest (embeddings, the output head, the gains), stepped
together behind one object (`MuonAdamW`) that looks like one torch optimizer to the trainer, GradScaler,
clipping and checkpoints. AdamW decays matrices, not the RMSNorm gains.

The schedule (`--optim.schedule`: cosine or warmup-stable-decay) is a multiplier in [0, 1], a pure function of
the step, applied to each parameter group's own peak lr (`lr` for AdamW, `muon_lr` for Muon), so the groups
keep their ratio and the schedule needs no state to resume. The one exception is a re-warm (`talm.train.resume.rewarm_segment`):
a resume whose new settings would raise the lr more than one warmup step does is refused, or with
`--optim.rewarm` warmed up from the lr the run had to the new schedule; that segment is saved with the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from talm.errors import TalmError
from talm.train.config import OptimConfig
from talm.train.precision import cpu_native_bf16
from talm.train.sharded_rows import gather_rows, scatter_rows

# Muon's momentum warms up from this value to --optim.muon_momentum over --optim.muon_momentum_warmup steps,
# as nanochat (scripts/base_train.py, get_muon_momentum: 0.85 -> 0.95 over 300 steps) and the modded-nanogpt
# speedrun (train_gpt.py, the same ramp) do.
MUON_MOMENTUM_START = 0.85
# How torch's Muon scales the lr of a rows x cols matrix. "original" (Keller Jordan's Muon: lr *
# sqrt(max(1, rows/cols))) is the scaling under which nanochat's and modded-nanogpt's Muon lrs (0.02-0.05) were
# tuned, so --optim.muon_lr's default means what it means there. "match_rms_adamw" (Moonshot: lr * 0.2 *
# sqrt(max(rows, cols))) would let Muon reuse AdamW's lr, but no speedrun recipe is tuned for it.
MUON_ADJUST_LR = "original"


# ------------------------------------------------------------------------------------------------- schedules


def lr_at(
    step: int,
    *,
    max_lr: float,
    warmup_steps: int,
    max_steps: int,
    min_lr: float,
    shape: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Linear warmup from max_lr/warmup_steps to max_lr over the first `warmup_steps` steps, then
    - cosine: a half cosine from max_lr down to min_lr at `max_steps`;
    - wsd: max_lr (stable), then a linear decay to min_lr at `max_steps` over the last
      round(decay_fraction * max_steps) steps (if that overlaps the warmup, the lower of the two);
    and min_lr from max_steps on. Never negative (min_lr >= 0), and monotone non-increasing after warmup.
    """
    if not 0 <= min_lr <= max_lr:
        raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if shape == "wsd":
        if step >= max_steps:
            return min_lr
        warm = max_lr * (step + 1) / warmup_steps if step < warmup_steps else max_lr
        decay_steps = round(decay_fraction * max_steps)
        start = max_steps - decay_steps
        if step < start:
            return warm
        return min(warm, max_lr - (max_lr - min_lr) * (step - start) / decay_steps)
    if shape != "cosine":
        raise ValueError(f"unknown schedule {shape!r}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    decay_steps = max_steps - warmup_steps
    if decay_steps <= 0:
        return max_lr if step < max_steps else min_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def multiplier(cfg: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """The schedule of a config as a multiplier of each group's peak lr: step -> [min_lr_ratio, 1]."""
    kw = {"warmup_steps": cfg.warmup_steps, "max_steps": max_steps, "min_lr": cfg.min_lr_ratio}
    return lambda step: lr_at(step, max_lr=1.0, shape=cfg.schedule, decay_fraction=cfg.decay_fraction, **kw)


def rewarmed(
    base: Callable[[int], float], segment: dict | None, warmup_steps: int, group: str = "lr"
) -> Callable[[int], float]:
    """`base`, except over the `warmup_steps` steps from segment["step"]: a linear blend from the multiplier
    segment["from"] (the lr the run had, as a multiplier of the group's peak: one number for every group, or one
    per group of `PEAKS`) to `base` (reached at the segment's last step)."""
    if not segment or warmup_steps <= 0:
        return base
    start, origin = int(segment["step"]), segment["from"]
    origin = float(origin[group] if isinstance(origin, dict) else origin)

    def mult(step: int) -> float:
        if not start <= step < start + warmup_steps:
            return base(step)
        return origin + (base(step) - origin) * (step - start + 1) / warmup_steps

    return mult


# The peak lrs of the parameter groups (OptimConfig fields): AdamW's, Muon's matrices', the untied embedding's.
PEAKS = ("lr", "muon_lr", "embedding_lr")


def group_multipliers(
    cfg: OptimConfig, max_steps: int, segment: dict | None
) -> Callable[[int], dict[str, float]]:
    """Each peak's multiplier at a step (`apply_schedule`'s): the schedule, re-warmed per group over `segment`."""
    base = multiplier(cfg, max_steps)
    mults = {k: rewarmed(base, segment, cfg.warmup_steps, k) for k in PEAKS}
    return lambda step: {k: mult(step) for k, mult in mults.items()}


def schedule(cfg: OptimConfig, max_steps: int, segment: dict | None = None) -> Callable[[int], float]:
    """The lr of AdamW's groups (peak `cfg.lr`) at each step, re-warmed over `segment` if given."""
    mult = rewarmed(multiplier(cfg, max_steps), segment, cfg.warmup_steps)
    return lambda step: cfg.lr * mult(step)


# ------------------------------------------------------------------------------------------------ optimizers


def param_groups(
    model: torch.nn.Module, weight_decay: float, skip: set[int] = frozenset(), embedding_lr: float | None = None
) -> list[dict]:  # fmt: skip
    """Decay every parameter with 2+ dimensions (matmuls, embeddings); not gains (1-D). Shared tensors once;
    parameters whose id is in `skip` (Muon's) left out. With `embedding_lr`, the (untied) token embedding has a
    group of its own, marked "embedding", whose peak lr is that."""
    embedding = model.get_submodule("tok_emb").weight
    if embedding_lr is not None and embedding is model.get_submodule("lm_head").weight:
        raise TalmError(
            "--optim.embedding_lr needs an untied output head: pass --no-model.tie_embeddings, or "
            "--optim.embedding_lr none (a tied embedding is the head, and takes --optim.lr)"
        )
    own = embedding_lr is not None
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied tensor only once
        if p.requires_grad and id(p) not in skip and not (own and p is embedding):
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if own:
        groups.append({"params": [embedding], "weight_decay": weight_decay, "embedding": True})
    return groups


def hidden_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """Muon's parameters: the 2-D weights inside the blocks (attention and MLP projections), never the token
    embedding or the output head, even when tied (they are outside `model.blocks`)."""
    blocks = model.get_submodule("blocks")
    outside = {id(p) for name, p in model.named_parameters() if not name.startswith("blocks.")}
    return [p for p in blocks.parameters() if p.dim() == 2 and p.requires_grad and id(p) not in outside]


def fused_available(device: torch.device) -> bool:
    """torch's fused AdamW runs on CUDA and CPU (torch >= 2.4, which talm requires); elsewhere (mps) use the
    foreach version."""
    return device.type in ("cuda", "cpu")


def adamw(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    fused = fused_available(device)
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True if fused else None
    )


def orthogonalize(x: torch.Tensor, group: dict, dtype: torch.dtype) -> torch.Tensor:
    """Newton-Schulz orthogonalisation of the matrix `x` in `dtype`, as torch's Muon computes it."""
    (a, b, c), tall = group["ns_coefficients"], x.size(0) > x.size(1)
    x = x.to(dtype)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=group["eps"])
    for _ in range(group["ns_steps"]):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon_update(x: torch.Tensor, group: dict, dtype: torch.dtype, rows: list[int] | None) -> torch.Tensor:
    """Muon's update of a matrix from its momentum-mixed gradient `x`: each block of `rows` (one projection of a
    fused weight; None: the whole matrix) orthogonalised alone and scaled by its own shape, as torch's
    "original" adjust_lr_fn scales a matrix's lr: sqrt(max(1, rows / cols))."""
    return torch.cat(
        [
            orthogonalize(block, group, dtype).to(x.dtype) * math.sqrt(max(1, block.size(0) / block.size(1)))
            for block in (x.split(rows) if rows else [x])
        ]
    )


class Muon(torch.optim.Muon):
    """torch's Muon with its Newton-Schulz iteration in `ns_dtype`, and for FSDP's sharded matrices.

    torch runs the iteration in bfloat16, right on GPUs and on CPUs with native bf16; elsewhere bf16 matmuls are
    emulated and made the tiny preset's whole step 6.5x slower on a 2-core AVX2 CPU (1.24 vs 0.19 s,
    benchmarks/bench_convergence.py), so there it runs in float32 (the same update, computed more precisely).

    Under FSDP each process holds a slab of rows of each matrix (a DTensor), but orthogonalisation needs the
    whole matrix. The work is split: matrix i is orthogonalised by process i mod N alone (round robin), which
    gathers its (momentum-mixed) gradient's rows from every process, then sends each process its rows of the
    update (`sharded_updates`). The update is the same bits as if every process orthogonalised every matrix:
    the same whole matrix goes through the same computation, only on one process. The momentum stays sharded.
    A fused weight (qkv, gate_up) is orthogonalised per projection (`row_blocks`): jointly, a dominant q
    gradient shrank the k and v updates (per-block update RMS 0.074 / 0.020 / 0.020 fused, 0.079 / 0.079 / 0.078
    per projection) and the shape's lr scale was sqrt(3) off. Same state and groups as torch's, so checkpoints
    are the same."""

    def __init__(
        self,
        params: list[torch.Tensor],
        *,
        ns_dtype: torch.dtype,
        row_blocks: dict[torch.Tensor, list[int]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype
        self.row_blocks = row_blocks or {}

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        sharded = any(isinstance(p, DTensor) for g in self.param_groups for p in g["params"])
        if self.ns_dtype == torch.bfloat16 and not sharded and not self.row_blocks:
            return super().step(closure)
        pending = []  # (parameter, its group, its momentum-mixed gradient) of the sharded matrices
        for group in self.param_groups:
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - momentum)
                x = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                if isinstance(x, DTensor):
                    pending.append((p, group, x))
                else:
                    apply_update(
                        p, group, muon_update(x, group, self.ns_dtype, self.row_blocks.get(p)).to(p.dtype)
                    )
        if pending:
            for (p, group, _), update in zip(pending, self.sharded_updates(pending), strict=True):
                apply_update(p, group, update)
        return None

    def sharded_updates(self, pending: list[tuple[DTensor, dict, DTensor]]) -> list[DTensor]:
        """The orthogonalised updates of FSDP's sharded matrices, each as this process's rows, in three phases so
        that the processes orthogonalise at the same time: every matrix gathered whole on its owner (matrix i on
        process i mod N), each owner orthogonalising its own, every update's rows sent back from its owner."""
        mesh = pending[0][0].device_mesh
        assert all(p.device_mesh == mesh for p, _, _ in pending), "FSDP shards every matrix over one mesh"
        group, me, world = mesh.get_group(), mesh.get_local_rank(), mesh.size()
        owners = [i % world for i in range(len(pending))]
        wholes = [gather_rows(x, owner, group) for (_, _, x), owner in zip(pending, owners, strict=True)]
        updates = [
            muon_update(whole, grp, self.ns_dtype, self.row_blocks.get(p)).to(p.dtype)
            if owner == me
            else None
            for (p, grp, _), owner, whole in zip(pending, owners, wholes, strict=True)
        ]
        del wholes
        return [
            scatter_rows(update, p, owner, group)
            for (p, _, _), owner, update in zip(pending, owners, updates, strict=True)
        ]


def apply_update(p: torch.Tensor, group: dict, update: torch.Tensor) -> None:
    """Muon's step of one matrix: decoupled weight decay, then the update (`muon_update`, already scaled by
    its blocks' shapes) at the group's lr."""
    assert group["adjust_lr_fn"] == MUON_ADJUST_LR == "original"
    p.mul_(1 - group["lr"] * group["weight_decay"])
    p.add_(update, alpha=-group["lr"])


class MuonAdamW:
    """Muon for the hidden matrices and AdamW for the rest, as one optimizer: `param_groups` lists both
    optimizers' groups (the same dicts, so setting a group's lr reaches its optimizer; GradScaler's unscale_
    finds every gradient there), `step` steps both, and the state dict holds both ({"muon": ..., "adamw": ...})."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.AdamW) -> None:
        self.optimizers: dict[str, torch.optim.Optimizer] = {"muon": muon, "adamw": adamw}

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers.values() for p, s in opt.state.items()}

    @property
    def defaults(self) -> dict:
        return self.optimizers["adamw"].defaults

    def step(self, closure: None = None) -> None:
        assert closure is None, "MuonAdamW.step takes no closure"
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError("it holds one AdamW's state (--optim.name adamw), this run uses muon")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


Optimizer = torch.optim.AdamW | MuonAdamW


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> Optimizer:
    """AdamW over the decay / no-decay groups (fused where torch has a fused kernel for the device), or with
    --optim.name muon: torch's Muon over the hidden matrices, AdamW over the rest."""
    if cfg.name == "adamw":
        return adamw(param_groups(model, cfg.weight_decay, embedding_lr=cfg.embedding_lr), cfg, device)
    hidden = hidden_matrices(model)
    rows = model.fused_row_blocks() if cfg.muon_per_projection else {}
    muon = Muon(
        hidden,
        ns_dtype=torch.bfloat16 if fast_bf16(device) else torch.float32,
        row_blocks={p: rows[name] for name, p in model.named_parameters() if name in rows},
        lr=cfg.muon_lr,
        weight_decay=cfg.muon_weight_decay,
        momentum=cfg.muon_momentum,
        nesterov=True,
        adjust_lr_fn=MUON_ADJUST_LR,
    )
    rest = param_groups(model, cfg.weight_decay, {id(p) for p in hidden}, cfg.embedding_lr)
    return MuonAdamW(muon, adamw(rest, cfg, device))


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run natively (not emulated) on `device`."""
    return device.type != "cpu" or cpu_native_bf16()


def is_muon(group: dict) -> bool:
    return "ns_steps" in group  # a key only torch's Muon puts in its groups


def muon_momentum(cfg: OptimConfig, step: int) -> float:
    """Muon's momentum at `step`: MUON_MOMENTUM_START ramped linearly to muon_momentum over the warmup."""
    if cfg.muon_momentum_warmup <= 0:
        return cfg.muon_momentum
    frac = min(step / cfg.muon_momentum_warmup, 1.0)
    return (1 - frac) * min(MUON_MOMENTUM_START, cfg.muon_momentum) + frac * cfg.muon_momentum


def apply_schedule(
    optimizer: Optimizer, cfg: OptimConfig, step: int, mult: float | dict[str, float]
) -> float:
    """Set every group's lr to its own peak (muon_lr for Muon's, embedding_lr for an untied embedding's, lr for
    the other AdamW groups) times `mult` (one for all, or per peak: `group_multipliers`), and Muon's momentum to
    its value at `step`. Returns AdamW's lr (the one logged)."""
    mults = mult if isinstance(mult, dict) else dict.fromkeys(PEAKS, mult)
    momentum = muon_momentum(cfg, step)
    for group in optimizer.param_groups:
        if is_muon(group):
            group["lr"], group["momentum"] = cfg.muon_lr * mults["muon_lr"], momentum
        elif group.get("embedding") and cfg.embedding_lr is not None:
            group["lr"] = cfg.embedding_lr * mults["embedding_lr"]
        else:
            group["lr"] = cfg.lr * mults["lr"]
    return cfg.lr * mults["lr"]


def inner_optimizers(optimizer: Optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers behind `optimizer` (AdamW alone, or Muon and AdamW)."""
    return list(optimizer.optimizers.values()) if isinstance(optimizer, MuonAdamW) else [optimizer]


def keep_kernel(optimizer: Optimizer) -> None:
    """After loading a saved state: this device's AdamW kernel (the saved run may have used another device's)."""
    for opt in inner_optimizers(optimizer):
        if isinstance(opt, torch.optim.AdamW):
            for group in opt.param_groups:
                group["fused"], group["foreach"] = opt.defaults.get("fused"), opt.defaults.get("foreach")


def check_kind(optimizer: Optimizer, muon_state: bool) -> None:
    """ValueError if a saved state of Muon and AdamW (`muon_state`) or of AdamW alone does not fit `optimizer`."""
    if isinstance(optimizer, MuonAdamW) and not muon_state:
        raise ValueError("it holds one AdamW's state (--optim.name adamw), this run uses muon")
    if not isinstance(optimizer, MuonAdamW) and muon_state:
        raise ValueError("it holds Muon's and AdamW's state (--optim.name muon), this run uses adamw")


def load_optimizer_state(optimizer: Optimizer, state: dict[str, Any]) -> None:
    """Load a saved optimizer state (ValueError/KeyError/TypeError if it does not fit), keeping this device's
    AdamW kernel."""
    check_kind(optimizer, set(state) == {"muon", "adamw"})
    optimizer.load_state_dict(state)
    keep_kernel(optimizer)
