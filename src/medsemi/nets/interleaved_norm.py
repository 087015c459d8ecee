"""Grouped BatchNorm with the calls interleaved: equal calls become channel groups of one native kernel.

``forward_mode=grouped`` normalises each call of a fused forward with its own batch statistics
(:mod:`medsemi.nets.grouped_norm`). Here the batch holds the calls of ``n`` samples each *interleaved*
(sample ``i`` of every call side by side: ``x_0[0], x_1[0], ..., x_0[1], x_1[1], ...``). An NCHW
activation of shape ``(n·G, C, H, W)`` is then, without a copy, a ``(n, G·C, H, W)`` tensor whose channel
``g·C + c`` holds exactly channel ``c`` of call ``g``. One native BatchNorm over that view computes every
call's statistics and normalises; with momentum 1 its running-statistics output, written into a scratch
buffer, is each call's mean and unbiased variance. Calls of another size form another block.

Per network forward, the weights and biases of every grouped BatchNorm are repeated in one
``index_select``, and after the forward the running buffers of all of them are updated at once (one
``index_add`` and one ``_foreach_copy_``), in closed form equal to the sequential momentum updates (as in
``GroupedBatchNorm2d._update_running``). In eager mode a layer whose calls all have the same size then
costs what the fused forward's single kernel costs, instead of one kernel per call plus a split and a
concatenation; calls of two sizes (UST-RUN's one-sample call) cost two kernels, a split and a
concatenation.

Needs NCHW activations (a channels-last input is made contiguous first, which is correct but slower) and a
fixed momentum; :func:`interleave_blocker` says when it does not fit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from medsemi.nets.grouped_norm import GroupedBatchNorm2d

_HERE = "nets/interleaved_norm.py"
_MAX_PLANS = 16  # layouts x module states kept per network (a step uses two or three)


@dataclass(frozen=True)
class CallLayout:
    """Where each call's samples sit in an interleaved batch.

    ``blocks``: one ``(n, calls)`` per distinct call size ``n``, in order of first appearance, ``calls``
    the indices of the calls of that size in call order. A block holds ``n · len(calls)`` samples, sample
    ``i`` of its ``j``-th call at ``i · len(calls) + j``.
    """

    sizes: tuple[int, ...]
    blocks: tuple[tuple[int, tuple[int, ...]], ...]

    @classmethod
    def of(cls, sizes: Sequence[int]) -> CallLayout:
        sizes = tuple(int(s) for s in sizes)
        if not sizes or any(s <= 0 for s in sizes):
            raise ValueError(f"{_HERE}: call sizes must be positive integers, got {list(sizes)}")
        by_size: dict[int, list[int]] = {}
        for i, s in enumerate(sizes):
            by_size.setdefault(s, []).append(i)
        return cls(sizes, tuple((n, tuple(calls)) for n, calls in by_size.items()))

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        """``(samples per call, calls)`` of each block."""
        return tuple((n, len(calls)) for n, calls in self.blocks)

    def arrange(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The interleaved batch of the calls' inputs (one copy, like ``torch.cat``)."""
        if [len(x) for x in inputs] != list(self.sizes):
            raise ValueError(f"{_HERE}: inputs of sizes {[len(x) for x in inputs]} for a layout of {list(self.sizes)}")
        # concatenating (n, C, ...) calls along dim 1 lays sample i of every call side by side
        parts = [inputs[calls[0]] if len(calls) == 1
                 else torch.cat([inputs[i] for i in calls], 1).reshape(n * len(calls), *inputs[calls[0]].shape[1:])
                 for n, calls in self.blocks]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def split(self, out: torch.Tensor) -> list[torch.Tensor]:
        """Each call's rows of a network output on :meth:`arrange`'s batch (strided views, in call order)."""
        parts = out.split([n * len(calls) for n, calls in self.blocks]) if len(self.blocks) > 1 else (out,)
        per_call: list[torch.Tensor] = [out] * len(self.sizes)
        for (n, calls), part in zip(self.blocks, parts):
            rows = part.unflatten(0, (n, len(calls))).unbind(1) if len(calls) > 1 else (part,)
            for i, row in zip(calls, rows):
                per_call[i] = row
        return per_call


def interleave_blocker(net: nn.Module, modules: Sequence[GroupedBatchNorm2d]) -> str | None:
    """Why the interleaved computation does not suit ``net`` (``None`` when it does)."""
    if hasattr(net, "_orig_mod"):
        return ("the network is compiled (torch.compile); the interleaved plan hands tensors to the modules "
                "from outside the traced forward")
    if any(m.momentum is None and m.track_running_stats for m in modules):
        return ("a BatchNorm uses a cumulative average (momentum=None); the closed-form running update "
                "needs a fixed momentum")
    if any(p.dim() == 4 and not p.is_contiguous() for p in net.parameters()):
        return "the network is channels-last; the (n, G·C) channel view needs NCHW activations"
    return None


class _Plan:
    """The index tensors for one layout and one set of active modules, built once on the device (from
    device fills, no host-to-device copy). Per forward, :meth:`hand_out` fills ``weights`` (the repeated
    weight and bias chunks) and ``stats`` (scratch slices); each module finds its own through the
    positions in its ``_interleave`` entry."""

    def __init__(self, layout: CallLayout, modules: Sequence[GroupedBatchNorm2d], device: torch.device,
                 param_dtype: torch.dtype | None, stat_dtype: torch.dtype) -> None:
        calls, blocks = len(layout.sizes), len(layout.blocks)
        self.shapes, self.calls = layout.shapes, calls
        self.modules = list(modules)
        self.affine = [m for m in modules if m.affine]
        self.folded = [m for m in modules if m.training and m.track_running_stats]
        if any(m.momentum is None for m in self.folded):
            raise ValueError(f"{_HERE}: a BatchNorm with momentum=None (cumulative average) cannot be "
                             "updated in closed form; use method.grouped_norm=loop")
        self.device, self.param_dtype, self.stat_dtype = device, param_dtype, stat_dtype
        self.weights: list[torch.Tensor] = []
        self.stats: list[torch.Tensor] = []

        def arange(c: int) -> torch.Tensor:
            return torch.arange(c, device=device)

        # weights: an index into cat(weights + biases) that repeats each weight once per call of a block
        widths = [m.num_features for m in self.affine]
        offsets = [sum(widths[:i]) for i in range(len(widths))]
        index = [arange(c).repeat(g) + o for o, c in zip(offsets, widths) for _, g in self.shapes]
        self.index = (torch.cat(index + [i + sum(widths) for i in index]) if index
                      else torch.zeros(0, dtype=torch.long, device=device))
        self.weight_chunks = [c * g for c in widths for _, g in self.shapes] * 2
        # statistics: per folded module and block, the kernel writes G·C means, then G·C unbiased variances,
        # into one flat scratch; the fold takes running = (1-m)^G running + sum_g m (1-m)^(G-1-g) s_g
        # (g the call's index in call order) from it with one index_add
        widths = [m.num_features for m in self.folded]
        offsets = [sum(widths[:i]) for i in range(len(widths))]
        width = sum(widths)
        self.stat_chunks, target, factor = [], [], []
        for o, m in zip(offsets, self.folded):
            c, mom = m.num_features, float(m.momentum)
            for _, block_calls in layout.blocks:
                self.stat_chunks += [c * len(block_calls)] * 2
                weights = [torch.full((c,), mom * (1.0 - mom) ** (calls - 1 - g), device=device, dtype=stat_dtype)
                           for g in block_calls]
                for part in (o, width + o):  # the means' rows, then the variances'
                    target += [arange(c) + part] * len(block_calls)
                    factor += weights
        self.target = torch.cat(target) if target else torch.zeros(0, dtype=torch.long, device=device)
        self.factor = torch.cat(factor) if factor else torch.zeros(0, device=device, dtype=stat_dtype)
        keep = [torch.full((m.num_features,), (1.0 - float(m.momentum)) ** calls, device=device, dtype=stat_dtype)
                for m in self.folded]
        self.keep = torch.cat(keep * 2) if keep else torch.zeros(0, device=device, dtype=stat_dtype)
        self.running_widths = widths * 2
        self.one = torch.ones((), dtype=torch.long, device=device)
        # each module's entry: this plan and where its chunks start (-1: none)
        affine_at = {id(m): k * blocks for k, m in enumerate(self.affine)}
        folded_at = {id(m): 2 * k * blocks for k, m in enumerate(self.folded)}
        half = len(self.weight_chunks) // 2
        self.entries = [(self, affine_at.get(id(m), -1), half, folded_at.get(id(m), -1)) for m in self.modules]

    def hand_out(self) -> torch.Tensor:
        """This forward's repeated weights (with autograd to the parameters: one ``cat`` and one
        ``index_select`` for the whole network) and slices of a fresh statistics scratch, returned. (A
        fresh one per forward: the kernel saves its running-statistics arguments for backward, so reusing
        one in place would fail the backward of an earlier forward.)"""
        if self.affine:
            params = torch.cat([m.weight for m in self.affine] + [m.bias for m in self.affine])
            self.weights = params.index_select(0, self.index).split(self.weight_chunks)
        scratch = torch.zeros(sum(self.stat_chunks), device=self.device, dtype=self.stat_dtype)
        self.stats = scratch.split(self.stat_chunks) if self.folded else ()
        return scratch

    def block_arguments(self, entry: tuple) -> list[tuple]:
        """``(weight, bias, running mean, running var)`` per block for the module with this entry."""
        _, a, half, f = entry
        w, st = self.weights, self.stats
        return [(w[a + j] if a >= 0 else None, w[half + a + j] if a >= 0 else None,
                 st[f + 2 * j] if f >= 0 else None, st[f + 2 * j + 1] if f >= 0 else None)
                for j in range(len(self.shapes))]

    @torch.no_grad()
    def fold(self, scratch: torch.Tensor) -> None:
        """Apply every call's momentum update to every running buffer from this forward's scratch.
        (On CUDA, ``index_add_`` sums with atomics, so the last bit may vary between runs unless
        ``train.deterministic=true``, as for cuDNN's convolutions.)"""
        if not self.folded:
            return
        # the buffers are read now, not kept: .to() or an assignment may have replaced them since
        running = ([m._buffers["running_mean"] for m in self.folded]
                   + [m._buffers["running_var"] for m in self.folded])
        updated = torch.cat(running).mul_(self.keep).index_add_(0, self.target, scratch * self.factor)
        torch._foreach_copy_(running, list(updated.split(self.running_widths)))  # a C++ loop, no scalar wrapping
        counters = [m._buffers["num_batches_tracked"] for m in self.folded]
        torch._foreach_add_(counters, [self.one] * len(counters), alpha=self.calls)


@contextlib.contextmanager
def interleaved_batches(net: nn.Module, modules: Sequence[GroupedBatchNorm2d], layout: CallLayout) -> Iterator[None]:
    """Within the block, ``net``'s grouped BatchNorms treat the batch as :meth:`CallLayout.arrange` built it;
    the running buffers are updated when the block ends without an error. The caller checks
    :func:`interleave_blocker` first."""
    plan = _plan_for(net, layout, modules)
    scratch = plan.hand_out()
    for m, entry in zip(plan.modules, plan.entries):
        d = m.__dict__
        d["group_sizes"], d["impl"], d["_interleave"] = layout.sizes, "interleaved", entry
    try:
        yield
    finally:
        for m in plan.modules:
            d = m.__dict__
            del d["group_sizes"], d["impl"], d["_interleave"]  # back to the class defaults: no layout
        plan.weights, plan.stats = [], []  # no reference to this forward's graph stays behind
    plan.fold(scratch)


def _plan_for(net: nn.Module, layout: CallLayout, modules: Sequence[GroupedBatchNorm2d]) -> _Plan:
    """The cached plan for this layout and the modules' train/eval states (built at first use). Active
    modules are those that normalise with batch statistics (training, or without running buffers)."""
    key = (layout.sizes, tuple(m.training for m in modules))  # track_running_stats is fixed per module
    plans = net.__dict__.setdefault("_interleave_plans", {})
    plan = plans.get(key)
    probe = next(iter(modules[0]._parameters.values()), None) if modules else None
    if plan is None or (probe is not None and (probe.device, probe.dtype) != (plan.device, plan.param_dtype)):
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        active = [m for m in modules if m.training or not m.track_running_stats]
        stat = next((m._buffers["running_mean"] for m in active if m.track_running_stats), None)
        device = probe.device if probe is not None else torch.device("cpu")
        plan = plans[key] = _Plan(layout, active, device, probe.dtype if probe is not None else None,
                                  stat.dtype if stat is not None else torch.float32)
    return plan
