"""``train.nonfinite=skip_step``: a training step whose loss is not finite leaves no trace, with no host sync.

The idea is GradScaler's ``found_inf`` (skip the update when the gradients overflowed), done on the
device: before the step, a copy of every parameter, buffer (BatchNorm statistics, queues) and optimiser
state tensor is kept; after the step (optimiser update, EMA teacher), each tensor is set to
``where(finite, new, old)``. ``finite`` is a 0-dim bool tensor that never leaves the device, so the loop
does not wait for the GPU. Optimiser state created by this very step (the first step) falls back to
zeros, which is what SGD's momentum buffer and Adam's moments and step count start from.
The cost, one copy of the training state per step, is paid only when the option is on. Adam is built
``capturable`` on a GPU then, so that its step counter lives on the device too (a CPU tensor would need a
copy of ``finite`` to the host).
"""

from __future__ import annotations

import torch
from torch import nn


class SkipNonFinite:
    """``before(optimizer)``, run the step, then ``after(optimizer, finite)`` undoes it where ``finite`` is false."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._tensors: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []
        self._opt_saved: dict[int, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def before(self, optimizer: torch.optim.Optimizer) -> None:
        self._tensors = [*self.module.parameters(), *self.module.buffers()]
        self._saved = [t.detach().clone() for t in self._tensors]
        self._opt_saved = {
            id(p): {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
            for p, state in optimizer.state.items()
        }

    @torch.no_grad()
    def after(self, optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
        for tensor, old in zip(self._tensors, self._saved):
            tensor.copy_(torch.where(finite, tensor, old))
        for p, state in optimizer.state.items():
            saved = self._opt_saved.get(id(p), {})
            for key, value in state.items():
                if torch.is_tensor(value):
                    old = saved.get(key)
                    keep = finite if value.device == finite.device else finite.to(value.device)
                    value.copy_(torch.where(keep, value, old if old is not None else torch.zeros_like(value)))
        self._tensors, self._saved, self._opt_saved = [], [], {}
