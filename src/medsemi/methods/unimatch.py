"""UniMatch baseline (Yang et al., CVPR 2023, "Revisiting Weak-to-Strong Consistency in Semi-Supervised
Semantic Segmentation"), following the authors' medical (ACDC) training script.

One step, with ``x_l, y_l`` labelled and ``u_w, u_s`` the unlabelled weak / strong views:

1. ``S(cat(x_l, u_w))`` in one forward gives ``pred_x`` and ``pred_w``; with feature perturbation the
   same forward also decodes the encoder features after channel dropout (p = 0.5) into ``pred_fp``.
2. Pseudo-label ``Y`` and confidence mask ``K`` from ``pred_w`` (detached; option ``teacher="ema"`` uses
   the EMA teacher instead), threshold τ = 0.95 (spec ust-run.md 3.2).
3. Two strong views, each cut-mixed (box probability 0.5, the cut-mix box of spec 4.1) with a partner
   image; the pseudo-label and mask are mixed with the same box. ``S(cat(v1, v2))`` in one forward.
4. ``L = scale · (sup_weight · L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp)`` with ``L_x`` the CE + Dice loss
   (spec 3.3) and the unlabelled terms the masked Dice (UniMatch's medical script uses Dice only for
   them, with the ignore mask applied to every class including background). Defaults ``sup_weight =
   0.5`` and ``scale = 0.5`` reproduce ``(loss_x + 0.25 s1 + 0.25 s2 + 0.5 fp) / 2`` with
   ``loss_x = (CE + Dice) / 2``.

Choices forced by this code base (documented deviations):

- **Second strong view.** The batch carries one strong view. With ``second_view="augment"`` (default)
  the second one is drawn inside the step: the photometric strong augmentation of spec 2.6
  (:class:`medsemi.data.augment.BatchAugment` with its default, spec settings) applied to ``u_w`` with
  the method's generator, i.e. an independent strong view of the same geometry, as UniMatch's two
  independently augmented views. ``"same"`` reuses ``u_s`` (the views then differ by their boxes only).
- **Cut-mix partner.** UniMatch mixes with a second, independently loaded unlabelled batch whose
  pseudo-labels come from an extra eval-mode forward. We mix with the same batch rolled by one
  (sample ``i`` receives a box from sample ``i-1``, never itself when ``B > 1``), and the partner's
  pseudo-label / mask are the rolled ``Y, K`` from step 2 (no extra forward, train-mode BN).
- **Feature perturbation.** The UNet has no feature hook, but its layout is fixed (spec 3.1), so
  :func:`unet_forward_fp` runs the encoder, applies channel dropout (Dropout2d, p = 0.5, drawn from the
  method generator) to every encoder level (all skips and the bottleneck) exactly as UniMatch's medical
  UNet does, and decodes clean and perturbed features in one batch. Networks without the UNet2D layout
  are refused with a clear error (set ``feature_perturbation: false``).
- The confidence test is ``p > τ`` (spec 3.2) rather than UniMatch's ``p >= τ``.
- Forwards are concatenated as in UniMatch, not separate as in spec 3.5 (this is a baseline of its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medsemi.data.augment import AugmentConfig, BatchAugment
from medsemi.data.contract import DatasetInfo
from medsemi.losses import seg_loss
from medsemi.methods.base import Batch, Method, MethodOptions, Progress, StepOutput
from medsemi.methods.fixmatch import FixMatch, masked_unsup_loss
from medsemi.methods.mean_teacher import require_unlabelled
from medsemi.methods.registry import register
from medsemi.ops.boxes import random_boxes
from medsemi.ops.copy_paste import paste
from medsemi.ops.pseudo_label import pseudo_label
from medsemi.schedules import consistency_weight

_HERE = "methods/unimatch.py"
_UNET_PARTS = ("inc", "down1", "down2", "down3", "down4", "up1", "up2", "up3", "up4", "outc")


def channel_dropout(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dropout2d: zero whole channels of each sample with probability ``p``, scale the rest by 1/(1-p).

    Same semantics as ``nn.functional.dropout2d`` in training mode, but drawn from ``generator``.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{_HERE}: dropout probability must be in [0, 1), got {p}")
    shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    if generator is None:
        u = torch.rand(shape, device=x.device)
    else:
        u = torch.rand(shape, generator=generator, device=generator.device).to(x.device)
    keep = (u >= p).to(x.dtype)
    return x * keep / (1.0 - p)


def unet_forward_fp(net: nn.Module, x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """UniMatch feature perturbation on a UNet2D-layout network: ``(clean logits, perturbed logits)``.

    Every encoder feature ``f`` (levels x1..x5) is decoded as ``cat(f, dropout2d(f))`` in one batch, so
    clean and perturbed share BatchNorm statistics in the decoder, as in UniMatch's medical UNet.
    """
    net = getattr(net, "_orig_mod", net)  # unwrap torch.compile
    missing = [n for n in _UNET_PARTS if not hasattr(net, n)]
    if missing:
        raise TypeError(f"{_HERE}: feature perturbation needs a UNet2D-layout network (medsemi.nets.unet2d); "
                        f"{type(net).__name__} lacks {missing}. Set method.feature_perturbation=false")
    x1 = net.inc(x)
    x2 = net.down1(x1)
    x3 = net.down2(x2)
    x4 = net.down3(x3)
    x5 = net.down4(x4)
    f1, f2, f3, f4, f5 = (torch.cat([f, channel_dropout(f, p, generator)]) for f in (x1, x2, x3, x4, x5))
    y = net.up1(f5, f4)
    y = net.up2(y, f3)
    y = net.up3(y, f2)
    y = net.up4(y, f1)
    clean, perturbed = net.outc(y).chunk(2)
    return clean, perturbed


@dataclass
class UniMatchOptions(MethodOptions):
    name: str = "unimatch"
    threshold: float = 0.95  # τ
    teacher: str = "student"  # student (UniMatch: own weak prediction, detached) | ema
    second_view: str = "augment"  # augment (independent spec 2.6 strong view of u_w) | same (reuse u_s)
    cutmix: bool = True  # cut-mix a box of a second unlabelled image into each strong view
    cutmix_prob: float = 0.5  # UniMatch medical: a box with probability 0.5
    feature_perturbation: bool = True  # the dropout-perturbed feature stream (UniMatch FP)
    fp_dropout: float = 0.5  # channel dropout rate of the feature-perturbation stream
    sup_weight: float = 0.5  # UniMatch: loss_x = (CE + Dice) / 2
    weight_s1: float = 0.25  # weight of the first strong view's loss
    weight_s2: float = 0.25  # weight of the second strong view's loss
    weight_fp: float = 0.5  # weight of the feature-perturbation loss
    scale: float = 0.5  # the final "/ 2"
    unsup_loss: str = "dice"  # dice (UniMatch medical) | ce+dice | ce
    mask_background: bool = True  # the ignore mask applies to every class (UniMatch DiceLoss)
    ramp: bool = False  # multiply the unlabelled terms by the ramp w of spec 1.5 (UniMatch: no)

    def __post_init__(self) -> None:
        for key, allowed in (("teacher", ("student", "ema")), ("second_view", ("augment", "same")),
                             ("unsup_loss", ("dice", "ce+dice", "ce"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{_HERE}: method.{key} must be one of {allowed}, "
                                 f"got {getattr(self, key)!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"{_HERE}: method.threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 <= self.cutmix_prob <= 1.0:
            raise ValueError(f"{_HERE}: method.cutmix_prob must be in [0, 1], got {self.cutmix_prob}")
        if not 0.0 <= self.fp_dropout < 1.0:
            raise ValueError(f"{_HERE}: method.fp_dropout must be in [0, 1), got {self.fp_dropout}")


@register
class UniMatch(Method):
    name = "unimatch"
    Options = UniMatchOptions
    uses_teacher = True  # only read with teacher="ema"; the engine still evaluates the EMA model
    description = "UniMatch: dual cut-mixed strong views + feature-perturbation (dropout) stream"

    teacher_keeps_own_bn_stats = FixMatch.teacher_keeps_own_bn_stats  # the same ``teacher`` option

    def __init__(self, options: MethodOptions, student: nn.Module, teacher: nn.Module | None,
                 info: DatasetInfo) -> None:
        super().__init__(options, student, teacher, info)
        self._augment = BatchAugment(AugmentConfig(), info.label_spec)

    def second_strong_view(self, u: Batch) -> torch.Tensor:
        opt: UniMatchOptions = self.options  # type: ignore[assignment]
        if opt.second_view == "same":
            return u["strong"]
        return self._augment.strong(u["image"], self.generator)

    def cutmix(self, view: torch.Tensor, label: torch.Tensor, mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cut-mix a view with the batch rolled by one, and its pseudo-label and mask with the same box.

        Sample ``i`` receives, inside its box (spec 4.1 sampler, probability ``cutmix_prob``), the
        pixels of sample ``i-1`` (cyclically) and that sample's pseudo-label / mask."""
        opt: UniMatchOptions = self.options  # type: ignore[assignment]
        b, _, h, w = view.shape
        box = random_boxes(b, h, w, self.generator, view.device, prob=opt.cutmix_prob)
        return (paste(view, view.roll(1, dims=0), box), paste(label, label.roll(1, dims=0), box),
                paste(mask, mask.roll(1, dims=0), box))

    def compile_blocker(self) -> str | None:
        if not self.options.feature_perturbation:  # type: ignore[attr-defined]
            return None
        return ("unimatch's feature-perturbation pass runs the network's blocks eagerly, and the compiled "
                "forward that follows updates the same BatchNorm running statistics in place, which "
                "invalidates the tensors the eager pass saved for backward (torch raises 'modified by an "
                "inplace operation'); set train.compile=false or method.feature_perturbation=false")

    def train_step(self, labelled: Batch, unlabelled: Batch | None, progress: Progress) -> StepOutput:
        opt: UniMatchOptions = self.options  # type: ignore[assignment]
        spec = self.label_spec
        u = require_unlabelled(unlabelled, _HERE)
        x_l, u_w = labelled["image"], u["image"]
        n_l = x_l.shape[0]
        both = torch.cat([x_l, u_w])
        if opt.feature_perturbation:
            preds, preds_fp = unet_forward_fp(self.student, both, opt.fp_dropout, self.generator)
            pred_fp = preds_fp[n_l:]
        else:
            preds, pred_fp = self.student(both), None
        pred_x, pred_w = preds[:n_l], preds[n_l:]
        if opt.teacher == "ema":
            if self.teacher is None:
                raise RuntimeError(f"{_HERE}: teacher='ema' needs a teacher network (the engine builds one)")
            with torch.no_grad():
                logits_t = self.teacher(u_w)
        else:
            logits_t = pred_w.detach()
        label, mask = pseudo_label(logits_t, spec, opt.threshold)

        v1, v2 = u["strong"], self.second_strong_view(u)
        y1 = y2 = label
        k1 = k2 = mask
        if opt.cutmix:
            v1, y1, k1 = self.cutmix(v1, label, mask)
            v2, y2, k2 = self.cutmix(v2, label, mask)
        pred_s1, pred_s2 = self.student(torch.cat([v1, v2])).chunk(2)

        loss_x, ce, dice = seg_loss(pred_x, labelled["label"], None, spec)
        loss_s1, _, _ = masked_unsup_loss(pred_s1, y1, k1, spec, opt.mask_background, opt.unsup_loss)
        loss_s2, _, _ = masked_unsup_loss(pred_s2, y2, k2, spec, opt.mask_background, opt.unsup_loss)
        unsup = opt.weight_s1 * loss_s1 + opt.weight_s2 * loss_s2
        logs = {"loss_sup": loss_x.detach(), "ce": ce.detach(), "dice_loss": dice.detach(),
                "loss_s1": loss_s1.detach(), "loss_s2": loss_s2.detach(), "mask_ratio": mask.mean()}
        if pred_fp is not None:
            loss_fp, _, _ = masked_unsup_loss(pred_fp, label, mask, spec, opt.mask_background, opt.unsup_loss)
            unsup = unsup + opt.weight_fp * loss_fp
            logs["loss_fp"] = loss_fp.detach()
        w = consistency_weight(progress.iteration, progress.max_iterations) if opt.ramp else 1.0
        loss = opt.scale * (opt.sup_weight * loss_x + w * unsup)
        return StepOutput(loss, logs)
