"""VNet backbone of VerSemi (spec ``versemi.md`` section 2.1, ``vnet_odod_mix.py``).

Plain (non-residual) VNet encoder-decoder, 3D:

- every 3x3x3 conv has padding 1 and a bias and is followed by InstanceNorm3d (PyTorch defaults:
  no affine, no running statistics, eps 1e-5) and ReLU;
- down-sampling: 2x2x2 conv, stride 2 -> IN -> ReLU; up-sampling: 2x2x2 transposed conv, stride 2
  -> IN -> ReLU;
- stages: 1, 2, 3, 3, 3 convs in the encoder (widths f, 2f, 4f, 8f, 16f), 3, 3, 2 in the decoder;
  skips are *additions* of x4, x3, x2; there is **no** skip from x1, no ``block_nine`` and no output
  conv. The decoder ends with ``block_eight_up`` (2f -> f at full resolution), the feature ``F``.

The network returns the two features the task-prompted head needs: the bottleneck ``x5``
(for the global image feature) and the full-resolution decoder feature ``F``.
PyTorch default initialisation (the original does no custom init).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["VNet", "VNetFeatures", "ConvStage", "DownBlock", "UpBlock", "SegVNet"]


class VNetFeatures(NamedTuple):
    """``bottleneck``: x5, ``(B, 16f, D/16, H/16, W/16)``; ``decoder``: F, ``(B, f, D, H, W)``."""

    bottleneck: torch.Tensor
    decoder: torch.Tensor


def _conv_in_relu(conv: nn.Module, channels: int) -> list[nn.Module]:
    return [conv, nn.InstanceNorm3d(channels), nn.ReLU(inplace=True)]


class ConvStage(nn.Sequential):
    """``n_stages`` x (conv3x3x3 + IN + ReLU); the first conv maps ``in_ch`` -> ``out_ch``."""

    def __init__(self, n_stages: int, in_ch: int, out_ch: int) -> None:
        layers: list[nn.Module] = []
        for i in range(n_stages):
            layers += _conv_in_relu(nn.Conv3d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1), out_ch)
        super().__init__(*layers)


class DownBlock(nn.Sequential):
    """2x2x2 stride-2 conv + IN + ReLU."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(*_conv_in_relu(nn.Conv3d(in_ch, out_ch, 2, stride=2), out_ch))


class UpBlock(nn.Sequential):
    """2x2x2 stride-2 transposed conv + IN + ReLU."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(*_conv_in_relu(nn.ConvTranspose3d(in_ch, out_ch, 2, stride=2), out_ch))


class VNet(nn.Module):
    """VerSemi's VNet backbone (spec 2.1). ``base_filters`` = f (spec: 16).

    ``dropout``: probability of a Dropout3d on x5 (the original's ``has_dropout`` path, p = 0.5,
    which ``train.py`` never activates); 0 (default) = no dropout module, as in every released run.
    Spatial sizes must be divisible by 16 (four stride-2 levels), with more than one bottleneck voxel.
    """

    DOWNSAMPLE = 16

    def __init__(self, in_channels: int = 1, base_filters: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        if in_channels < 1 or base_filters < 1:
            raise ValueError(
                f"nets/vnet.py: in_channels and base_filters must be >= 1, got {in_channels}, {base_filters}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"nets/vnet.py: dropout must be in [0, 1), got {dropout}")
        f = base_filters
        self.in_channels = in_channels
        self.base_filters = f
        self.out_channels = f
        self.bottleneck_channels = 16 * f
        self.block_one = ConvStage(1, in_channels, f)
        self.block_one_dw = DownBlock(f, 2 * f)
        self.block_two = ConvStage(2, 2 * f, 2 * f)
        self.block_two_dw = DownBlock(2 * f, 4 * f)
        self.block_three = ConvStage(3, 4 * f, 4 * f)
        self.block_three_dw = DownBlock(4 * f, 8 * f)
        self.block_four = ConvStage(3, 8 * f, 8 * f)
        self.block_four_dw = DownBlock(8 * f, 16 * f)
        self.block_five = ConvStage(3, 16 * f, 16 * f)
        self.block_five_up = UpBlock(16 * f, 8 * f)
        self.block_six = ConvStage(3, 8 * f, 8 * f)
        self.block_six_up = UpBlock(8 * f, 4 * f)
        self.block_seven = ConvStage(3, 4 * f, 4 * f)
        self.block_seven_up = UpBlock(4 * f, 2 * f)
        self.block_eight = ConvStage(2, 2 * f, 2 * f)
        self.block_eight_up = UpBlock(2 * f, f)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else None

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"nets/vnet.py: expected an image batch (B, {self.in_channels}, D, H, W), "
                f"got {tuple(x.shape)}"
            )
        bad = [s for s in x.shape[2:] if s % self.DOWNSAMPLE]
        if bad:
            raise ValueError(
                f"nets/vnet.py: spatial sizes must be divisible by {self.DOWNSAMPLE}, "
                f"got {tuple(x.shape[2:])}"
            )
        if x.shape[2:].numel() <= self.DOWNSAMPLE**3:
            raise ValueError(
                "nets/vnet.py: the bottleneck (input / 16) needs more than one voxel for InstanceNorm, "
                f"got input {tuple(x.shape[2:])}; use e.g. 32^3"
            )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Encoder: returns (x1, x2, x3, x4, x5). x1 is computed but unused by the decoder (spec 2.1)."""
        self._check_input(x)
        x1 = self.block_one(x)
        x2 = self.block_two(self.block_one_dw(x1))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.block_four(self.block_three_dw(x3))
        x5 = self.block_five(self.block_four_dw(x4))
        if self.dropout is not None:
            x5 = self.dropout(x5)
        return x1, x2, x3, x4, x5

    def decode(self, x2: torch.Tensor, x3: torch.Tensor, x4: torch.Tensor, x5: torch.Tensor) -> torch.Tensor:
        """Decoder with additive skips x4, x3, x2 and no x1 skip (spec 2.1)."""
        x = self.block_six(self.block_five_up(x5) + x4)
        x = self.block_seven(self.block_six_up(x) + x3)
        x = self.block_eight(self.block_seven_up(x) + x2)
        return self.block_eight_up(x)

    def forward(self, x: torch.Tensor) -> VNetFeatures:
        _, x2, x3, x4, x5 = self.encode(x)
        return VNetFeatures(bottleneck=x5, decoder=self.decode(x2, x3, x4, x5))


class SegVNet(nn.Module):
    """Plain single-task VNet: the VerSemi backbone (:class:`VNet`) and a 1x1x1 conv head with a fixed
    number of outputs (2 for one binary task); ``forward(x) -> logits (B, out_channels, D, H, W)``.

    The lineage's VNet (UA-MT ``networks/vnet.py``, reused by BCP and SSL4MIS) differs: residual-free
    stages like ours but BatchNorm instead of InstanceNorm, a skip from x1 and one more decoder stage
    (``block_nine``) before the head. ``dropout > 0`` puts a Dropout3d of that probability on the
    bottleneck x5 *and* on the decoder feature before the head, where the lineage's ``has_dropout=True``
    puts its two Dropout3d(0.5); 0 (default) = no dropout.
    """

    takes_task_ids = False  # forward(x): evaluation does not pass a task prompt

    def __init__(self, in_channels: int = 1, out_channels: int = 2, base_filters: int = 16,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if out_channels < 1:
            raise ValueError(f"nets/vnet.py: out_channels must be >= 1, got {out_channels}")
        self.backbone = VNet(in_channels, base_filters, dropout)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else None
        self.head = nn.Conv3d(base_filters, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature = self.backbone(x).decoder
        if self.dropout is not None:
            feature = self.dropout(feature)
        return self.head(feature)
