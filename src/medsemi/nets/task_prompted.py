"""VerSemi's task-prompted VNet: VNet backbone + DoDNet-style dynamic head (spec ``versemi.md`` 2.2-2.3).

- Global image feature ``g = AvgPool(ReLU(BN(x5)))`` (BatchNorm3d, batch statistics in training).
- Task code: fixed one-hot of length 5 at position ``task_id - 1``; task ids are **1-based**:
  1 pancreas, 2 left atrium, 3 spleen, 4 lung tumour, 5 the synthetic "all foregrounds" task.
- Controller: 1x1x1 conv (= linear with bias) from ``[g ; one-hot]`` (256 + 5) to 180 numbers.
- Head input ``h0 = Conv1x1(ReLU(BN(F)))``, f -> 8 channels (``precls_conv``).
- The 180 numbers split, in order, into W1 (8x8), W2 (8x8), W3 (2x8), W4 (2x8), b1 (8), b2 (8),
  b3 (2), b4 (2) (output-channel-major weights), and the per-sample head is
  ``h1 = ReLU(W1 h0 + b1); h2 = ReLU(W2 h1 + b2); z = W3 h2 + b3; z' = W4 h2 + b4``.
  ``z`` (2-way softmax logits: background, foreground) is the only output used; ``z'`` (the unused
  "tumour" output) is computed only on request (``return_aux``); its controller rows get no
  gradient either way, exactly as in the original.

Shared backbone (spec 2.3): the task id changes only the controller output, so querying the same
images with T task ids is one backbone pass plus T cheap heads (``forward_tasks``): identical
values and gradients; only the BatchNorm running statistics get one momentum update instead of T
(``bn_update_per_query=True`` replays the T updates in closed form, spec note N16).

With the spec defaults (1 input channel, 16 base filters) the model has 9,484,144 parameters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from medsemi.nets.vnet import VNet

__all__ = [
    "NUM_TASKS",
    "SYNTHETIC_TASK",
    "HEAD_CHANNELS",
    "HEAD_OUT",
    "DynamicHeadParams",
    "SharedFeatures",
    "TaskPromptedVNet",
    "dynamic_head",
    "head_param_count",
    "split_head_params",
    "task_onehot",
]

NUM_TASKS = 5
SYNTHETIC_TASK = 5
HEAD_CHANNELS = 8
HEAD_OUT = 2
HeadImpl = Literal["einsum", "grouped"]


def head_param_count(channels: int = HEAD_CHANNELS, out: int = HEAD_OUT) -> int:
    """Controller output size: 2 hidden layers (c x c) and 2 parallel output layers (out x c) + biases."""
    return 2 * channels * channels + 2 * out * channels + 2 * channels + 2 * out


class DynamicHeadParams(NamedTuple):
    """Per-query head parameters; leading dims ``(B, T)``. Weights are ``(..., out, in)``."""

    w1: torch.Tensor
    w2: torch.Tensor
    w3: torch.Tensor
    w4: torch.Tensor
    b1: torch.Tensor
    b2: torch.Tensor
    b3: torch.Tensor
    b4: torch.Tensor


class SharedFeatures(NamedTuple):
    """Task-independent part of the forward: ``g`` (B, 16f) and the head input ``h0`` (B, 8, *S)."""

    g: torch.Tensor
    h0: torch.Tensor


def split_head_params(
    params: torch.Tensor, channels: int = HEAD_CHANNELS, out: int = HEAD_OUT
) -> DynamicHeadParams:
    """Split the controller output ``(..., 180)`` in the original's order W1, W2, W3, W4, b1, b2, b3, b4."""
    n = head_param_count(channels, out)
    if params.shape[-1] != n:
        raise ValueError(f"nets/task_prompted.py: expected {n} head parameters, got {params.shape[-1]}")
    c, o = channels, out
    sizes = [c * c, c * c, o * c, o * c, c, c, o, o]
    w1, w2, w3, w4, b1, b2, b3, b4 = torch.split(params, sizes, dim=-1)
    lead = params.shape[:-1]
    return DynamicHeadParams(
        w1.reshape(*lead, c, c),
        w2.reshape(*lead, c, c),
        w3.reshape(*lead, o, c),
        w4.reshape(*lead, o, c),
        b1,
        b2,
        b3,
        b4,
    )


def task_onehot(
    task_ids: torch.Tensor, num_tasks: int = NUM_TASKS, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """One-hot of 1-based task ids at position ``id - 1``; built by comparison, no host sync.

    Out-of-range ids raise through an asynchronous device assert (no sync on CUDA).
    """
    if task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool:
        raise TypeError(f"nets/task_prompted.py: task ids must be an integer tensor, got {task_ids.dtype}")
    torch._assert_async(
        ((task_ids >= 1) & (task_ids <= num_tasks)).all(),
        f"nets/task_prompted.py: task ids must be in 1..{num_tasks}",
    )
    codes = torch.arange(1, num_tasks + 1, device=task_ids.device)
    return (task_ids.unsqueeze(-1) == codes).to(dtype)


def dynamic_head(
    h0: torch.Tensor, p: DynamicHeadParams, impl: HeadImpl = "einsum", return_aux: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Apply the per-query dynamic 1x1x1 head (spec 2.2 step 6) on shared features, batched.

    ``h0``: ``(B, C, *S)``; ``p``: parameters with leading dims ``(B, T)``. Returns ``z`` of shape
    ``(B, T, out, *S)`` (and ``z'`` with ``return_aux``). ``impl='einsum'`` is a batched matrix
    product; ``impl='grouped'`` is the original's grouped convolution (groups = samples, 3D only).
    """
    b, c = h0.shape[:2]
    spatial = h0.shape[2:]
    if p.w1.dim() != 4 or p.w1.shape[0] != b or p.w1.shape[-1] != c:
        raise ValueError(
            f"nets/task_prompted.py: head parameters {tuple(p.w1.shape)} do not match "
            f"features {tuple(h0.shape)}"
        )
    t = p.w1.shape[1]
    if impl == "einsum":
        x = h0.flatten(2)  # (B, C, S)
        h1 = F.relu(torch.einsum("btoi,bis->btos", p.w1, x) + p.b1.unsqueeze(-1))
        h2 = F.relu(torch.einsum("btoi,btis->btos", p.w2, h1) + p.b2.unsqueeze(-1))
        z = torch.einsum("btoi,btis->btos", p.w3, h2) + p.b3.unsqueeze(-1)
        z = z.reshape(b, t, -1, *spatial)
        if not return_aux:
            return z
        z2 = torch.einsum("btoi,btis->btos", p.w4, h2) + p.b4.unsqueeze(-1)
        return z, z2.reshape(b, t, -1, *spatial)
    if impl == "grouped":
        if h0.dim() != 5:
            raise ValueError("nets/task_prompted.py: the grouped-conv head is 3D only; use impl='einsum'")
        x = h0.reshape(1, b * c, *spatial)

        def conv(inp: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, groups: int) -> torch.Tensor:
            return F.conv3d(inp, w.reshape(-1, w.shape[-1], 1, 1, 1), bias.reshape(-1), groups=groups)

        # first layer: group = sample (C inputs), T*8 outputs per group; later layers: group = query
        h1 = F.relu(conv(x, p.w1, p.b1, b))
        h2 = F.relu(conv(h1, p.w2, p.b2, b * t))
        z = conv(h2, p.w3, p.b3, b * t).reshape(b, t, -1, *spatial)
        if not return_aux:
            return z
        return z, conv(h2, p.w4, p.b4, b * t).reshape(b, t, -1, *spatial)
    raise ValueError(f"nets/task_prompted.py: unknown head impl {impl!r} (use 'einsum' or 'grouped')")


class TaskPromptedVNet(nn.Module):
    """VerSemi network (``vnet_odod_mix.py``): VNet backbone + controller + dynamic head.

    ``forward(image (B, C, D, H, W), task_ids (B,) long, 1-based) -> logits (B, 2, D, H, W)``;
    ``forward_tasks(image, task_ids (B, T) or (T,)) -> logits (B, T, 2, D, H, W)`` with one backbone pass.
    """

    takes_task_ids = True  # forward(image, task_ids): evaluation queries it with each volume's task

    def __init__(
        self,
        in_channels: int = 1,
        base_filters: int = 16,
        num_tasks: int = NUM_TASKS,
        head_channels: int = HEAD_CHANNELS,
        out_channels: int = HEAD_OUT,
        dropout: float = 0.0,
        head_impl: HeadImpl = "einsum",
        bn_update_per_query: bool = False,
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"nets/task_prompted.py: num_tasks must be >= 1, got {num_tasks}")
        if head_impl not in ("einsum", "grouped"):
            raise ValueError(f"nets/task_prompted.py: unknown head impl {head_impl!r}")
        self.num_tasks = num_tasks
        self.head_channels = head_channels
        self.out_channels = out_channels
        self.head_impl: HeadImpl = head_impl
        self.bn_update_per_query = bn_update_per_query
        self.backbone = VNet(in_channels, base_filters, dropout=dropout)
        bott = self.backbone.bottleneck_channels
        self.gap = nn.Sequential(nn.BatchNorm3d(bott), nn.ReLU(inplace=True), nn.AdaptiveAvgPool3d(1))
        self.controller = nn.Conv3d(bott + num_tasks, head_param_count(head_channels, out_channels), 1)
        f = self.backbone.out_channels
        self.precls_conv = nn.Sequential(
            nn.BatchNorm3d(f), nn.ReLU(inplace=True), nn.Conv3d(f, head_channels, 1)
        )

    # -- pieces --------------------------------------------------------------------------------
    def features(self, image: torch.Tensor, bn_updates: int = 1) -> SharedFeatures:
        """Backbone + GAP + ``precls_conv``: everything that does not depend on the task id.

        ``bn_updates`` > 1 replays that many BatchNorm running-statistics updates (same batch
        statistics each time), as ``bn_updates`` separate forwards would do.
        """
        x5, feat = self.backbone(image)
        with self._bn_momentum(bn_updates):
            g = self.gap(x5).flatten(1)
            h0 = self.precls_conv(feat)
        return SharedFeatures(g, h0)

    def head_params(self, g: torch.Tensor, task_ids: torch.Tensor) -> DynamicHeadParams:
        """Controller on ``[g ; one-hot(task)]`` for each query: ``task_ids`` (B, T) -> params (B, T, ...)."""
        b, t = task_ids.shape
        code = task_onehot(task_ids, self.num_tasks, g.dtype)  # (B, T, K)
        cond = torch.cat([g.unsqueeze(1).expand(b, t, g.shape[1]), code], dim=-1)
        params = self.controller(cond.reshape(b * t, -1, 1, 1, 1)).reshape(b, t, -1)
        return split_head_params(params, self.head_channels, self.out_channels)

    def heads(
        self, feats: SharedFeatures, task_ids: torch.Tensor, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Evaluate every task query on shared features: ``task_ids`` (B, T) -> (B, T, 2, *S)."""
        task_ids = self._query_ids(task_ids, feats.h0.shape[0])
        return dynamic_head(feats.h0, self.head_params(feats.g, task_ids), self.head_impl, return_aux)

    # -- public forwards -----------------------------------------------------------------------
    def forward(
        self, image: torch.Tensor, task_ids: torch.Tensor, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One query per sample: ``task_ids`` (B,) -> logits (B, 2, D, H, W) (2-way softmax)."""
        if task_ids.dim() != 1 or task_ids.shape[0] != image.shape[0]:
            raise ValueError(
                f"nets/task_prompted.py: forward needs task_ids of shape ({image.shape[0]},), "
                f"got {tuple(task_ids.shape)}"
            )
        out = self.forward_tasks(image, task_ids.unsqueeze(1), return_aux)
        if return_aux:
            return out[0][:, 0], out[1][:, 0]
        return out[:, 0]

    def forward_tasks(
        self, image: torch.Tensor, task_ids: torch.Tensor, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Shared-backbone path (spec 2.3): one backbone pass, T heads. Returns (B, T, 2, D, H, W).

        ``task_ids``: (B, T) per-sample queries, or (T,) applied to every sample.
        """
        task_ids = self._query_ids(task_ids, image.shape[0])
        n_upd = task_ids.shape[1] if (self.bn_update_per_query and self.training) else 1
        return self.heads(self.features(image, bn_updates=n_upd), task_ids, return_aux)

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _query_ids(task_ids: torch.Tensor, batch: int) -> torch.Tensor:
        if task_ids.dim() == 1:
            task_ids = task_ids.unsqueeze(0).expand(batch, -1)
        if task_ids.dim() != 2 or task_ids.shape[0] != batch:
            raise ValueError(
                f"nets/task_prompted.py: task_ids must be (B, T) or (T,) with B = {batch}, "
                f"got {tuple(task_ids.shape)}"
            )
        return task_ids

    @contextmanager
    def _bn_momentum(self, updates: int) -> Iterator[None]:
        """Temporarily set the BN momentum so one update equals ``updates`` updates with the same stats.

        r_k = (1 - m)^k r_0 + (1 - (1 - m)^k) s, hence momentum_eff = 1 - (1 - m)^k (spec note N16).
        """
        bns = [m for m in (self.gap[0], self.precls_conv[0]) if isinstance(m, nn.BatchNorm3d)]
        if updates <= 1 or not self.training:
            yield
            return
        saved = [bn.momentum for bn in bns]
        if any(m is None for m in saved):
            raise ValueError("nets/task_prompted.py: bn_update_per_query needs a float BatchNorm momentum")
        try:
            for bn, m in zip(bns, saved):
                bn.momentum = 1.0 - (1.0 - m) ** updates
            yield
        finally:
            for bn, m in zip(bns, saved):
                bn.momentum = m
                if bn.track_running_stats and bn.num_batches_tracked is not None:
                    bn.num_batches_tracked.add_(updates - 1)
