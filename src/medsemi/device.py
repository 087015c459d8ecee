"""Where tensors run, in which precision and memory format: device, AMP and channels-last resolution, autocast.

A leaf module: the engine, the evaluation and the workflows all use it, and it imports nothing of medsemi.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


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


def resolve_channels_last(setting: str | bool, device: torch.device, model: nn.Module) -> torch.memory_format | None:
    """The memory format for ``model.channels_last`` (auto | true | false): ``auto`` is channels-last for a 2D
    network on CUDA and off otherwise (on a CPU it measured no faster; for 3D it is not measured as faster);
    ``true`` is channels-last, or channels-last-3d for a network with 3D convolutions. ``None``: leave as is."""
    setting = {True: "true", False: "false"}.get(setting, setting) if isinstance(setting, bool) else setting
    is_3d = any(isinstance(m, nn.Conv3d) for m in model.modules())
    if setting == "false" or (setting == "auto" and (device.type != "cuda" or is_3d)):
        return None
    if setting not in ("auto", "true"):
        raise ValueError(f"model.channels_last must be auto, true or false, got {setting!r}")
    return torch.channels_last_3d if is_3d else torch.channels_last
