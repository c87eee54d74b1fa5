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
from typing import Any, NamedTuple

import torch
from torch.distributed.tensor import DTensor

from talm.errors import TalmError
from talm.train.config import OptimConfig
from talm.train.precision import cpu_native_bf16
from talm.train.sharded_rows import from_owners, to_owners

# Muon's momentum warms up from this value to --optim.muon_momentum over --optim.muon_momentum_warmup steps,
# as nanochat (scripts/base_train.py, get_muon_momentum: 0.85 -> 0.95 over 300 steps) and the modded-nanogpt
# speedrun (train_gpt.py, the same ramp) do.
MUON_MOMENTUM_START = 0.85
# How torch's Muon scales the lr of a rows x cols matrix. "original" (Keller Jordan's Muon: lr *
# sqrt(max(1, rows/cols))) is the scaling under which nanochat's and modded-nanogpt's Muon lrs (0.02-0.05) were
# tuned, so --optim.muon_lr's default means what it means there. "match_rms_adamw" (Moonshot: lr * 0.2 *
# sqrt(max(rows, cols))) would let Muon reuse AdamW's lr, but no speedrun recipe is tuned for it.
MUON_ADJUST_LR = "original"
# torch 2.13 renamed all_gather_into_tensor all_gather_single (the old name warns); talm runs on torch >= 2.4.
ALL_GATHER = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor


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
    """Newton-Schulz orthogonalisation of each matrix of the stack `x` (count, rows, cols) in `dtype`, as
    torch's Muon computes it for one matrix; one batched matmul per product for the whole stack."""
    (a, b, c), tall = group["ns_coefficients"], x.size(-2) > x.size(-1)
    x = x.to(dtype)
    x = x.mT if tall else x
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=group["eps"])
    for _ in range(group["ns_steps"]):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Piece(NamedTuple):
    """One matrix Muon orthogonalises: rows [start, start + rows) of the `index`-th parameter stepped (a whole
    weight, or one projection of a fused one)."""

    index: int
    start: int
    rows: int


# What Muon adds to a parameter's rows: (the first row, in this process's rows of it; the orthogonalised update
# of those rows; the lr scale of the piece's shape).
Part = tuple[int, torch.Tensor, float]


def stacks(
    shapes: list[torch.Size], row_blocks: list[list[int] | None], groups: list[int]
) -> list[list[Piece]]:
    """The pieces of the parameters (their `shapes`, each split into its `row_blocks`, None: whole), grouped
    into stacks of one shape and one parameter group (one batched Newton-Schulz each), largest stack first (its
    collective then overlaps the most computation)."""
    by_key: dict[tuple[int, int, int], list[Piece]] = {}
    for i, (shape, blocks, g) in enumerate(zip(shapes, row_blocks, groups, strict=True)):
        start = 0
        for rows in blocks or [shape[0]]:
            by_key.setdefault((rows, shape[1], g), []).append(Piece(i, start, rows))
            start += rows
    return sorted(by_key.values(), key=lambda s: -len(s) * s[0].rows * shapes[s[0].index][1])


def owners(count: int, world: int, first: int) -> list[int]:
    """The process that orthogonalises each of a stack's `count` pieces: contiguous shares of ceil(count /
    world), the first to process `first` (stacks start where the last one ended, so single pieces go round robin)."""
    share = -(-count // world)
    return [(first + j // share) % world for j in range(count)]


def lr_scale(rows: int, cols: int) -> float:
    """torch's "original" adjust_lr_fn: a rows x cols matrix steps at lr * sqrt(max(1, rows / cols))."""
    return math.sqrt(max(1, rows / cols))


class Muon(torch.optim.Muon):
    """torch's Muon, per projection, batched by shape, and split over the processes of DDP or FSDP.

    Each fused weight (qkv, gate_up) is orthogonalised per projection (`row_blocks`), each at its own shape's lr
    scale; same-shape pieces are stacked into one batched Newton-Schulz. Distributed, each process
    orthogonalises a distinct share of each stack: under DDP (`process_group`: every process holds the same
    all-reduced gradient and momentum) the shares' updates are all-gathered; under FSDP (DTensor parameters)
    each piece's rows go to its owner and its update's rows back (two all_to_alls per stack). Collectives are
    asynchronous and overlap the next stack's iteration. The iteration runs in `ns_dtype` (float32 where bf16
    is emulated). State and groups are torch's (a per-parameter momentum, sharded as the parameter), so
    checkpoints are unchanged. docs/design.md (Muon) has the measurements."""

    def __init__(
        self,
        params: list[torch.Tensor],
        *,
        ns_dtype: torch.dtype,
        row_blocks: dict[torch.Tensor, list[int]] | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype
        self.row_blocks = row_blocks or {}
        self.process_group = process_group

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        stepped = []  # (parameter, its group's index, its momentum-mixed gradient)
        for g, group in enumerate(self.param_groups):
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - momentum)
                stepped.append((p, g, p.grad.lerp(buf, momentum) if group["nesterov"] else buf))
        if not stepped:
            return None
        pieces = stacks(
            [p.shape for p, _, _ in stepped],
            [self.row_blocks.get(p) for p, _, _ in stepped],
            [g for _, g, _ in stepped],
        )
        if isinstance(stepped[0][2], DTensor):
            parts = self.sharded_updates(stepped, pieces)
        else:
            parts = self.replicated_updates(stepped, pieces)
        for (p, g, _), own in zip(stepped, parts, strict=True):
            apply_update(p, self.param_groups[g], own)
        return None

    def replicated_updates(self, stepped: list[tuple], pieces: list[list[Piece]]) -> list[list[Part]]:
        """Each parameter's updates where every process holds the whole momentum (one process, or DDP): this
        process orthogonalises its share of each stack, then all_gathers the others' (async, while it computes
        the next stack)."""
        pg = self.process_group
        world, me = (pg.size(), torch.distributed.get_rank(pg)) if pg is not None else (1, 0)
        gathers, first = [], 0
        for stack in pieces:
            owner, share = owners(len(stack), world, first), -(-len(stack) // world)
            first += len(stack)
            mine = [piece for piece, o in zip(stack, owner, strict=True) if o == me]
            group = self.param_groups[stepped[stack[0].index][1]]
            x = stepped[stack[0].index][2]
            ortho = None
            if mine:
                whole = torch.stack([stepped[i][2].narrow(0, s, r) for i, s, r in mine])
                ortho = orthogonalize(whole, group, self.ns_dtype)
            if world == 1:
                gathers.append((stack, owner, share, ortho, None))
                continue
            done = x.new_zeros(share, stack[0].rows, x.size(1), dtype=self.ns_dtype)  # this share, 0-padded
            if ortho is not None:
                done[: len(ortho)] = ortho
            out = done.new_empty(world * share, *done.shape[1:])
            work = ALL_GATHER(out, done, group=pg, async_op=True)
            gathers.append((stack, owner, share, out, work))
        parts: list[list[Part]] = [[] for _ in stepped]
        for stack, owner, share, out, work in gathers:
            if work is not None:
                work.wait()
            for j, (piece, o) in enumerate(zip(stack, owner, strict=True)):
                update = out[o * share + j % share]
                parts[piece.index].append((piece.start, update, lr_scale(piece.rows, update.size(1))))
        return parts

    def sharded_updates(self, stepped: list[tuple], pieces: list[list[Piece]]) -> list[list[Part]]:
        """Each parameter's updates, as this process's rows, under FSDP: every stack's pieces sent whole to their
        owners (async, all at once), each owner orthogonalising its share of a stack as soon as it has arrived
        and sending each process its rows of the updates (async), then every process taking its rows."""
        mesh = stepped[0][0].device_mesh
        assert all(p.device_mesh == mesh for p, _, _ in stepped), "FSDP shards every matrix over one mesh"
        pg, world, first = mesh.get_group(), mesh.size(), 0
        like = stepped[0][2].to_local().new_empty(0, dtype=self.ns_dtype)
        arriving = []
        for stack in pieces:
            owner = owners(len(stack), world, first)
            first += len(stack)
            rows = [(stepped[i][2], s, r) for i, s, r in stack]
            arriving.append((stack, owner, rows, to_owners(rows, owner, pg)))
        returning = []
        for stack, owner, rows, wait in arriving:
            whole = wait()
            group = self.param_groups[stepped[stack[0].index][1]]
            ortho = list(orthogonalize(torch.stack(whole), group, self.ns_dtype)) if whole else []
            returning.append((stack, from_owners(ortho, rows, owner, pg, like)))
        parts: list[list[Part]] = [[] for _ in stepped]
        for stack, wait in returning:
            for piece, (start, update) in zip(stack, wait(), strict=True):
                if update.numel():
                    parts[piece.index].append((start, update, lr_scale(piece.rows, update.size(1))))
        return parts


def apply_update(p: torch.Tensor, group: dict, parts: list[Part]) -> None:
    """Muon's step of one matrix (this process's rows of it, under FSDP): decoupled weight decay, then each
    piece's orthogonalised update at the group's lr times the piece's shape scale (torch's arithmetic)."""
    assert group["adjust_lr_fn"] == MUON_ADJUST_LR == "original"
    local = p.to_local() if isinstance(p, DTensor) else p  # under no_grad: the shard itself, updated in place
    local.mul_(1 - group["lr"] * group["weight_decay"])
    for start, update, scale in parts:
        local.narrow(0, start, update.size(0)).add_(update, alpha=-(group["lr"] * scale))


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
        process_group=replicated_group(hidden),
    )
    rest = param_groups(model, cfg.weight_decay, {id(p) for p in hidden}, cfg.embedding_lr)
    return MuonAdamW(muon, adamw(rest, cfg, device))


def replicated_group(params: list[torch.Tensor]) -> torch.distributed.ProcessGroup | None:
    """The process group over which whole (not FSDP-sharded) parameters are replicated: the default one when
    several processes run (talm then wraps the model in DDP, whose gradients are all-reduced), else None."""
    dist = torch.distributed
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not several or any(isinstance(p, DTensor) for p in params):
        return None
    return dist.group.WORLD


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
