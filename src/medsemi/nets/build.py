"""Build the network a config asks for, sized by the dataset's self-description."""

from __future__ import annotations

from typing import Protocol

from torch import nn

from medsemi.data.contract import DatasetInfo


class ModelChoice(Protocol):
    """What ``build_model`` reads of the config's ``model`` section."""

    name: str
    base_channels: int
    dropout: float


def build_model(model: ModelChoice, info: DatasetInfo) -> nn.Module:
    dropout = float(getattr(model, "dropout", 0.0))
    if model.name == "unet2d":
        from medsemi.nets.unet2d import UNet2D

        return UNet2D(info.in_channels, info.label_spec.num_outputs, base_channels=model.base_channels,
                      dropout=dropout)
    if model.name == "vnet":
        from medsemi.nets.vnet import SegVNet

        if len(info.patch_size) != 3:
            raise ValueError(f"model.name=vnet needs 3D data (patch_size of 3 dims); {info.name!r} has "
                             f"patch_size {info.patch_size}")
        return SegVNet(info.in_channels, info.label_spec.num_outputs, base_filters=model.base_channels,
                       dropout=dropout)
    if model.name == "versemi_vnet":
        from medsemi.nets.task_prompted import TaskPromptedVNet

        if len(info.patch_size) != 3 or info.label_spec.num_outputs != 2:
            raise ValueError(
                f"model.name=versemi_vnet needs a 3D binary-per-task dataset (patch_size of 3 dims, "
                f"2 outputs); {info.name!r} has patch_size {info.patch_size} and "
                f"{info.label_spec.num_outputs} outputs"
            )
        if dropout:
            raise ValueError("model.dropout is not supported by model.name=versemi_vnet; set it to 0")
        return TaskPromptedVNet(info.in_channels, base_filters=model.base_channels)
    raise ValueError(f"unknown model.name {model.name!r}; valid: unet2d, vnet, versemi_vnet")
