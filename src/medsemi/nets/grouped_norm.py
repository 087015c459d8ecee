"""Grouped-statistics ("ghost batch") BatchNorm for fused forwards (spec ust-run.md 3.5).

MiDSS / UST-RUN run every network call of a step as a separate forward, so each call is normalised with
its own BatchNorm batch statistics and updates the running buffers once. Concatenating the calls into one
forward (``forward_mode="fused"``) changes both. :class:`GroupedBatchNorm2d` keeps the per-call
semantics inside one forward: with a group layout set (``grouped_batches(model, sizes)``) it splits the
batch into contiguous sub-batches, normalises each with its own batch mean and biased variance, and
updates ``running_mean`` / ``running_var`` / ``num_batches_tracked`` exactly as the sequential calls
would (one momentum update per group, in order, with the unbiased variance).

It is a drop-in :class:`torch.nn.BatchNorm2d` (same parameters, buffers and ``state_dict`` keys), and
without a layout, or in eval mode, it *is* ``BatchNorm2d``. :func:`ensure_grouped_norm` converts an
existing network in place by swapping the class of its BatchNorm2d modules, so parameter objects (and
an optimiser holding them) are untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

_HERE = "nets/grouped_norm.py"


class GroupedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with optional per-sub-batch statistics.

    ``group_sizes`` (``None`` or a tuple of positive ints summing to the batch size) is a plain attribute,
    set by :func:`grouped_batches`; it is not part of the state dict.

    Two equivalent computations: by default a loop over the (few) groups with the native
    ``F.batch_norm`` kernel, which updates the running buffers in order exactly as the separate calls;
    with ``vectorise_equal = True`` (class or instance attribute) equal sizes use one
    ``(G, n, C, H, W)`` statistics pass and a closed-form running update. The loop is the default
    because it measured ~4x faster forward+backward on a CPU (one native kernel per group versus
    several unfused elementwise ops); the vectorised form may pay off under ``torch.compile``.
    """

    group_sizes: tuple[int, ...] | None = None  # class default, so a swapped-in module needs no __init__
    vectorise_equal: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = self.group_sizes
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if sizes is None or len(sizes) == 1 or not use_batch_stats:
            return super().forward(x)
        self._check_input_dim(x)
        if sum(sizes) != x.shape[0]:
            raise ValueError(f"{_HERE}: group sizes {list(sizes)} sum to {sum(sizes)}, "
                             f"but the batch has {x.shape[0]} samples")
        if self.vectorise_equal and all(s == sizes[0] for s in sizes):
            return self._forward_equal(x, len(sizes))
        return self._forward_loop(x, sizes)

    def _forward_loop(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Unequal sizes: one ``F.batch_norm`` per group, updating the buffers in order (exactly the
        sequential calls)."""
        track = self.training and self.track_running_stats
        outs = []
        for chunk in x.split(list(sizes)):
            momentum = 0.0 if self.momentum is None else self.momentum
            if track:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average (reads the counter, as BatchNorm2d)
                    momentum = 1.0 / float(self.num_batches_tracked)
            outs.append(F.batch_norm(
                chunk,
                self.running_mean if track else None,
                self.running_var if track else None,
                self.weight, self.bias, True, momentum, self.eps,
            ))
        return torch.cat(outs)

    def _forward_equal(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """Equal sizes: statistics of ``x.view(G, n, C, H, W)`` over ``(n, H, W)`` in one pass."""
        b, c = x.shape[:2]
        n = b // groups
        count = n * x[0, 0].numel()
        if count <= 1:
            raise ValueError(f"{_HERE}: expected more than 1 value per channel in each group "
                             f"(group size {n}, input {tuple(x.shape)})")
        x5 = x.reshape(groups, n, c, *x.shape[2:])
        low = x.dtype in (torch.float16, torch.bfloat16)
        xs = x5.float() if low else x5
        var, mean = torch.var_mean(xs, dim=(1, 3, 4), correction=0, keepdim=True)  # (G, 1, C, 1, 1)
        y = (xs - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.view(1, 1, c, 1, 1) + self.bias.view(1, 1, c, 1, 1)
        y = y.to(x.dtype).reshape(x.shape)
        if self.training and self.track_running_stats:
            self._update_running(mean.view(groups, c).detach(), var.view(groups, c).detach(), count)
        return y

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """Apply the G sequential updates ``r <- (1 - m) r + m s_g``; with a fixed momentum in closed
        form ``r_G = (1-m)^G r_0 + sum_g m (1-m)^(G-1-g) s_g``."""
        groups = mean.shape[0]
        unbiased = var * (count / (count - 1))
        rm, rv = self.running_mean, self.running_var
        mean, unbiased = mean.to(rm.dtype), unbiased.to(rv.dtype)
        if self.momentum is not None:
            m = float(self.momentum)
            exps = torch.arange(groups - 1, -1, -1, device=rm.device, dtype=rm.dtype)
            w = m * (1.0 - m) ** exps  # built on the device: no host-to-device copy
            keep = (1.0 - m) ** groups
            rm.mul_(keep).add_(w @ mean)
            rv.mul_(keep).add_(w @ unbiased)
            self.num_batches_tracked.add_(groups)
            return
        for g in range(groups):  # cumulative average: factors depend on the (device) counter
            self.num_batches_tracked.add_(1)
            f = 1.0 / self.num_batches_tracked.to(rm.dtype)
            rm.mul_(1 - f).add_(mean[g] * f)
            rv.mul_(1 - f).add_(unbiased[g] * f)


def _grouped_modules(model: nn.Module) -> list[GroupedBatchNorm2d]:
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    return [m for m in model.modules() if isinstance(m, GroupedBatchNorm2d)]


@contextlib.contextmanager
def grouped_batches(model: nn.Module, sizes: Sequence[int]) -> Iterator[None]:
    """Within the block, every :class:`GroupedBatchNorm2d` of ``model`` computes batch statistics per
    contiguous sub-batch of the given sizes (the previous layout is restored on exit)."""
    sizes = tuple(int(s) for s in sizes)
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"{_HERE}: group sizes must be positive integers, got {list(sizes)}")
    modules = _grouped_modules(model)
    previous = [m.group_sizes for m in modules]
    for m in modules:
        m.group_sizes = sizes
    try:
        yield
    finally:
        for m, old in zip(modules, previous):
            m.group_sizes = old


def ensure_grouped_norm(model: nn.Module) -> int:
    """Turn every plain ``nn.BatchNorm2d`` of ``model`` into a :class:`GroupedBatchNorm2d` in place.

    The module objects are kept and only their class changes (``module.__class__ = GroupedBatchNorm2d``):
    parameters and buffers stay the very same tensors, so an optimiser or EMA that holds them keeps
    working and ``state_dict`` keys are unchanged. Returns the number of modules converted.
    Do this before ``torch.compile`` traces the network.
    """
    model = getattr(model, "_orig_mod", model)
    converted = 0
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GroupedBatchNorm2d
            converted += 1
    return converted
