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


UNET2D_MIN_SIZE = 16  # four 2x2 max-pools
VNET_DIVISOR = 16  # four stride-2 levels


def build_model(model: ModelChoice, info: DatasetInfo) -> nn.Module:
    """The network of ``model.name`` for the dataset ``info``; an input size the network cannot take is refused
    here, before training, in one sentence naming the key."""
    dropout = float(getattr(model, "dropout", 0.0))
    if model.name == "unet2d":
        if info.patch_size and min(info.patch_size) < UNET2D_MIN_SIZE:
            raise ValueError(
                f"data.patch_size {tuple(info.patch_size)} is smaller than the 2D U-Net's minimum input size "
                f"({UNET2D_MIN_SIZE} px, four 2x2 poolings); use data.patch_size >= {UNET2D_MIN_SIZE}"
            )
        from medsemi.nets.unet2d import UNet2D

        return UNet2D(info.in_channels, info.label_spec.num_outputs, base_channels=model.base_channels,
                      dropout=dropout)
    if model.name == "vnet":
        from medsemi.nets.vnet import SegVNet

        if len(info.patch_size) != 3:
            raise ValueError(f"model.name=vnet needs 3D data (patch_size of 3 dims); {info.name!r} has "
                             f"patch_size {info.patch_size}")
        check_vnet_crop(info)
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
        check_vnet_crop(info)
        return TaskPromptedVNet(info.in_channels, base_filters=model.base_channels)
    raise ValueError(f"unknown model.name {model.name!r}; valid: unet2d, vnet, versemi_vnet")


def check_vnet_crop(info: DatasetInfo) -> None:
    """Refuse a 3D crop size the V-Net's four stride-2 levels cannot take, in one sentence."""
    size = tuple(info.patch_size)
    if any(s % VNET_DIVISOR for s in size) or min(size) < VNET_DIVISOR or max(size) <= VNET_DIVISOR:
        raise ValueError(
            f"the 3D crop size {size} does not fit the V-Net: each side must be a multiple of {VNET_DIVISOR} "
            f"and at least one side larger than {VNET_DIVISOR} (e.g. 32^3 or 96^3)"
        )
