"""Mixed precision shared by training, inference and the face restorers: ``fp32`` | ``bf16`` | ``fp16``."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` on ``device`` for bf16/fp16; a no-op context for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when autocast made it half or bfloat16; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
