"""UA-MT: uncertainty-aware Mean Teacher (Yu et al., MICCAI 2019, "Uncertainty-aware Self-ensembling
Model for Semi-supervised 3D Left Atrium Segmentation").

Follows the authors' ``train_LA_meanteacher_certainty_unlabel.py`` (UA-MT repository) in 3D and
SSL4MIS ``train_uncertainty_aware_mean_teacher_2D.py`` in 2D; one class for both (the network and the
tensors carry the dimension). With ``σ(·)`` the softmax (exclusive labels) or sigmoid (multi-label):

- teacher target ``T(u + n)``, ``n = clamp(N(0, 0.1²), -0.2, 0.2)``, the student sees ``u`` as it is;
- uncertainty (the paper's Monte Carlo estimate): ``T`` stochastic teacher passes (fresh noise each, and
  dropout where the network has it: ``model.dropout``; UA-MT's VNet has ``has_dropout=True`` for both
  student and teacher, a Dropout3d(0.5) on the bottleneck and before the head), ``μ = mean_t σ(T(u + n_t))``,
  ``U = -Σ_c μ_c log(μ_c + 1e-6)``; the passes run ``copies`` repeats of the batch per forward (the
  original: 2 copies, ``T/2`` forwards);
- mask ``M = [U < H]`` with the ramped threshold of the paper and code, ``H = (0.75 + 0.25 · r(t)) · ln C``,
  ``r`` the sigmoid ramp-up over the whole run (``sigmoid_rampup(iter, max_iter)``), ``C`` the classes;
- consistency ``L_c = Σ M · (σ(S(u)) - σ(T(u + n)))² / (C · Σ M + 1e-16)`` (the code's ``2 · sum(mask)``
  for its C = 2), weighted by ``λ · w`` with ``λ = 0.1`` and ``w`` the consistency ramp.

Departures: ``ln C`` for the threshold where SSL4MIS's 2D script keeps ``ln 2`` for any number of classes
(set ``max_entropy=ln2`` to reproduce it); multi-label labels (not in the originals) use the per-channel
binary entropy with ``ln 2`` and a per-channel mask; CE + Dice as the supervised loss, the Dice over the
foreground in 3D (``sup_dice``; UA-MT: ``0.5 · (CE + foreground Dice)``, SSL4MIS 2D: all classes), not
halved; separate labelled and unlabelled student forwards (originals: one concatenated batch). The 2D UNet
of this code base has a single optional Dropout2d on the bottleneck (``model.dropout``; SSL4MIS's UNet has
dropout 0.05-0.5 in every encoder level); without dropout the uncertainty comes from the input noise alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from medsemi.methods.base import Batch, Progress
from medsemi.methods.mean_teacher import MeanTeacher, MeanTeacherOptions, noisy, probabilities
from medsemi.methods.registry import register
from medsemi.schedules import sigmoid_rampup

_HERE = "methods/uamt.py"
EPS_LOG = 1e-6  # inside the log of the entropy (UA-MT)
EPS_DEN = 1e-16  # in the denominator of the masked mean (UA-MT)


@dataclass
class UAMTOptions(MeanTeacherOptions):
    name: str = "uamt"
    consistency: float = 0.1  # λ (UA-MT / SSL4MIS --consistency 0.1)
    student_view: str = "weak"  # the student sees u as it is (originals: no strong view)
    teacher_noise: float = 0.1  # σ of the teacher's input noise, clamped to ±2σ (UA-MT)
    passes: int = 8  # T stochastic teacher passes for the uncertainty (UA-MT: 8)
    copies: int = 2  # batch repeats per teacher forward during the passes (UA-MT: 2, i.e. T/2 forwards)
    uncertainty: bool = True  # false: no mask (Mean Teacher with a noisy teacher input)
    threshold_start: float = 0.75  # H starts at threshold_start · ln C ...
    threshold_ramp: bool = True  # ... and rises to ln C with the sigmoid ramp over training (false: fixed)
    max_entropy: str = "classes"  # classes: ln C | ln2: ln 2 whatever C (SSL4MIS 2D)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.passes < 1 or self.copies < 1 or self.passes % self.copies:
            raise ValueError(f"{_HERE}: method.passes must be a positive multiple of method.copies, "
                             f"got passes={self.passes}, copies={self.copies}")
        if not 0.0 <= self.threshold_start <= 1.0:
            raise ValueError(f"{_HERE}: method.threshold_start must be in [0, 1], got {self.threshold_start}")
        if self.max_entropy not in ("classes", "ln2"):
            raise ValueError(f"{_HERE}: method.max_entropy must be 'classes' or 'ln2', got {self.max_entropy!r}")


@register
class UAMT(MeanTeacher):
    name = "uamt"
    Options = UAMTOptions
    description = "UA-MT: Mean Teacher, consistency only where T noisy/dropout teacher passes are certain"

    def uncertainty(self, u: torch.Tensor) -> torch.Tensor:
        """Predictive entropy of the mean of ``passes`` stochastic teacher predictions, float32:
        ``(B, 1, *S)`` (exclusive) or ``(B, K, *S)`` per channel (multi-label)."""
        opt: UAMTOptions = self.options  # type: ignore[assignment]
        assert self.teacher is not None
        b = u.shape[0]
        rep = u.repeat(opt.copies, *([1] * (u.dim() - 1)))
        total = None
        with torch.no_grad():
            for _ in range(opt.passes // opt.copies):
                p = probabilities(self.teacher(noisy(rep, opt.teacher_noise, self.generator)), self.label_spec)
                part = p.view(opt.copies, b, *p.shape[1:]).sum(dim=0)
                total = part if total is None else total + part
        assert total is not None
        mu = total / opt.passes
        if self.label_spec.multilabel:
            return -(mu * torch.log(mu + EPS_LOG) + (1 - mu) * torch.log(1 - mu + EPS_LOG))
        return -(mu * torch.log(mu + EPS_LOG)).sum(dim=1, keepdim=True)

    def threshold(self, progress: Progress) -> float:
        """``H = (start + (1 - start) · r) · ln C`` (the code's ``(0.75 + 0.25 · rampup) · ln 2`` for C = 2)."""
        opt: UAMTOptions = self.options  # type: ignore[assignment]
        c = 2 if self.label_spec.multilabel or opt.max_entropy == "ln2" else self.label_spec.num_outputs
        r = sigmoid_rampup(progress.iteration, progress.max_iterations) if opt.threshold_ramp else 0.0
        return (opt.threshold_start + (1.0 - opt.threshold_start) * r) * math.log(c)

    def consistency_loss(self, logits_s: torch.Tensor, logits_t: torch.Tensor, unlabelled: Batch,
                         progress: Progress) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        opt: UAMTOptions = self.options  # type: ignore[assignment]
        if logits_s.shape != logits_t.shape:
            raise ValueError(f"{_HERE}: student logits {tuple(logits_s.shape)} and teacher logits "
                             f"{tuple(logits_t.shape)} differ in shape")
        with torch.autocast(device_type=logits_s.device.type, enabled=False):
            dist = (probabilities(logits_s, self.label_spec) - probabilities(logits_t.detach(), self.label_spec)) ** 2
            if not opt.uncertainty:
                return dist.mean(), {}
            h = self.threshold(progress)
            mask = (self.uncertainty(unlabelled["image"]) < h).float()
            per_mask = dist.shape[1] // mask.shape[1]  # channels each mask element covers (C or 1)
            loss = (mask * dist).sum() / (per_mask * mask.sum() + EPS_DEN)
        return loss, {"mask_ratio": mask.mean(), "threshold": torch.full((), h, device=loss.device)}


@dataclass
class UAMT3DOptions(UAMTOptions):
    name: str = "uamt3d"
    ramp_epochs: int = 40  # UA-MT --consistency_rampup 40 (x 150 iterations = its 6000)
    sup_dice: str = "foreground"  # UA-MT: dice_loss(softmax[:, 1], label == 1)


@register
class UAMT3D(UAMT):
    name = "uamt3d"
    Options = UAMT3DOptions
    spatial_dims = 3
    single_task = True
    description = "UA-MT on one task's volumes (plain VNet; the authors' LA settings)"
