"""Supervised-only baseline: the labelled batch and nothing else (spec ust-run.md 3.3 loss)."""

from __future__ import annotations

from dataclasses import dataclass

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
        loss, ce, dice = self.supervised_loss(logits, labelled["label"])
        return StepOutput(loss, {"loss_sup": loss.detach(), "ce": ce.detach(), "dice_loss": dice.detach()})


@dataclass
class Supervised3DOptions(MethodOptions):
    name: str = "supervised3d"
    sup_dice: str = "foreground"  # all | foreground: UA-MT train_LA.py's Dice on the foreground only


@register
class Supervised3D(Supervised):
    """The same labelled-only training on one task's volumes with a plain VNet (UA-MT's ``train_LA.py``:
    CE + foreground Dice; UA-MT halves the sum, ``0.5 · (CE + Dice)``, not done here)."""

    name = "supervised3d"
    Options = Supervised3DOptions
    spatial_dims = 3
    single_task = True
    description = "labelled data only (CE + Dice), one task's volumes, plain VNet"
