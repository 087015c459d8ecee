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
import functools
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

_HERE = "nets/grouped_norm.py"
IMPLS = ("loop", "one_pass")  # what grouped_batches computes; "interleaved" is set by nets/interleaved_norm.py
_unsafe_view = torch.ops.aten._unsafe_view  # a reshape that autograd does not record as a view


class GroupedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with optional per-sub-batch statistics.

    ``group_sizes`` (``None`` or a tuple of positive ints summing to the batch size) and ``impl`` are plain
    attributes set by :func:`grouped_batches`; they are not part of the state dict. Two computations
    that agree to rounding (``impl``):

    - ``loop`` (default): the native ``batch_norm`` kernel once per group, which updates the running
      buffers in order exactly as the separate calls. Fewest operations in eager mode: on a CPU at
      32 px it measured faster than ``one_pass``.
    - ``one_pass``: every group's statistics from one reduction (``var_mean`` over a ``(G, n, C, H·W)``
      view when the groups are equal; per-sample statistics pooled per group otherwise), one
      ``addcmul`` for the output, and a closed-form running update. No per-group kernels and one
      in-place update per buffer, so ``torch.compile`` can fuse it.

    A third, ``interleaved``, needs the calls' samples interleaved in the batch and is set up by
    :func:`medsemi.nets.interleaved_norm.interleaved_batches`: one native kernel per block of equal calls.
    """

    group_sizes: tuple[int, ...] | None = None  # class defaults, so a swapped-in module needs no __init__
    impl: str = "loop"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = self.group_sizes
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if sizes is None or len(sizes) == 1 or not use_batch_stats:
            return super().forward(x)
        self._check_input_dim(x)
        if sum(sizes) != x.shape[0]:
            raise ValueError(f"{_HERE}: group sizes {list(sizes)} sum to {sum(sizes)}, "
                             f"but the batch has {x.shape[0]} samples")
        if self.training and min(sizes) * x.shape[2] * x.shape[3] == 1:  # as F.batch_norm checks each call
            raise ValueError(f"{_HERE}: expected more than 1 value per channel in each group when training "
                             f"(group sizes {list(sizes)}, input {tuple(x.shape)})")
        if self.impl == "interleaved":
            return self._forward_interleaved(x)
        if self.impl == "one_pass":
            return self._forward_one_pass(x, sizes)
        return self._forward_loop(x, sizes)

    def _forward_interleaved(self, x: torch.Tensor) -> torch.Tensor:
        """One native kernel per block of equal calls on the ``(n, G·C, H, W)`` view of an interleaved batch
        (nets/interleaved_norm.py, which hands out the repeated weights and the scratch for the statistics).
        With autograd the output is re-shaped with ``_unsafe_view``, which autograd does not treat as a view:
        the U-Net's in-place ReLU on a view would add a CopySlices and an AsStrided node per layer."""
        entry = self.__dict__.get("_interleave")
        if entry is None:
            raise ValueError(f"{_HERE}: the interleaved layout is set by nets.interleaved_norm.interleaved_batches")
        plan = entry[0]
        if not x.is_contiguous():  # channels-last: the channel view needs NCHW memory
            x = x.contiguous()
        c, h, w = x.shape[1], x.shape[2], x.shape[3]
        shapes = plan.shapes
        # unsafe_split: no view bookkeeping in autograd, which is safe because nothing writes to the chunks
        chunks = torch.unsafe_split_with_sizes(x, [n * g for n, g in shapes]) if len(shapes) > 1 else (x,)
        reshape = _unsafe_view if torch.is_grad_enabled() else torch.Tensor.view
        outs = []
        for (n, g), chunk, (weight, bias, mean, var) in zip(shapes, chunks, plan.block_arguments(entry)):
            if g == 1:  # one call of this size: the chunk as it is
                outs.append(torch.native_batch_norm(chunk, weight, bias, mean, var, True, 1.0, self.eps)[0])
                continue
            y = torch.native_batch_norm(chunk.view(n, g * c, h, w), weight, bias, mean, var, True, 1.0, self.eps)[0]
            outs.append(reshape(y, chunk.shape))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _forward_loop(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """One native BatchNorm kernel per group, updating the buffers in order (exactly the sequential
        calls). Called directly (``torch.native_batch_norm`` on a CPU, ``torch.batch_norm`` elsewhere, for
        cuDNN): ``F.batch_norm``'s Python checks and the backend dispatch cost more than the kernel at small
        sizes."""
        track = self.training and self.track_running_stats
        chunks = x.split(list(sizes))
        if track and self.momentum is None:  # cumulative average: each group reads the counter it bumped
            outs = []
            for chunk in chunks:
                self.num_batches_tracked.add_(1)
                outs.append(F.batch_norm(chunk, self.running_mean, self.running_var, self.weight, self.bias,
                                         True, 1.0 / float(self.num_batches_tracked), self.eps))
            return torch.cat(outs)
        if track:
            self.num_batches_tracked.add_(len(sizes))
        rm, rv = (self.running_mean, self.running_var) if track else (None, None)
        weight, bias, eps = self.weight, self.bias, self.eps  # module attribute reads cost per group
        momentum = 0.0 if self.momentum is None else self.momentum
        if x.device.type == "cpu":  # the kernel itself, without batch_norm's backend dispatch (no cuDNN here)
            return torch.cat([torch.native_batch_norm(c, weight, bias, rm, rv, True, momentum, eps)[0]
                              for c in chunks])
        cudnn = torch.backends.cudnn.enabled
        return torch.cat([torch.batch_norm(c, weight, bias, rm, rv, True, momentum, eps, cudnn) for c in chunks])

    def _forward_one_pass(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Statistics of every group from one reduction, normalisation in one ``addcmul``.

        Unequal groups pool per-sample statistics: a group's variance is the mean of its samples'
        variances plus the variance of their means (the pairwise combination of Chan, Golub & LeVeque,
        "Updating formulae and a pairwise algorithm for computing sample variances", 1979), exact
        because every sample has the same number of pixels.
        """
        groups, c = len(sizes), x.shape[1]
        spatial = math.prod(x.shape[2:])
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if len(set(sizes)) == 1:
            x5 = xs.unflatten(0, (groups, sizes[0])).flatten(3)  # (G, n, C, H·W): a view in either layout
            var, mean = torch.var_mean(x5, dim=(1, 3), correction=0)  # (G, C)
            scale, shift = self._scale_shift(mean, var)
            y = torch.addcmul(shift[:, None, :, None], x5, scale[:, None, :, None]).reshape(x.shape)
        else:
            var_s, mean_s = torch.var_mean(xs.flatten(2), dim=2, correction=0)  # per sample: (B, C)
            average, expand, counts = _group_matrices(tuple(sizes), x.device, xs.dtype)
            mean = average @ mean_s
            between = mean_s - expand @ mean
            var = average @ (var_s + between * between)
            scale, shift = self._scale_shift(mean, var)
            per_sample = expand @ torch.cat([scale, shift], 1)  # (B, 2C)
            y = torch.addcmul(per_sample[:, c:, None, None], xs, per_sample[:, :c, None, None])
        if self.training and self.track_running_stats:
            per_group = sizes[0] if len(set(sizes)) == 1 else counts
            self._update_running(mean.detach(), var.detach(), per_group * spatial)
        return y.to(x.dtype)

    def _scale_shift(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group ``y = x * scale + shift`` of ``weight * (x - mean) / sqrt(var + eps) + bias``."""
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
            return scale, self.bias - mean * scale
        return scale, -mean * scale

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: int | torch.Tensor) -> None:
        """Apply the G sequential updates ``r <- (1 - m) r + m s_g`` (``s_g`` the unbiased variance for
        ``running_var``); with a fixed momentum in closed form
        ``r_G = (1-m)^G r_0 + sum_g m (1-m)^(G-1-g) s_g``."""
        groups = mean.shape[0]
        if isinstance(count, torch.Tensor):
            count = count.view(groups, 1)
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


@functools.lru_cache(maxsize=64)
def _group_matrices(sizes: tuple[int, ...], device: torch.device, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(average (G, B), expand (B, G), counts (G,))`` for contiguous groups of these sizes:
    ``average @ v`` is each group's mean of per-sample rows, ``expand @ s`` repeats group rows per sample.
    Built from device fills (no host-to-device copy, which would synchronise) and cached per layout."""
    group_of = torch.cat([torch.full((s,), g, device=device) for g, s in enumerate(sizes)])
    expand = (group_of[:, None] == torch.arange(len(sizes), device=device)).to(dtype)
    counts = expand.sum(0)
    return expand.t() / counts[:, None], expand, counts


def grouped_norm_modules(model: nn.Module) -> list[GroupedBatchNorm2d]:
    """The :class:`GroupedBatchNorm2d` modules of ``model`` (or of the model a ``torch.compile`` wrapper holds)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    return [m for m in model.modules() if isinstance(m, GroupedBatchNorm2d)]


@contextlib.contextmanager
def grouped_batches(model: nn.Module, sizes: Sequence[int], impl: str = "loop",
                    modules: Sequence[GroupedBatchNorm2d] | None = None) -> Iterator[None]:
    """Within the block, every :class:`GroupedBatchNorm2d` of ``model`` computes batch statistics per
    contiguous sub-batch of the given sizes, with ``impl`` (``loop`` | ``one_pass``); the previous
    layout is restored on exit. ``modules``: the model's grouped norms, when the caller has them (saves
    a walk over the model per call)."""
    sizes = tuple(int(s) for s in sizes)
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"{_HERE}: group sizes must be positive integers, got {list(sizes)}")
    if impl not in IMPLS:
        raise ValueError(f"{_HERE}: grouped norm impl must be one of {IMPLS}, got {impl!r}")
    modules = grouped_norm_modules(model) if modules is None else modules
    previous = [(m.group_sizes, m.impl) for m in modules]
    for m in modules:
        _set_layout(m, sizes, impl)
    try:
        yield
    finally:
        for m, (old_sizes, old_impl) in zip(modules, previous):
            _set_layout(m, old_sizes, old_impl)


def _set_layout(module: GroupedBatchNorm2d, sizes: tuple[int, ...] | None, impl: str) -> None:
    """Set a module's group layout, the two plain attributes, through the instance dict:
    ``nn.Module.__setattr__`` checks every value against parameters, buffers and submodules, which
    measured ~1 ms of a 45 ms UST-RUN step at 32 px (18 modules, two grouped calls, set and restored)."""
    module.__dict__["group_sizes"] = sizes
    module.__dict__["impl"] = impl


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
