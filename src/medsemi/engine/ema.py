"""Exponential moving average teacher, parameters only (spec ust-run.md 1.5, 3.5)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float, buffers: bool = False) -> None:
    """``teacher <- alpha * teacher + (1 - alpha) * student`` for every parameter.

    BatchNorm buffers are not averaged (the teacher runs in train mode and keeps its own),
    unless ``buffers`` is true, in which case floating buffers are copied from the student.
    """
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_mul_(t_params, alpha)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - alpha)
    if buffers:
        for tb, sb in zip(teacher.buffers(), student.buffers()):
            if tb.dtype.is_floating_point:
                tb.copy_(sb)
