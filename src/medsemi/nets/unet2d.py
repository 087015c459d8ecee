"""2D U-Net in the widely used "Pytorch-UNet" layout (spec ust-run.md 3.1).

Encoder ``inc`` + ``down1..4`` (MaxPool 2x2 then DoubleConv, widths b, 2b, 4b, 8b, 16b), decoder ``up1..4``
(ConvTranspose 2x2 stride 2 halving the channels, pad to the skip's size, concatenate ``[skip, up]``,
DoubleConv) and a 1x1 head. DoubleConv = [Conv3x3 (no bias) -> norm -> ReLU] x 2. No dropout by default;
``dropout > 0`` adds one Dropout2d on the bottleneck (UA-MT's stochastic teacher passes need dropout).
With ``in_channels=3, out_channels=2, base_channels=64`` it has exactly 31,037,698 parameters.

BatchNorm layers are created through ``norm_layer`` (a ``Callable[[int], nn.Module]``) so a grouped-statistics
BatchNorm can be swapped in without touching this file.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

NormFactory = Callable[[int], nn.Module]


class DoubleConv(nn.Module):
    """[Conv3x3 (padding 1, no bias) -> norm -> ReLU] x 2 (spec 3.1)."""

    def __init__(self, in_ch: int, out_ch: int, mid_ch: int | None = None,
                 norm_layer: NormFactory = nn.BatchNorm2d) -> None:
        super().__init__()
        mid = out_ch if mid_ch is None else mid_ch
        self.block = nn.Sequential(
            nn.Conv2d(in_ch, mid, kernel_size=3, padding=1, bias=False),
            norm_layer(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_ch, kernel_size=3, padding=1, bias=False),
            norm_layer(out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Down(nn.Module):
    """MaxPool 2x2 then DoubleConv."""

    def __init__(self, in_ch: int, out_ch: int, norm_layer: NormFactory = nn.BatchNorm2d) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = DoubleConv(in_ch, out_ch, norm_layer=norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class Up(nn.Module):
    """Upsample, pad to the skip's size, concatenate ``[skip, up]``, DoubleConv.

    ``bilinear=False`` (the spec's setting): ConvTranspose 2x2 stride 2 with bias, ``in_ch -> in_ch // 2``.
    ``bilinear=True``: bilinear x2 upsampling and a DoubleConv with ``mid = in_ch // 2`` (Pytorch-UNet variant).
    """

    def __init__(self, in_ch: int, out_ch: int, bilinear: bool = False,
                 norm_layer: NormFactory = nn.BatchNorm2d) -> None:
        super().__init__()
        self.up: nn.Module
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_ch, out_ch, mid_ch=in_ch // 2, norm_layer=norm_layer)
        else:
            self.up = nn.ConvTranspose2d(in_ch, in_ch // 2, kernel_size=2, stride=2, bias=True)
            self.conv = DoubleConv(in_ch, out_ch, norm_layer=norm_layer)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        dh = skip.shape[-2] - x.shape[-2]
        dw = skip.shape[-1] - x.shape[-1]
        if dh != 0 or dw != 0:  # shapes are static metadata: no host sync
            x = F.pad(x, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class UNet2D(nn.Module):
    """2D U-Net (spec ust-run.md 3.1); returns raw logits ``(B, out_channels, H, W)``.

    Any ``H, W >= 16`` works; sizes not divisible by 16 go through the padding path.
    """

    def __init__(self, in_channels: int, out_channels: int, base_channels: int = 64, bilinear: bool = False,
                 norm_layer: NormFactory = nn.BatchNorm2d, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"nets/unet2d.py: dropout must be in [0, 1), got {dropout}")
        for name, val in (("in_channels", in_channels), ("out_channels", out_channels),
                          ("base_channels", base_channels)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"nets/unet2d.py: UNet2D {name} must be a positive int, got {val!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.base_channels = base_channels
        self.bilinear = bilinear
        b = base_channels
        factor = 2 if bilinear else 1
        self.inc = DoubleConv(in_channels, b, norm_layer=norm_layer)
        self.down1 = Down(b, 2 * b, norm_layer)
        self.down2 = Down(2 * b, 4 * b, norm_layer)
        self.down3 = Down(4 * b, 8 * b, norm_layer)
        self.down4 = Down(8 * b, 16 * b // factor, norm_layer)
        self.up1 = Up(16 * b, 8 * b // factor, bilinear, norm_layer)
        self.up2 = Up(8 * b, 4 * b // factor, bilinear, norm_layer)
        self.up3 = Up(4 * b, 2 * b // factor, bilinear, norm_layer)
        self.up4 = Up(2 * b, b, bilinear, norm_layer)
        self.outc = nn.Conv2d(b, out_channels, kernel_size=1, bias=True)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"nets/unet2d.py: UNet2D expects input (B, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        if x.shape[-2] < 16 or x.shape[-1] < 16:
            raise ValueError(f"nets/unet2d.py: UNet2D needs H, W >= 16 (four 2x2 poolings), "
                             f"got {tuple(x.shape[-2:])}")
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        if self.dropout is not None:
            x5 = self.dropout(x5)
        y = self.up1(x5, x4)
        y = self.up2(y, x3)
        y = self.up3(y, x2)
        y = self.up4(y, x1)
        return self.outc(y)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
