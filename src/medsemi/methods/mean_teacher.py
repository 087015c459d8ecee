"""Mean Teacher baseline (Tarvainen & Valpola, NeurIPS 2017; the medical form of Yu et al., MICCAI 2019).

Step: ``L = L_sup + λ · w · mean((σ(S(u_s)) - σ(T(u_w)))²)`` with ``σ`` = softmax (exclusive labels) or
sigmoid (multi-label), ``w`` the consistency ramp of spec ust-run.md 1.5 and ``λ`` the option
``consistency``. The teacher is the EMA of the student, updated by the engine (spec 1.5, 3.5); it
stays in train mode, as every teacher of this code base. Each network call is a separate forward
(spec 3.5). The squared error is averaged over all elements ``B·C·H·W`` of the unlabelled batch.

Dimension-agnostic: images ``(B, C, H, W)`` or volumes ``(B, C, D, H, W)``. ``mean_teacher3d`` is the
same class for single-task volumes with the 3D lineage's defaults (UA-MT's LA script
``train_LA_meanteacher_certainty_unlabel.py`` without the uncertainty mask, and SSL4MIS
``train_mean_teacher_3D.py``): the student sees the unlabelled crop as it is, the teacher the crop plus
``clamp(N(0, 0.1²), -0.2, 0.2)`` noise, ``λ = 0.1``, ramp over 40 "epochs" (UA-MT: ``iter // 150`` up to 40,
i.e. the whole 6000 iterations), CE + foreground Dice as the supervised loss (``sup_dice``). Departures
from those scripts: the supervised loss is not halved (they: ``0.5 · (CE + Dice)``), separate student
forwards for the labelled and the unlabelled batch (they: one forward of the concatenated batch), and this
code base's schedules (poly LR; UA-MT: LR x0.1 every 2500 iterations).

Also home of two tiny helpers shared by the baseline methods: :func:`probabilities` and
:func:`require_unlabelled`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medsemi.data.contract import LabelSpec
from medsemi.methods.base import SUP_DICE, Batch, Method, MethodOptions, Progress, StepOutput
from medsemi.methods.registry import register
from medsemi.schedules import consistency_weight

_HERE = "methods/mean_teacher.py"


def probabilities(logits: torch.Tensor, label_spec: LabelSpec) -> torch.Tensor:
    """Per-pixel probabilities in float32: softmax over channels (exclusive) or sigmoid (multi-label)."""
    z = logits.float()
    return torch.sigmoid(z) if label_spec.multilabel else torch.softmax(z, dim=1)


def require_unlabelled(unlabelled: Batch | None, where: str, keys: tuple[str, ...] = ("image", "strong")
                       ) -> Batch:
    """Return the unlabelled batch or raise a clear error naming ``where`` and the missing keys."""
    if unlabelled is None:
        raise ValueError(f"{where}: this method needs an unlabelled batch, got None")
    missing = [k for k in keys if k not in unlabelled]
    if missing:
        raise KeyError(f"{where}: the unlabelled batch lacks {missing}; it has {sorted(unlabelled)}")
    return unlabelled


def consistency_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor, label_spec: LabelSpec
                    ) -> torch.Tensor:
    """Mean squared difference of probabilities over all elements; the teacher side is detached."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"{_HERE}: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        p_s = probabilities(student_logits, label_spec)
        p_t = probabilities(teacher_logits.detach(), label_spec)
        return ((p_s - p_t) ** 2).mean()


@dataclass
class MeanTeacherOptions(MethodOptions):
    name: str = "mean_teacher"
    consistency: float = 1.0  # λ, multiplies the ramp w (spec 1.5)
    ramp: bool = True  # multiply by the ramp w; false: constant λ
    student_view: str = "strong"  # strong | weak: the view of u fed to the student (the teacher sees weak)
    unsupervised: bool = True  # false: the consistency term is dropped (supervised + EMA teacher)
    teacher_noise: float = 0.0  # σ > 0: the teacher sees u + clamp(N(0, σ²), -2σ, 2σ) (UA-MT: 0.1)
    ramp_epochs: int = 200  # the ramp w rises over training in this many equal "epochs" (spec 1.5: 200)
    sup_dice: str = "all"  # all (spec 3.3) | foreground: the Dice of the supervised loss (3D lineage: foreground)

    def __post_init__(self) -> None:
        if self.student_view not in ("strong", "weak"):
            raise ValueError(f"{_HERE}: method.student_view must be 'strong' or 'weak', "
                             f"got {self.student_view!r}")
        if self.consistency < 0:
            raise ValueError(f"{_HERE}: method.consistency must be >= 0, got {self.consistency}")
        if self.teacher_noise < 0:
            raise ValueError(f"{_HERE}: method.teacher_noise must be >= 0, got {self.teacher_noise}")
        if self.ramp_epochs < 1:
            raise ValueError(f"{_HERE}: method.ramp_epochs must be >= 1, got {self.ramp_epochs}")
        if self.sup_dice not in SUP_DICE:
            raise ValueError(f"{_HERE}: method.sup_dice must be one of {SUP_DICE}, got {self.sup_dice!r}")


def noisy(x: torch.Tensor, sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    """``x + clamp(σ·N(0, 1), -2σ, 2σ)`` (UA-MT's teacher input noise: σ = 0.1, clamp ±0.2); ``x`` if σ = 0."""
    if sigma <= 0:
        return x
    if generator is None or generator.device.type != x.device.type:
        n = torch.randn(x.shape, device=x.device, dtype=x.dtype)
    else:
        n = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + (n * sigma).clamp(-2 * sigma, 2 * sigma)


@register
class MeanTeacher(Method):
    name = "mean_teacher"
    Options = MeanTeacherOptions
    uses_teacher = True
    description = "Mean Teacher: EMA teacher, MSE between student(strong) and teacher(weak) probabilities"

    def train_step(self, labelled: Batch, unlabelled: Batch | None, progress: Progress) -> StepOutput:
        opt: MeanTeacherOptions = self.options  # type: ignore[assignment]
        logits_l = self.student(labelled["image"])
        loss_sup, ce, dice = self.supervised_loss(logits_l, labelled["label"])
        logs = {"loss_sup": loss_sup.detach(), "ce": ce.detach(), "dice_loss": dice.detach()}
        if not opt.unsupervised:
            return StepOutput(loss_sup, logs)
        if self.teacher is None:
            raise RuntimeError(f"{_HERE}: {self.name} needs a teacher network (the engine builds one)")
        u = require_unlabelled(unlabelled, _HERE, ("image", "strong") if opt.student_view == "strong" else ("image",))
        with torch.no_grad():
            logits_t = self.teacher(noisy(u["image"], opt.teacher_noise, self.generator))
        logits_s = self.student(u["strong"] if opt.student_view == "strong" else u["image"])
        loss_cons, extra = self.consistency_loss(logits_s, logits_t, u, progress)
        w = consistency_weight(progress.iteration, progress.max_iterations, opt.ramp_epochs) if opt.ramp else 1.0
        weight = opt.consistency * w
        loss = loss_sup + weight * loss_cons
        logs.update(extra)
        logs.update(loss_cons=loss_cons.detach(), cons_weight=torch.full((), weight, device=loss.device))
        return StepOutput(loss, logs)

    def consistency_loss(self, logits_s: torch.Tensor, logits_t: torch.Tensor, unlabelled: Batch,
                         progress: Progress) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The unweighted consistency term and extra logs; Mean Teacher: the plain MSE of probabilities."""
        return consistency_mse(logits_s, logits_t, self.label_spec), {}


@dataclass
class MeanTeacher3DOptions(MeanTeacherOptions):
    """The 3D lineage's Mean Teacher defaults (see the module docstring)."""

    name: str = "mean_teacher3d"
    consistency: float = 0.1  # UA-MT / SSL4MIS --consistency 0.1
    student_view: str = "weak"  # volume batches carry no strong view; the student sees the crop as it is
    teacher_noise: float = 0.1  # UA-MT: clamp(randn * 0.1, -0.2, 0.2) on the teacher's input
    ramp_epochs: int = 40  # UA-MT --consistency_rampup 40 (x 150 iterations = its 6000)
    sup_dice: str = "foreground"  # UA-MT / SSL4MIS 3D: dice_loss(softmax[:, 1], label == 1)


@register
class MeanTeacher3D(MeanTeacher):
    name = "mean_teacher3d"
    Options = MeanTeacher3DOptions
    spatial_dims = 3
    single_task = True
    description = "Mean Teacher on one task's volumes (plain VNet; noisy teacher input, UA-MT's LA settings)"
