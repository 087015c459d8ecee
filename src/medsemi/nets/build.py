"""Build the network a config asks for, sized by the dataset's self-description."""

from __future__ import annotations

from torch import nn

from medsemi.config import ModelSection
from medsemi.data.contract import DatasetInfo


def build_model(model: ModelSection, info: DatasetInfo) -> nn.Module:
    if model.name == "unet2d":
        from medsemi.nets.unet2d import UNet2D

        return UNet2D(info.in_channels, info.label_spec.num_outputs, base_channels=model.base_channels)
    raise ValueError(f"unknown model.name {model.name!r}; valid: unet2d, versemi_vnet")
