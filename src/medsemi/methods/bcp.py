"""BCP baseline (Bai et al., CVPR 2023, "Bidirectional Copy-Paste for Semi-Supervised Medical Image
Segmentation"), following the authors' 2D (ACDC) self-training script; ``bcp3d`` is the same class on
one task's volumes, as their LA / pancreas scripts (a 2/3-side box per axis, the same region losses).

One box ``M`` (1 inside; BCP writes it as a ones mask with a *zero* box) of side ``int(2/3 · H) x
int(2/3 · W)`` at a uniformly random position (top-left ``y ∈ {0 .. H-h-1}``, ``x ∈ {0 .. W-w-1}``, as
BCP's ``np.random.randint(0, H - h)``), one box for the whole batch by default. The labelled and the
unlabelled batch are split in halves ``a, b`` (BCP's ``img_a/img_b``, ``uimg_a/uimg_b``):

- ``x_in  = u_a ⊕_M x_a``: unlabelled outside, labelled patch inside;
  target ``Ŷ_a`` outside (teacher pseudo-label), ``y_a`` inside;
- ``x_out = x_b ⊕_M u_b``: labelled outside, unlabelled patch inside;
  target ``y_b`` outside, ``Ŷ_b`` inside.

``Ŷ = argmax T(u)`` (sigmoid ≥ 0.5 for multi-label labels) from the EMA teacher, one teacher forward per
half. Each mixed image's loss is the sum of two region losses, the labelled region weighted 1 and the
unlabelled region weighted ``α = 0.5`` (BCP ``u_weight``); a region loss is CE + Dice (spec 3.3) restricted
to the region: the CE is averaged over the region's pixels (BCP: ``sum(CE·m) / sum(m)``) and the Dice uses
the region as its mask for every class, background included. Total ``L = 0.5 · (L_in + L_out)`` (BCP's
``(dice + ce) / 2``). There is no separate supervised term, as in BCP.

Documented deviations:

- BCP keeps only the largest connected component of each pseudo-label class (``skimage`` on the CPU);
  that is a host round trip per sample and is not done here.
- BCP's separate pre-training stage (labelled-only copy-paste, then both networks initialised from the
  best pre-trained checkpoint, a new optimiser) is skipped by default. ``pretrain_iterations > 0`` runs
  that labelled-only copy-paste for the first iterations of the same run; the teacher is then the EMA of
  the pre-training student (not a copy of the best pre-training checkpoint) and the optimiser continues.
- ``threshold > 0`` multiplies the unlabelled-region weight by the confidence mask of spec 3.2 (BCP: no
  threshold, the default 0 keeps every pixel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medsemi.data.contract import LabelSpec
from medsemi.losses import seg_loss
from medsemi.methods.base import Batch, Method, MethodOptions, Progress, StepOutput
from medsemi.methods.mean_teacher import require_unlabelled
from medsemi.methods.registry import register
from medsemi.ops.copy_paste import paste
from medsemi.ops.pseudo_label import pseudo_label
from medsemi.schedules import consistency_weight

_HERE = "methods/bcp.py"


def bcp_box(batch: int, spatial: tuple[int, ...], generator: torch.Generator | None = None,
            device: torch.device | str = "cpu", ratio: float = 2.0 / 3.0, per_sample: bool = False
            ) -> torch.Tensor:
    """BCP box mask, float32 ``(B, *spatial)``, 1 inside a box of side ``int(ratio · size)`` per axis.

    Any number of spatial axes: 2D ``(H, W)`` as BCP's ACDC script, 3D ``(D, H, W)`` as its LA and
    pancreas scripts (``int(2/3 · size)`` per axis there too). The box start on each axis is uniform on
    ``{0 .. size-side-1}`` (BCP's exclusive ``randint``; a box as large as the axis sits at 0), one uniform
    draw per axis in axis order. One box shared by the batch unless ``per_sample``.
    """
    spatial = tuple(int(s) for s in spatial)
    if batch < 1 or not spatial or min(spatial) < 1:
        raise ValueError(f"{_HERE}: bad box batch/size {batch}, {spatial}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"{_HERE}: box ratio must be in (0, 1], got {ratio}")
    n = batch if per_sample else 1
    if generator is None:
        u = torch.rand((n, len(spatial)), device=device, dtype=torch.float64)
    else:
        u = torch.rand((n, len(spatial)), generator=generator, device=generator.device,
                       dtype=torch.float64).to(device)
    inside = torch.ones((n,) + (1,) * len(spatial), dtype=torch.bool, device=device)
    for axis, size in enumerate(spatial):
        side = int(size * ratio)
        count = max(size - side, 1)
        start = torch.floor(u[:, axis] * count).clamp(max=count - 1).long()
        index = torch.arange(size, device=device)
        on_axis = (index[None, :] >= start[:, None]) & (index[None, :] < (start + side)[:, None])  # (n, size)
        shape = [n] + [1] * len(spatial)
        shape[1 + axis] = size
        inside = inside & on_axis.view(shape)
    return inside.to(torch.float32).expand(batch, *spatial).contiguous()


def _per_output(region: torch.Tensor, label_spec: LabelSpec) -> torch.Tensor:
    """A spatial region ``(B, *S)`` shaped like a weight: ``(B, 1, *S)`` for multi-label labels."""
    return region.unsqueeze(1) if label_spec.multilabel else region


@dataclass
class BCPOptions(MethodOptions):
    name: str = "bcp"
    alpha: float = 0.5  # weight of the unlabelled region in each mixed image (BCP u_weight)
    box_ratio: float = 2.0 / 3.0  # box side / image side
    box_per_sample: bool = False  # BCP: one box for the whole batch
    bidirectional: bool = True  # false: only x_in (labelled patch pasted into unlabelled images)
    pairing: str = "halves"  # halves (BCP: a/b halves of each batch) | full (every pair in both directions)
    student_view: str = "weak"  # weak (BCP) | strong: the unlabelled view pasted into student inputs
    threshold: float = 0.0  # > 0: confidence mask on the unlabelled region (spec 3.2); BCP: none
    ce_normalize: str = "weight"  # weight (BCP: CE averaged over the region) | all (spec 3.3 parity)
    mask_background: bool = True  # the region mask also applies to the background Dice (BCP)
    scale: float = 0.5  # BCP: (dice + ce) / 2
    ramp: bool = False  # multiply α by the ramp w of spec 1.5 (BCP: no)
    pretrain_iterations: int = 0  # > 0: labelled-only copy-paste for the first iterations (see module doc)

    def __post_init__(self) -> None:
        for key, allowed in (("pairing", ("halves", "full")), ("student_view", ("weak", "strong")),
                             ("ce_normalize", ("weight", "all"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{_HERE}: method.{key} must be one of {allowed}, "
                                 f"got {getattr(self, key)!r}")
        if not 0.0 < self.box_ratio <= 1.0:
            raise ValueError(f"{_HERE}: method.box_ratio must be in (0, 1], got {self.box_ratio}")
        if self.alpha < 0:
            raise ValueError(f"{_HERE}: method.alpha must be >= 0, got {self.alpha}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"{_HERE}: method.threshold must be in [0, 1], got {self.threshold}")
        if self.pretrain_iterations < 0:
            raise ValueError(f"{_HERE}: method.pretrain_iterations must be >= 0, "
                             f"got {self.pretrain_iterations}")


@register
class BCP(Method):
    name = "bcp"
    Options = BCPOptions
    uses_teacher = True
    description = "BCP: bidirectional copy-paste of a 2/3-side box between labelled and unlabelled images"

    def region_loss(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CE + Dice restricted to a region (the weight), see the module docstring."""
        opt: BCPOptions = self.options  # type: ignore[assignment]
        return seg_loss(logits, target, weight, self.label_spec, normalize=opt.ce_normalize,  # type: ignore[arg-type]
                        mask_background=opt.mask_background)

    def mixed_loss(self, logits: torch.Tensor, target_out: torch.Tensor, region_out: torch.Tensor,
                   scale_out: float, target_in: torch.Tensor, region_in: torch.Tensor, scale_in: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, ce, dice)`` of one mixed image: ``scale_out · region_loss(target_out, region_out) +
        scale_in · region_loss(target_in, region_in)``.

        The region weights are 0/1 masks (times the confidence mask where ``threshold > 0``); the scalar
        weights multiply the region losses (inside a region loss they would cancel out)."""
        total_o, ce_o, dice_o = self.region_loss(logits, target_out, region_out)
        total_i, ce_i, dice_i = self.region_loss(logits, target_in, region_in)
        return (scale_out * total_o + scale_in * total_i, scale_out * ce_o + scale_in * ce_i,
                scale_out * dice_o + scale_in * dice_i)

    def _pretrain_step(self, labelled: Batch) -> StepOutput:
        opt: BCPOptions = self.options  # type: ignore[assignment]
        spec = self.label_spec
        x, y = labelled["image"], labelled["label"]
        h = x.shape[0] // 2
        if h < 1:
            raise ValueError(f"{_HERE}: BCP pre-training needs a labelled batch of at least 2, "
                             f"got {x.shape[0]}")
        box = bcp_box(h, tuple(x.shape[2:]), self.generator, x.device, opt.box_ratio, opt.box_per_sample)
        inp = paste(x[:h], x[h:2 * h], box)
        logits = self.student(inp)
        total, ce, dice = self.mixed_loss(logits, y[:h], _per_output(1.0 - box, spec), 1.0,
                                          y[h:2 * h], _per_output(box, spec), 1.0)
        loss = opt.scale * total
        return StepOutput(loss, {"loss_pretrain": loss.detach(), "ce": ce.detach(),
                                 "dice_loss": dice.detach()})

    def train_step(self, labelled: Batch, unlabelled: Batch | None, progress: Progress) -> StepOutput:
        opt: BCPOptions = self.options  # type: ignore[assignment]
        if progress.iteration < opt.pretrain_iterations:
            return self._pretrain_step(labelled)
        if self.teacher is None:
            raise RuntimeError(f"{_HERE}: bcp needs a teacher network (the engine builds one)")
        spec = self.label_spec
        keys = ("image", "strong") if opt.student_view == "strong" else ("image",)
        u = require_unlabelled(unlabelled, _HERE, keys)
        x_l, y_l, u_w = labelled["image"], labelled["label"], u["image"]
        u_in = u["strong"] if opt.student_view == "strong" else u_w
        n = min(x_l.shape[0], u_w.shape[0])
        if opt.pairing == "halves" and opt.bidirectional:
            if n < 2:
                raise ValueError(f"{_HERE}: pairing='halves' needs labelled and unlabelled batches of "
                                 f"at least 2 (got {x_l.shape[0]} and {u_w.shape[0]}); "
                                 "use method.pairing=full")
            half_a, half_b = slice(0, n // 2), slice(n // 2, n)
        else:
            half_a = half_b = slice(0, n)
        box = bcp_box(n, tuple(x_l.shape[2:]), self.generator, x_l.device, opt.box_ratio, opt.box_per_sample)
        ramp = consistency_weight(progress.iteration, progress.max_iterations) if opt.ramp else 1.0
        alpha = opt.alpha * ramp

        with torch.no_grad():
            pl_a, conf_a = pseudo_label(self.teacher(u_w[half_a]), spec, opt.threshold)
            if opt.bidirectional and half_b != half_a:
                pl_b, conf_b = pseudo_label(self.teacher(u_w[half_b]), spec, opt.threshold)
            else:
                pl_b, conf_b = pl_a, conf_a

        # x_in: unlabelled outside, labelled patch inside (BCP net_input_unl)
        m = box[half_a]
        logits_in = self.student(paste(u_in[half_a], x_l[half_a], m))
        loss_in, ce, dice = self.mixed_loss(logits_in, pl_a, conf_a * _per_output(1.0 - m, spec), alpha,
                                            y_l[half_a], _per_output(m, spec), 1.0)
        logs = {"loss_mix_in": loss_in.detach(), "mask_ratio": conf_a.mean()}
        total = loss_in
        if opt.bidirectional:
            # x_out: labelled outside, unlabelled patch inside (BCP net_input_l)
            m = box[half_b]
            logits_out = self.student(paste(x_l[half_b], u_in[half_b], m))
            loss_out, ce_b, dice_b = self.mixed_loss(logits_out, y_l[half_b], _per_output(1.0 - m, spec), 1.0,
                                                     pl_b, conf_b * _per_output(m, spec), alpha)
            total = total + loss_out
            ce, dice = ce + ce_b, dice + dice_b
            logs["loss_mix_out"] = loss_out.detach()
        loss = opt.scale * total
        logs.update(ce=ce.detach(), dice_loss=dice.detach())
        return StepOutput(loss, logs)


@dataclass
class BCP3DOptions(BCPOptions):
    name: str = "bcp3d"


@register
class BCP3D(BCP):
    """BCP on one task's volumes: the authors' LA / pancreas self-training scripts use the same losses with
    a 3D box of ``int(2/3 · size)`` per axis (see :func:`bcp_box`)."""

    name = "bcp3d"
    Options = BCP3DOptions
    spatial_dims = 3
    single_task = True
    description = "BCP on one task's volumes (plain VNet, 2/3-side 3D box)"
