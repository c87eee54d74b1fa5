"""Numerics of a training run: the autocast dtype for a --dtype choice on a device, the loss scaler float16
needs, and the deterministic kernels --deterministic asks for.

Kept apart from the loop because the choice depends on the device alone and is also what the run's banner
reports; the loop only enters `Precision.autocast()` around forward passes and steps through its scaler.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext

import torch

from talm.errors import TalmError


def autocast_dtype(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain float32) for a --dtype choice on a device."""
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if requested == "float32":
        return None
    if requested == "float16" and device.type != "cuda":
        raise TalmError(
            f"--train.dtype float16 needs a CUDA GPU (this run is on {device.type}): use bfloat16"
        )
    if requested == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TalmError("this GPU has no bfloat16 support: use --train.dtype float16 (or auto)")
    return torch.bfloat16 if requested == "bfloat16" else torch.float16


def set_deterministic(device: torch.device) -> None:
    """Deterministic kernels (bitwise-reproducible runs), at some speed cost."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


class Precision:
    """The run's precision on its device: `dtype` (None = float32), `autocast()` and the gradient `scaler`
    (enabled for float16 only: bfloat16 has float32's range and needs no loss scaling)."""

    def __init__(self, requested: str, device: torch.device) -> None:
        self.device = device
        self.dtype = autocast_dtype(requested, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

    def autocast(self) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def __str__(self) -> str:
        return str(self.dtype or torch.float32)
