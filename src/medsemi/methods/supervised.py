"""Supervised-only baseline: the labelled batch and nothing else (spec ust-run.md 3.3 loss)."""

from __future__ import annotations

from dataclasses import dataclass

from medsemi.losses import seg_loss
from medsemi.methods.base import Batch, Method, MethodOptions, Progress, StepOutput
from medsemi.methods.registry import register


@dataclass
class SupervisedOptions(MethodOptions):
    name: str = "supervised"


@register
class Supervised(Method):
    name = "supervised"
    Options = SupervisedOptions
    uses_unlabelled = False
    description = "labelled data only (CE + Dice)"

    def train_step(self, labelled: Batch, unlabelled: Batch | None, progress: Progress) -> StepOutput:
        logits = self.student(labelled["image"])
        loss, ce, dice = seg_loss(logits, labelled["label"], None, self.label_spec)
        return StepOutput(loss, {"loss_sup": loss.detach(), "ce": ce.detach(), "dice_loss": dice.detach()})


@dataclass
class Supervised3DOptions(MethodOptions):
    name: str = "supervised3d"


@register
class Supervised3D(Supervised):
    """The same labelled-only training on one task's volumes with a plain VNet (UA-MT's ``train_LA.py``
    lineage; CE + Dice of spec 3.3 where UA-MT uses ``0.5 · (CE + foreground Dice)``)."""

    name = "supervised3d"
    Options = Supervised3DOptions
    spatial_dims = 3
    single_task = True
    description = "labelled data only (CE + Dice), one task's volumes, plain VNet"
