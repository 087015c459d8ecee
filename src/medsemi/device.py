"""Where tensors run and in which precision: device and AMP resolution, autocast contexts.

A leaf module: the engine, the evaluation and the workflows all use it, and it imports nothing of medsemi.
"""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; an explicit ``cuda`` without a GPU is a ValueError
    (one sentence, shown by the CLI)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA GPU is available here (torch.cuda.is_available() is "
                         "False); use train.device=cpu (or auto), or --device cpu")
    return device


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` is bf16 autocast on CUDA and off on a CPU."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "off"
    if amp not in ("off", "bf16", "fp16"):
        raise ValueError(f"train.amp must be auto, off, bf16 or fp16, got {amp!r}")
    return amp


def autocast_for(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved AMP mode (``off``: a no-op context)."""
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if amp == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()
