"""Grouped-statistics ("ghost batch") BatchNorm for fused forwards (spec ust-run.md 3.5).

MiDSS / UST-RUN run every network call of a step as a separate forward, so each call is normalised with
its own BatchNorm batch statistics and updates the running buffers once. Concatenating the calls into one
forward (``forward_mode="fused"``) changes both. :class:`GroupedBatchNorm2d` keeps the per-call
semantics inside one forward: with a group layout set (``grouped_batches(model, sizes)``) every group of
samples (one per original call) is normalised with its own batch mean and biased variance, and
``running_mean`` / ``running_var`` / ``num_batches_tracked`` end up exactly as after the sequential calls
(one momentum update per group, in call order, with the unbiased variance), computed in closed form.

All groups' statistics are computed in one pass, without a Python loop over the groups:

* **interleaved block** (what :func:`pack` builds for ``run_calls``): the leading ``k`` calls of equal
  size ``n`` are stored sample-major (sample ``i`` of call ``g`` at batch row ``i * k + g``). For an
  NCHW-contiguous activation the block is then a free view ``(n, k * C, H, W)`` in which every
  (call, channel) pair is a channel of its own, and one native ``batch_norm`` call (weights repeated ``k``
  times) normalises all ``k`` calls — the fused forward's kernel, at its cost;
* **any other layout** (uneven sizes, channels-last activations, the calls after the block): per-sample
  sums, combined per group by one small matrix product, then a two-pass centred variance, in one
  autograd function with a hand-written backward (:class:`_GroupStatsNorm`).

It is a drop-in :class:`torch.nn.BatchNorm2d` (same parameters, buffers and ``state_dict`` keys), and
without a layout, or in eval mode, it *is* ``BatchNorm2d``. :func:`ensure_grouped_norm` converts an
existing network in place by swapping the class of its BatchNorm2d modules, so parameter objects (and
an optimiser holding them) are untouched.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_HERE = "nets/grouped_norm.py"


@dataclass(frozen=True)
class GroupLayout:
    """Which batch rows belong to which call: ``sizes`` per call in call order; the first
    ``interleaved`` calls (all of size ``sizes[0]``) are stored sample-major, the rest follow in order."""

    sizes: tuple[int, ...]
    interleaved: int = 0

    def __post_init__(self) -> None:
        if not self.sizes or any(s <= 0 for s in self.sizes):
            raise ValueError(f"{_HERE}: group sizes must be positive integers, got {list(self.sizes)}")
        k = self.interleaved
        if k < 0 or k > len(self.sizes) or any(s != self.sizes[0] for s in self.sizes[:k]):
            raise ValueError(f"{_HERE}: the {k} interleaved groups must be leading groups of equal size, "
                             f"got sizes {list(self.sizes)}")

    @property
    def block(self) -> int:
        """Rows in the interleaved block (0 without one)."""
        return self.sizes[0] * self.interleaved if self.interleaved > 1 else 0

    @cached_property
    def group_of_row(self) -> tuple[int, ...]:
        k = self.interleaved if self.interleaved > 1 else 0
        rows = [g for _ in range(self.sizes[0]) for g in range(k)] if k else []
        return tuple(rows + [g for g in range(k, len(self.sizes)) for _ in range(self.sizes[g])])


def pack(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, GroupLayout]:
    """One batch for the calls ``inputs`` and its layout: the leading calls of equal size interleaved
    (sample-major), the others appended in order. :func:`unpack` gives the per-call outputs back."""
    sizes = tuple(len(x) for x in inputs)
    k = 1
    while k < len(sizes) and sizes[k] == sizes[0]:
        k += 1
    if k == 1:
        return torch.cat(list(inputs)), GroupLayout(sizes, 0)
    block = torch.stack(list(inputs[:k]), 1).flatten(0, 1)
    return torch.cat([block, *inputs[k:]]) if k < len(sizes) else block, GroupLayout(sizes, k)


def unpack(out: torch.Tensor, layout: GroupLayout) -> list[torch.Tensor]:
    """Per-call views of a network output computed on :func:`pack`'s batch."""
    nb, k = layout.block, layout.interleaved
    if nb == 0:
        return list(out.split(list(layout.sizes)))
    # one copy to call-major order: the per-call outputs are then contiguous, as the losses' kernels like
    head = list(out[:nb].unflatten(0, (layout.sizes[0], k)).transpose(0, 1).contiguous().unbind(0))
    return head + list(out[nb:].split(list(layout.sizes[k:]))) if k < len(layout.sizes) else head


# ------------------------------------------------------------------------------------ small cached tensors
_CACHE: dict[Any, torch.Tensor] = {}


def _cached(key: Any, build: Any) -> torch.Tensor:
    """Device tensors that depend only on the (static) layout are built once per device: no host copy
    (and so no host synchronisation) in the steady state."""
    value = _CACHE.get(key)
    if value is None:
        if len(_CACHE) > 256:
            _CACHE.clear()
        value = _CACHE[key] = build()
    return value


def _group_index(groups: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int64 ``(B,)`` group of each row, built on the device from ``full`` fills (no host data)."""
    def build() -> torch.Tensor:
        runs, start = [], 0
        for i in range(1, len(groups) + 1):
            if i == len(groups) or groups[i] != groups[start]:
                runs.append(torch.full((i - start,), groups[start], dtype=torch.long, device=device))
                start = i
        return torch.cat(runs)

    return _cached(("index", groups, device), build)


def _averaging_matrix(groups: tuple[int, ...], length: int, dtype: torch.dtype, device: torch.device
                      ) -> torch.Tensor:
    """``(B, B)``: row ``b`` averages the per-row sums of ``b``'s group over its ``n_g * length`` values."""
    def build() -> torch.Tensor:
        idx = _group_index(groups, device)
        same = (idx[:, None] == idx[None, :]).to(dtype)
        return same / (same.sum(1, keepdim=True) * length)

    return _cached(("avg", groups, length, dtype, device), build)


def _first_rows(groups: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int64 ``(G,)``: one row of each group, in group order."""
    def build() -> torch.Tensor:
        idx = _group_index(groups, device)
        rows = torch.arange(len(groups), device=device)
        g = int(max(groups)) + 1
        return torch.where(idx[None, :] == torch.arange(g, device=device)[:, None], rows, len(groups)).amin(1)

    return _cached(("first", groups, device), build)


def _bessel(groups: tuple[int, ...], length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(G, 1)``: ``N_g / (N_g - 1)`` with ``N_g`` the values per channel of group ``g`` (unbiased variance)."""
    def build() -> torch.Tensor:
        idx = _group_index(groups, device)
        count = torch.zeros(max(groups) + 1, dtype=dtype, device=device).index_add_(
            0, idx, torch.ones(len(groups), dtype=dtype, device=device)) * length
        return (count / (count - 1)).unsqueeze(1)

    return _cached(("bessel", groups, length, dtype, device), build)


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    if device_type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------ general one-pass path
class _GroupStatsNorm(torch.autograd.Function):
    """BatchNorm with per-group batch statistics for any assignment of rows to groups, given as the
    averaging matrix ``avg`` (``(B, B)``, see :func:`_averaging_matrix`).

    Forward: ``mean = avg @ x.sum(HW)``, ``d = x - mean``, ``var = avg @ (d * d).sum(HW)`` (two-pass, as
    stable as the native kernel), ``y = d * w / sqrt(var + eps) + b``. Backward (Ioffe & Szegedy 2015,
    the batch-norm gradient, per group): ``dx = w s (dy - mean_g(dy) - x̂ mean_g(dy x̂))`` with
    ``s = 1 / sqrt(var + eps)``. Low-precision inputs are computed in float32. Also returns the per-row
    group mean and biased variance (no gradient) for the running statistics.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                avg: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with _no_autocast(x.device.type):
            xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            mean = avg @ xs.sum((2, 3))
            d = xs - mean[:, :, None, None]
            var = avg @ (d * d).sum((2, 3))
            invstd = torch.rsqrt(var + eps)
            scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
            y = d * scale[:, :, None, None] if bias is None else torch.addcmul(
                bias.to(d.dtype).view(1, -1, 1, 1), d, scale[:, :, None, None])
        ctx.save_for_backward(d, invstd, scale, avg)
        ctx.has_weight, ctx.has_bias, ctx.dtype = weight is not None, bias is not None, x.dtype
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean, var

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        d, invstd, scale, avg = ctx.saved_tensors
        with _no_autocast(gy.device.type):
            g = gy.to(d.dtype)
            sum_dy = g.sum((2, 3))
            sum_dy_d = (g * d).sum((2, 3))
            c = sum_dy.shape[1]
            means = avg @ torch.cat([sum_dy, sum_dy_d], 1)  # per-row group means of dy and dy * d
            coef_d = -scale * invstd * invstd * means[:, c:]
            gx = torch.addcmul((-scale * means[:, :c])[:, :, None, None], d, coef_d[:, :, None, None])
            gx.addcmul_(scale[:, :, None, None], g)
            gw = (invstd * sum_dy_d).sum(0) if ctx.has_weight else None
            gb = sum_dy.sum(0) if ctx.has_bias else None
        return gx.to(ctx.dtype), gw, gb, None, None


class _BlockNorm(torch.autograd.Function):
    """The interleaved block ``(n k, C, H, W)`` (NCHW-contiguous) normalised as the view ``(n, k C, H, W)``
    by the native batch-norm kernels, forward and backward, with the weights repeated ``k`` times. One
    autograd node: on a CPU at small sizes every extra operation (a repeat and its backward) costs as much
    as the normalisation itself. With running buffers given (zeroed, momentum 1) the kernel writes each
    group's batch mean and unbiased variance into them."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, k: int,
                eps: float, running_mean: torch.Tensor | None, running_var: torch.Tensor | None) -> torch.Tensor:
        view = x.view(x.shape[0] // k, k * x.shape[1], *x.shape[2:])
        wk = torch.cat([weight] * k) if weight is not None else None  # cat: cheaper than repeat on a CPU
        bk = torch.cat([bias] * k) if bias is not None else None
        # written through a view into an (n k, C, H, W) tensor: the output itself must not be a view
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        stat_dtype = wk.dtype if wk is not None else (torch.float32 if x.dtype in (torch.float16, torch.bfloat16)
                                                      else x.dtype)
        save_mean = torch.empty(view.shape[1], dtype=stat_dtype, device=x.device)
        save_invstd = torch.empty_like(save_mean)
        torch.ops.aten.native_batch_norm.out(view, wk, bk, running_mean, running_var, True, 1.0, eps,
                                             out=y.view(view.shape), save_mean=save_mean, save_invstd=save_invstd)
        ctx.save_for_backward(view, wk, save_mean, save_invstd)
        ctx.k, ctx.eps, ctx.affine = k, eps, (weight is not None, bias is not None)
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        view, wk, save_mean, save_invstd = ctx.saved_tensors
        has_w, has_b = ctx.affine
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            gy.reshape(view.shape), view, wk, None, None, save_mean, save_invstd, True, ctx.eps,
            [ctx.needs_input_grad[0], has_w and ctx.needs_input_grad[1], has_b and ctx.needs_input_grad[2]])
        k = ctx.k
        gw = gw.view(k, -1).sum(0) if gw is not None else None
        gb = gb.view(k, -1).sum(0) if gb is not None else None
        return (gx.view(gy.shape) if gx is not None else None), gw, gb, None, None, None, None


class GroupedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with optional per-group statistics.

    ``group_layout`` (``None`` or a :class:`GroupLayout` whose sizes sum to the batch size) is a plain
    attribute, set by :func:`grouped_batches`; it is not part of the state dict.
    """

    group_layout: GroupLayout | None = None  # class default, so a swapped-in module needs no __init__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = self.group_layout
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if layout is None or len(layout.sizes) == 1 or not use_batch_stats:
            return super().forward(x)
        self._check_input_dim(x)
        if sum(layout.sizes) != x.shape[0]:
            raise ValueError(f"{_HERE}: group sizes {list(layout.sizes)} sum to {sum(layout.sizes)}, "
                             f"but the batch has {x.shape[0]} samples")
        track = self.training and self.track_running_stats
        nb = layout.block
        if nb and x.is_contiguous():
            y, means, variances = self._native_block(x, layout, track)
        else:
            y, means, variances = self._general(x, layout.group_of_row, track)
        if track:
            self._update_running(means, variances)
        return y

    def _stat_buffers(self, channels: int, x: torch.Tensor, track: bool) -> tuple[torch.Tensor | None, ...]:
        """Zeroed stand-in running buffers: with momentum 1 the native kernel writes the batch mean and the
        unbiased variance into them."""
        if not track:
            return None, None
        return torch.zeros(2, channels, dtype=self.running_mean.dtype, device=x.device).unbind(0)

    def _native_block(self, x: torch.Tensor, layout: GroupLayout, track: bool
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Interleaved block as channels of one native batch_norm; the calls after it as one group
        (native) or several (general path)."""
        k, n, c = layout.interleaved, layout.sizes[0], x.shape[1]
        nb = n * k
        rm, rv = self._stat_buffers(k * c, x, track)
        head = _BlockNorm.apply(x if nb == x.shape[0] else x[:nb], self.weight, self.bias, k, self.eps, rm, rv)
        means = [rm.view(k, c)] if track else []
        variances = [rv.view(k, c)] if track else []
        tail = layout.sizes[k:]
        if not tail:
            return head, (means[0] if track else None), (variances[0] if track else None)
        if len(tail) == 1:
            tm, tv = self._stat_buffers(c, x, track)
            rest = F.batch_norm(x[nb:], tm, tv, self.weight, self.bias, True, 1.0, self.eps)
            if track:
                means.append(tm.view(1, c))
                variances.append(tv.view(1, c))
        else:
            groups = tuple(g for g, s in enumerate(tail) for _ in range(s))
            rest, m, v = self._general(x[nb:], groups, track)
            if track:
                means.append(m)
                variances.append(v)
        y = torch.cat([head, rest])
        return y, (torch.cat(means) if track else None), (torch.cat(variances) if track else None)

    def _general(self, x: torch.Tensor, groups: tuple[int, ...], track: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Any layout: :class:`_GroupStatsNorm`; returns the output and, when tracking, the groups' means
        and unbiased variances ``(G, C)`` in group order."""
        length = x[0, 0].numel()
        counts = Counter(groups)
        if min(counts.values()) * length <= 1:
            raise ValueError(f"{_HERE}: expected more than 1 value per channel in each group "
                             f"(group sizes {[counts[g] for g in sorted(counts)]}, input {tuple(x.shape)})")
        stat_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        avg = _averaging_matrix(groups, length, stat_dtype, x.device)
        y, mean, var = _GroupStatsNorm.apply(x, self.weight, self.bias, avg, self.eps)
        if not track:
            return y, None, None
        first = _first_rows(groups, x.device)
        unbiased = var.index_select(0, first) * _bessel(groups, length, stat_dtype, x.device)
        return y, mean.index_select(0, first), unbiased

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, unbiased: torch.Tensor) -> None:
        """Equal to G sequential updates ``r <- (1 - m) r + m s_g``: with a fixed momentum in closed form
        ``r_G = (1-m)^G r_0 + sum_g m (1-m)^(G-1-g) s_g``; with ``momentum=None`` (cumulative average,
        factor ``1 / t`` after the counter's increment) ``r_G = (t_0 r_0 + sum_g s_g) / (t_0 + G)``."""
        groups = mean.shape[0]
        rm, rv = self.running_mean, self.running_var
        mean, unbiased = mean.to(rm.dtype), unbiased.to(rv.dtype)
        if self.momentum is not None:
            m = float(self.momentum)
            w = _cached(("momentum", m, groups, rm.dtype, rm.device), lambda: m * (1.0 - m) ** torch.arange(
                groups - 1, -1, -1, device=rm.device, dtype=rm.dtype))  # built on the device: no host copy
            keep = (1.0 - m) ** groups
            rm.addmv_(mean.t(), w, beta=keep)
            rv.addmv_(unbiased.t(), w, beta=keep)
        else:
            t0 = self.num_batches_tracked.to(rm.dtype)
            rm.mul_(t0).add_(mean.sum(0)).div_(t0 + groups)
            rv.mul_(t0).add_(unbiased.sum(0)).div_(t0 + groups)
        self.num_batches_tracked.add_(groups)


def _grouped_modules(model: nn.Module) -> list[GroupedBatchNorm2d]:
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    return [m for m in model.modules() if isinstance(m, GroupedBatchNorm2d)]


@contextlib.contextmanager
def grouped_batches(model: nn.Module, sizes: Sequence[int] | GroupLayout) -> Iterator[None]:
    """Within the block, every :class:`GroupedBatchNorm2d` of ``model`` computes batch statistics per
    group: contiguous sub-batches of the given sizes, or a :class:`GroupLayout` (as :func:`pack` returns).
    The previous layout is restored on exit."""
    layout = sizes if isinstance(sizes, GroupLayout) else GroupLayout(tuple(int(s) for s in sizes))
    modules = _grouped_modules(model)
    previous = [m.group_layout for m in modules]
    for m in modules:
        m.group_layout = layout
    try:
        yield
    finally:
        for m, old in zip(modules, previous):
            m.group_layout = old


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
