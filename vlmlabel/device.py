"""Choose the compute device and the precision it supports, with errors a user can act on."""

from __future__ import annotations

import enum

import torch

from vlmlabel.errors import DeviceError


class Precision(str, enum.Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


PRECISIONS = tuple(p.value for p in Precision)
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str = "auto") -> torch.device:
    """auto picks cuda, then mps, then cpu; an explicit device must exist."""
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r} asked for but no CUDA GPU is visible; use --device cpu")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {spec!r} does not exist: {torch.cuda.device_count()} CUDA GPU(s) visible")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("device 'mps' asked for but Apple MPS is not available; use --device cpu")
        return device
    raise DeviceError(f"unsupported device {spec!r}; use auto, cpu, cuda, cuda:N or mps")


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 elsewhere; refuse what the device lacks."""
    precision = precision.strip().lower()
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if precision == "auto":
            return "bf16" if bf16_ok else "fp16"
        if precision == "bf16" and not bf16_ok:
            raise DeviceError(f"{torch.cuda.get_device_name(device)} does not support bf16; use fp16 or fp32")
        return precision
    if device.type == "mps":
        if precision == "bf16":
            raise DeviceError("bf16 is not supported on mps; use fp16 or fp32")
        return "fp16" if precision == "auto" else precision
    if precision == "fp16":
        raise DeviceError("fp16 is not supported on cpu; use fp32 or bf16")
    return "fp32" if precision == "auto" else precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype for a resolved precision (None: run in fp32)."""
    return _AUTOCAST[precision]


def default_batch_size(device: torch.device) -> int:
    """Large enough to keep a GPU busy, small enough for a laptop CPU's cache."""
    return 256 if device.type == "cuda" else 64 if device.type == "mps" else 32
