"""Numerics of a training run: the autocast dtype for a --dtype choice on a device, the loss scaler float16
needs, and the deterministic kernels --deterministic asks for.

On CPU, `--dtype auto` picks bfloat16 only where the processor computes it natively (AVX512-BF16 or AMX-BF16),
where bf16 autocast is the faster choice (issue 10 measured 1.96x float32's speed for the ~11M model on an
AVX-512 Xeon). A CPU without them emulates bf16: on an AVX2-only AMD EPYC a bf16 step of the tiny model took
about 7x as long as a float32 one, so auto keeps float32 there.

Kept apart from the loop because the choice depends on the device alone and is also what the run's banner
reports; the loop only enters `Precision.autocast()` around forward passes and steps through its scaler.
"""

from __future__ import annotations

import functools
import os
import re
from contextlib import AbstractContextManager, nullcontext

import torch

from talm.errors import TalmError

# CPU features that compute bfloat16 natively: AVX512-BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and later) and
# AMX-BF16 (Sapphire Rapids and later), as torch.cpu.get_capabilities() and /proc/cpuinfo's flags name them.
NATIVE_BF16_FEATURES = ("avx512_bf16", "amx_bf16")
CPUINFO = "/proc/cpuinfo"


def _cpuinfo_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux x86), or None where there is no such file or line."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return set(value.split())
    except OSError:
        return None
    return None


@functools.cache
def cpu_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16). Asks torch first (it reads CPUID
    on every OS), then /proc/cpuinfo; anything it cannot tell counts as not native (float32 is the safe choice)."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        try:
            caps = get_capabilities()
        except Exception:  # a probe that fails only costs the faster dtype
            caps = None
        if isinstance(caps, dict) and any(name in caps for name in NATIVE_BF16_FEATURES):
            return any(bool(caps.get(name)) for name in NATIVE_BF16_FEATURES)
    flags = _cpuinfo_flags()
    return flags is not None and any(name in flags for name in NATIVE_BF16_FEATURES)


def autocast_dtype(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain float32) for a --dtype choice on a device."""
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_native_bf16():
            return torch.bfloat16
        return None  # mps, and CPUs that would emulate bfloat16
    if requested == "float32":
        return None
    if requested == "float16" and device.type != "cuda":
        raise TalmError(
            f"--train.dtype float16 needs a CUDA GPU (this run is on {device.type}): use bfloat16"
        )
    if requested == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TalmError("this GPU has no bfloat16 support: use --train.dtype float16 (or auto)")
    return torch.bfloat16 if requested == "bfloat16" else torch.float16


# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s from the vendors' datasheets, by a pattern of
# torch.cuda.get_device_name(): what MFU is measured against, as nanoGPT and PaLM do. H200 and GH200 have H100
# SXM's compute. The first pattern that matches wins, so the PCIe H100 comes before the others.
GPU_PEAK_TFLOPS = (
    (r"H100.*PCIe", 756.0),
    (r"H100|H200", 989.0),
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
    (r"RTX 4090", 165.0),
)


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """The device's peak FLOP/s for a run in `dtype` (None = float32), or None where talm does not know it: a CPU,
    a GPU not in GPU_PEAK_TFLOPS, or float32 (whose TF32 peak is another figure, not the one MFU is quoted at)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for pattern, tflops in GPU_PEAK_TFLOPS if re.search(pattern, name)), None)


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
        if (
            device.type == "cuda"
        ):  # float32 matmuls on TF32 tensor cores (Ampere and later): ~8x, 10-bit mantissa
            torch.set_float32_matmul_precision("high")
        self.peak_flops = peak_flops(device, self.dtype)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

    def autocast(self) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def __str__(self) -> str:
        return str(self.dtype or torch.float32)
