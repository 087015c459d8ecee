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
