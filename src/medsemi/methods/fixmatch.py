"""FixMatch baseline (Sohn et al., NeurIPS 2020), in the segmentation form used by the MiDSS family.

Step: the teacher's prediction on the weak view ``u_w`` gives a hard pseudo-label and a confidence mask
(threshold τ = 0.95, spec ust-run.md 3.2, :func:`medsemi.ops.pseudo_label.pseudo_label`); the student is
trained on the strong view ``u_s`` against it:

``L = L_sup + λ_u · (w if ramp else 1) · seg_loss(S(u_s), Y, K)``

with ``seg_loss`` the CE + Dice loss of spec 3.3 and ``w`` the ramp of spec 1.5.

- ``teacher="ema"`` (default): the pseudo-labels come from the EMA teacher (engine, spec 1.5), as in the
  MiDSS-family baselines; ``"student"``: from the student itself under ``no_grad`` (original FixMatch).
- ``mask_background=True`` (default): the confidence mask also weights the background class of the
  exclusive Dice term, so a pixel below the threshold has no influence at all on the unlabelled loss
  (FixMatch's definition). ``False`` reproduces the UST ``DiceLossWithMask`` quirk (spec 3.3), where the
  background Dice ignores the mask.
- ``unsup_loss="ce"`` keeps only the masked CE term (the original classification FixMatch loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medsemi.data.contract import LabelSpec
from medsemi.losses import seg_loss
from medsemi.methods.base import Batch, Method, MethodOptions, Progress, StepOutput
from medsemi.methods.mean_teacher import require_unlabelled
from medsemi.methods.registry import register
from medsemi.ops.pseudo_label import pseudo_label
from medsemi.schedules import consistency_weight

_HERE = "methods/fixmatch.py"


def masked_unsup_loss(student_logits: torch.Tensor, label: torch.Tensor, mask: torch.Tensor,
                      label_spec: LabelSpec, mask_background: bool = True, unsup_loss: str = "ce+dice"
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, dice)`` of the student against a pseudo-label with a confidence mask (spec 3.3).

    ``unsup_loss``: ``"ce+dice"`` (loss = ce + dice), ``"ce"`` (loss = ce) or ``"dice"`` (loss = dice).
    """
    total, ce, dice = seg_loss(student_logits, label, mask, label_spec, mask_background=mask_background)
    if unsup_loss == "ce":
        return ce, ce, dice
    if unsup_loss == "dice":
        return dice, ce, dice
    return total, ce, dice


@dataclass
class FixMatchOptions(MethodOptions):
    name: str = "fixmatch"
    threshold: float = 0.95  # τ (spec 1.5, 3.2)
    lambda_u: float = 1.0  # λ_u
    ramp: bool = True  # multiply λ_u by the ramp w (spec 1.5), as in MiDSS-family code
    teacher: str = "ema"  # ema | student
    mask_background: bool = True  # the confidence mask also weights the background Dice (see module doc)
    unsup_loss: str = "ce+dice"  # ce+dice | ce | dice
    unsupervised: bool = True  # false: supervised only (with an EMA teacher for evaluation)

    def __post_init__(self) -> None:
        if self.teacher not in ("ema", "student"):
            raise ValueError(f"{_HERE}: method.teacher must be 'ema' or 'student', got {self.teacher!r}")
        if self.unsup_loss not in ("ce+dice", "ce", "dice"):
            raise ValueError(f"{_HERE}: method.unsup_loss must be 'ce+dice', 'ce' or 'dice', "
                             f"got {self.unsup_loss!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"{_HERE}: method.threshold must be in [0, 1], got {self.threshold}")
        if self.lambda_u < 0:
            raise ValueError(f"{_HERE}: method.lambda_u must be >= 0, got {self.lambda_u}")


@register
class FixMatch(Method):
    name = "fixmatch"
    Options = FixMatchOptions
    uses_teacher = True
    description = "FixMatch: confident weak-view pseudo-labels (EMA teacher) supervise the strong view"

    @property
    def teacher_keeps_own_bn_stats(self) -> bool:
        """Only the ``teacher="ema"`` variant forwards the teacher; otherwise it is an evaluation average."""
        return self.options.teacher == "ema"

    def pseudo_labels(self, weak: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hard label and confidence mask for the weak view, from the teacher chosen by the options."""
        opt: FixMatchOptions = self.options  # type: ignore[assignment]
        net = self.student if opt.teacher == "student" else self.teacher
        if net is None:
            raise RuntimeError(f"{_HERE}: teacher='ema' needs a teacher network (the engine builds one)")
        with torch.no_grad():
            logits = net(weak)
        return pseudo_label(logits, self.label_spec, opt.threshold)

    def train_step(self, labelled: Batch, unlabelled: Batch | None, progress: Progress) -> StepOutput:
        opt: FixMatchOptions = self.options  # type: ignore[assignment]
        spec = self.label_spec
        loss_sup, ce, dice = seg_loss(self.student(labelled["image"]), labelled["label"], None, spec)
        logs = {"loss_sup": loss_sup.detach(), "ce": ce.detach(), "dice_loss": dice.detach()}
        if not opt.unsupervised:
            return StepOutput(loss_sup, logs)
        u = require_unlabelled(unlabelled, _HERE)
        label, mask = self.pseudo_labels(u["image"])
        loss_u, _, _ = masked_unsup_loss(self.student(u["strong"]), label, mask, spec,
                                         opt.mask_background, opt.unsup_loss)
        w = consistency_weight(progress.iteration, progress.max_iterations) if opt.ramp else 1.0
        weight = opt.lambda_u * w
        loss = loss_sup + weight * loss_u
        logs.update(loss_u=loss_u.detach(), mask_ratio=mask.mean(),
                    u_weight=torch.full((), weight, device=loss.device))
        return StepOutput(loss, logs)
