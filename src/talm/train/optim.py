"""The optimizer and its learning-rate schedule.

AdamW with two parameter groups: matrices (embeddings, projections) get weight decay, vectors (the RMSNorm
gains) do not. `lr_at` is a pure function of the step, so the schedule needs no state of its own to resume.
"""

from __future__ import annotations

import math

import torch

from talm.train.config import OptimConfig


def lr_at(step: int, *, max_lr: float, warmup_steps: int, max_steps: int, min_lr: float) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Linear warmup from max_lr/warmup_steps to max_lr over the first `warmup_steps` steps, then a half cosine
    from max_lr down to min_lr at `max_steps`, and min_lr after that. Never negative (min_lr >= 0), and
    monotone non-increasing after warmup.
    """
    if not 0 <= min_lr <= max_lr:
        raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    decay_steps = max_steps - warmup_steps
    if decay_steps <= 0:
        return max_lr if step < max_steps else min_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def schedule(cfg: OptimConfig, max_steps: int):
    """`lr_at` bound to a config: step -> learning rate."""
    min_lr = cfg.lr * cfg.min_lr_ratio
    return lambda step: lr_at(
        step, max_lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=max_steps, min_lr=min_lr
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay every parameter with 2+ dimensions (matmuls, embeddings); not gains (1-D). Shared tensors once."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied tensor only once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def fused_available(device: torch.device) -> bool:
    """torch's fused AdamW runs on CUDA and CPU (torch >= 2.4, which talm requires); elsewhere (mps) use the
    foreach version."""
    return device.type in ("cuda", "cpu")


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the decay / no-decay groups, fused where torch has a fused kernel for the device."""
    fused = fused_available(device)
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=True if fused else None,
    )
