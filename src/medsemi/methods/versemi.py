"""VerSemi (Zeng et al., IEEE TMI 2025; spec ``versemi.md``): one task-prompted 3D network for several
datasets, a synthetic CutMix task (id 5) and, in stage 2, a consistency between the synthetic
prediction and the voxel-wise max over the real-task heads on unlabelled composites.

The network is queried as ``student(image, task_ids)`` / ``student.forward_tasks(image, queries)``
(``nets/task_prompted.py``); batches carry 1-based task ids in ``batch["task"]``. No dataset names here.

Pipelines (``method.pipeline``), stages of one run:

- ``two_stage`` (default, spec 3.7): stage 1 for ``stage1_iterations`` steps, then stage 2 from the
  stage-1 weights; at the boundary ``on_stage_start`` returns True and the engine builds a fresh
  optimiser (``reset_optimizer_at_stage2``; False keeps the Adam moments).
- ``released_main`` / ``stage1_only``: stage 1 only, what the released ``train.py`` runs (spec 3.5, N1).
- ``stage2_only``: stage 2 from the first step (with ``init_checkpoint`` = a stage-1 model, this is
  the original's chaining of runs, spec 3.5).
- ``supervised``: the per-task supervised baseline, L_sup only (Dice + CE, each sample with its own
  task prompt), same network; also registered as the method ``versemi_supervised``.

Stage 1 (spec 3.1): L = w_sup L_sup + w_chaos L_chaos + w_spec L_spec, box ratio 2/3.
Stage 2 (spec 3.2): L = w_sup L_sup + w_unsup Dice(p5, max_t p_t) + w_cons L_cons + w_chaos L_chaos_sup,
box ratios r1, r2 ~ U(0.3, 0.6) drawn on the device (no host sync), optional sigmoid ramp-up of
the two unlabelled terms (off by default; the original computes it and never uses it).
Switches of spec 3.7: ``detach_aggregate`` (stop-gradient on the max aggregate; default off as in
the code, N3) and ``compat_cons_broadcast`` (the original's B x B broadcast bug of L_cons, N2;
default off = the intended per-sample box supervision).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from medsemi.data.contract import DatasetInfo
from medsemi.methods.base import Batch, Method, MethodOptions, Progress, StepOutput
from medsemi.methods.registry import register
from medsemi.ops.versemi_ops import (
    SYNTHETIC_TASK,
    LossWeights,
    binarize_label,
    box_mask,
    foreground_prob,
    mix,
    stage1_losses,
    stage1_mix_queries,
    stage2_losses,
    stage2_unlabeled_queries,
    supervised_loss,
    synthetic_cutmix,
    train_dice,
)

PIPELINES = ("two_stage", "released_main", "stage1_only", "stage2_only", "supervised")


@dataclass
class VerSemiOptions(MethodOptions):
    """VerSemi switches (spec 3.3, 3.7). Weights are all 1 and the ramp-up is off by default."""

    name: str = "versemi"
    pipeline: str = "two_stage"  # two_stage | released_main | stage1_only | stage2_only | supervised
    stage1_iterations: int = 0  # two_stage: steps of stage 1; 0 -> round(stage1_fraction * iterations)
    stage1_fraction: float = 0.5  # share of train.iterations spent in stage 1 (when stage1_iterations is 0)
    reset_optimizer_at_stage2: bool = True  # fresh Adam at the stage boundary (weights are kept)
    stage1_box_ratio: float = 2.0 / 3.0  # spec 3.1 step 3 (side = int(patch * ratio), 64 at 96)
    stage2_box_ratio_range: tuple[float, float] = (0.3, 0.6)  # spec 3.2 steps 2-3, one draw per mask
    w_sup: float = 1.0  # weight of the labelled per-task supervised loss
    w_chaos: float = 1.0  # labelled synthetic CutMix (stage-1 L_chaos, stage-2 L_chaos_sup)
    w_spec: float = 1.0  # task-specific constraint on the composite (stage 1)
    w_unsup: float = 1.0  # unlabelled consistency Dice(p5, max_t p_t) (stage 2)
    w_cons: float = 1.0  # box supervision of the synthetic head on the unlabelled composite (stage 2)
    rampup_epochs: float = 0.0  # > 0: sigmoid ramp of w_unsup and w_cons over stage-2 epochs
    epoch_iterations: int = 0  # length of an "epoch" for the ramp-up; 0 -> train.eval_every
    detach_aggregate: bool = False  # stop-gradient on max_t p_t (spec N3; the code does not detach)
    compat_cons_broadcast: bool = False  # reproduce the original L_cons broadcast bug (spec N2)
    init_checkpoint: str = ""  # optional model checkpoint (best_test.pt / last.pt) to start from
    # replay one BatchNorm running-statistics update per task query of a shared-backbone pass, so the GAP /
    # precls_conv buffers match the original's separate forwards (spec N16); values and gradients are equal
    bn_update_per_query: bool = False
    # an EMA teacher (decay train.ema_decay, parameters averaged, BN buffers copied from the student) that is
    # evaluated beside the student; the original keeps one and never uses it (spec 3.4); off by default
    ema: bool = False
    # paper | released: a bundle of pipeline, compat_cons_broadcast, reset_optimizer_at_stage2 and train.amp
    # (Method.presets; explicit keys win)
    preset: str = "paper"

    @property
    def stage1_only(self) -> bool:
        return self.pipeline in ("released_main", "stage1_only")

    @property
    def needs_unlabelled(self) -> bool:
        """Read by the 3D data builder: no unlabelled stream for stage-1-only or supervised runs."""
        return self.pipeline in ("two_stage", "stage2_only")


def random_box_mask(
    batch: int,
    spatial: tuple[int, ...],
    low: float,
    high: float,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """``context_mask`` with a random ratio r ~ U(low, high) drawn on the device (spec 3.2 steps 2-3).

    Same law as ``box_mask(batch, spatial, r)`` for a host-drawn r: one side ``int(size * r)`` per axis
    for the whole batch, per-sample starts uniform in ``[0, size - side)``; 1 outside the box, 0
    inside, int64 ``(batch, *spatial)``. Everything stays on the device (no ``.item()``).
    """
    r = low + (high - low) * torch.rand((), generator=generator, device=device, dtype=torch.float64)
    inside = torch.ones((batch,) + (1,) * len(spatial), dtype=torch.bool, device=device)
    for k, size in enumerate(spatial):
        side = torch.floor(size * r).long().clamp(1, size - 1)
        u = torch.rand((batch,), generator=generator, device=device, dtype=torch.float64)
        span = size - side
        start = torch.minimum(torch.floor(u * span).long(), span - 1)
        idx = torch.arange(size, device=device)
        ax = (idx >= start[:, None]) & (idx < (start + side)[:, None])
        shape = [batch] + [1] * len(spatial)
        shape[1 + k] = size
        inside = inside & ax.view(shape)
    return (~inside).long()


def _load_init(student: nn.Module, path: str) -> None:
    """Start from a saved model: ``best_*.pt`` (``model``) or ``last.pt`` (``method`` -> ``student.*``)."""
    from medsemi.checkpoints import load_checkpoint

    state = load_checkpoint(path, map_location="cpu")
    if "model" in state:
        weights = state["model"]
    elif "method" in state:
        weights = {k[len("student."):]: v for k, v in state["method"].items() if k.startswith("student.")}
    else:
        raise ValueError(f"{path}: method.init_checkpoint is neither a model nor a training checkpoint")
    try:
        student.load_state_dict(weights)
    except RuntimeError as err:
        raise ValueError(f"{path}: method.init_checkpoint does not fit the network ({err})") from err


@register
class VerSemi(Method):
    name = "versemi"
    Options = VerSemiOptions
    uses_unlabelled = True
    uses_teacher = False  # the original's EMA is never used for targets or testing (spec 3.4)
    spatial_dims = 3
    description = "VerSemi: task-prompted VNet, synthetic CutMix task, max-aggregate consistency (3D)"
    default_pipeline: ClassVar[str | None] = None
    # released: train.py's main runs stage 1 only (N1); its stage 2, when run, keeps the one Adam of stage 1
    # (the same optimiser object, and the stage-2 load restores it with the weights) and has the L_cons
    # broadcast (N2); one BatchNorm update per network call (N15-N16); no autocast. paper: the two stages
    # with the intended L_cons (spec 3.7).
    presets = {
        "paper": {"method": {"pipeline": "two_stage", "compat_cons_broadcast": False,
                             "reset_optimizer_at_stage2": True}},
        "released": {"method": {"pipeline": "released_main", "compat_cons_broadcast": True,
                                "reset_optimizer_at_stage2": False, "bn_update_per_query": True},
                     "train": {"amp": "off"}},
    }

    @classmethod
    def wants_teacher(cls, options: MethodOptions) -> bool:
        return bool(getattr(options, "ema", False))

    @property
    def teacher_keeps_own_bn_stats(self) -> bool:
        return False  # the EMA teacher is never forwarded in training: it takes the student's BN buffers

    def __init__(self, options: VerSemiOptions, student: nn.Module, teacher: nn.Module | None,
                 info: DatasetInfo) -> None:
        super().__init__(options, student, teacher, info)
        o = options
        if o.pipeline not in PIPELINES:
            raise ValueError(f"method.pipeline must be one of {PIPELINES}, got {o.pipeline!r}")
        if self.default_pipeline is not None and o.pipeline != self.default_pipeline:
            raise ValueError(f"method {self.name} runs pipeline {self.default_pipeline!r} only, "
                             f"got method.pipeline={o.pipeline!r}")
        if not hasattr(student, "forward_tasks"):
            raise ValueError(f"method {self.name} needs a task-prompted network (model.name: versemi_vnet), "
                             f"got {type(student).__name__}")
        lo, hi = o.stage2_box_ratio_range
        if not (0.0 < lo <= hi < 1.0) or not 0.0 < o.stage1_box_ratio < 1.0:
            raise ValueError("method box ratios must lie in (0, 1) with stage2_box_ratio_range low <= high, "
                             f"got {o.stage1_box_ratio} and {o.stage2_box_ratio_range}")
        if not 0.0 <= o.stage1_fraction <= 1.0 or o.stage1_iterations < 0:
            raise ValueError("method.stage1_fraction must be in [0, 1] and stage1_iterations >= 0")
        self.weights = LossWeights(o.w_sup, o.w_chaos, o.w_spec, o.w_unsup, o.w_cons, o.rampup_epochs)
        # the option turns the replay on; a network built with it on (nets/task_prompted.py) keeps it on
        for net in (student, teacher):
            if net is not None:
                net.bn_update_per_query = o.bn_update_per_query or bool(getattr(net, "bn_update_per_query", False))
        if o.init_checkpoint:
            _load_init(student, o.init_checkpoint)

    # -- stages -----------------------------------------------------------------------------------
    def stage1_end(self, progress: Progress) -> int:
        """First iteration of stage 2 in the ``two_stage`` pipeline."""
        o = self.options
        if o.stage1_iterations > 0:
            return o.stage1_iterations
        return int(round(o.stage1_fraction * progress.max_iterations))

    def stage_at(self, progress: Progress) -> str:
        """``stage1``, ``stage2`` or ``supervised`` at this iteration (pure function of the progress)."""
        p = self.options.pipeline
        if p == "supervised":
            return "supervised"
        if p in ("released_main", "stage1_only"):
            return "stage1"
        if p == "stage2_only":
            return "stage2"
        return "stage1" if progress.iteration < self.stage1_end(progress) else "stage2"

    def best_suffix(self, progress: Progress) -> str:
        """Two-stage runs keep a stage-1 best (``best_test_stage1.pt``) and a stage-2 best (``best_test.pt``),
        as the original resets its best-Dice tracker when stage 2 starts (spec addendum)."""
        two = self.options.pipeline == "two_stage"
        return "_stage1" if two and self.stage_at(progress) == "stage1" else ""

    def uses_unlabelled_at(self, progress: Progress) -> bool:
        """Only stage 2 reads unlabelled crops: stage 1 (and the supervised pipeline) draw none."""
        return self.stage_at(progress) == "stage2"

    def on_stage_start(self, progress: Progress) -> bool:
        o = self.options
        boundary = self.stage1_end(progress) if o.pipeline == "two_stage" else -1
        return o.reset_optimizer_at_stage2 and 0 < boundary == progress.iteration

    def stage2_epoch(self, progress: Progress) -> float:
        """Epochs into stage 2, for the optional ramp-up (host arithmetic on ints, no sync)."""
        start = self.stage1_end(progress) if self.options.pipeline == "two_stage" else 0
        length = self.options.epoch_iterations or progress.epoch_length
        return max(progress.iteration - start, 0) // max(length, 1)

    # -- the step ---------------------------------------------------------------------------------
    def train_step(self, labelled: Batch, unlabelled: Batch | None, progress: Progress) -> StepOutput:
        x, t = labelled["image"], labelled["task"]
        y = binarize_label(labelled["label"])  # only the value 1 is foreground (spec 1.4)
        stage = self.stage_at(progress)
        if stage == "supervised":
            return self._supervised(x, y, t)
        if x.shape[0] % 2:
            raise ValueError(f"VerSemi needs an even labelled batch (halves a/b), got {x.shape[0]}")
        if stage == "stage1":
            return self._stage1(x, y, t)
        if unlabelled is None:
            raise ValueError("VerSemi stage 2 needs an unlabelled batch (this pipeline uses unlabelled data)")
        return self._stage2(x, y, t, unlabelled["image"], progress)

    def _supervised(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> StepOutput:
        """Per-task supervised baseline: L_sup = Dice + CE of each sample under its own task prompt."""
        logits = self.student(x, t)
        dice, ce = supervised_loss(logits, y)
        loss = self.options.w_sup * (dice + ce)
        logs = {"sup": (dice + ce).detach(), "sup_dice": dice.detach(), "sup_ce": ce.detach(),
                "train_dice": train_dice(foreground_prob(logits.detach()), y)}
        return StepOutput(loss, logs)

    def _stage1(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> StepOutput:
        """Spec 3.1: supervised loss, synthetic CutMix of halves (r = 2/3), L_chaos and L_spec."""
        spatial = tuple(x.shape[2:])
        m = box_mask(x.shape[0] // 2, spatial, self.options.stage1_box_ratio, x.device, self.generator)
        smix = synthetic_cutmix(x, y, t, m)
        sup_logits = self.student(x, t)  # step 1: own task per sample
        mix_logits = self.student.forward_tasks(smix.image, stage1_mix_queries(smix))  # [5, t_a, t_b]
        out = stage1_losses(sup_logits, y, mix_logits, smix, self.weights)
        logs = {k: v.detach() for k, v in out.items() if k != "loss"}
        logs["train_dice"] = train_dice(foreground_prob(sup_logits.detach()), y)
        logs["stage"] = torch.ones((), device=x.device)
        return StepOutput(out["loss"], logs)

    def _stage2(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, u: torch.Tensor,
                progress: Progress) -> StepOutput:
        """Spec 3.2: L_sup, labelled CutMix on the synthetic head, unlabelled composite mix(u, x; M2)
        queried with [5, 1, 2, 3, 4], consistency with the max aggregate and box supervision."""
        if u.shape != x.shape:
            raise ValueError(f"VerSemi stage 2 pairs unlabelled and labelled samples index by index: "
                             f"unlabelled batch {tuple(u.shape)} != labelled {tuple(x.shape)} "
                             "(set train.unlabelled_batch_size = train.batch_size)")
        b, spatial = x.shape[0], tuple(x.shape[2:])
        lo, hi = self.options.stage2_box_ratio_range
        m1 = random_box_mask(b // 2, spatial, lo, hi, self.generator, x.device)  # r1
        smix = synthetic_cutmix(x, y, t, m1)
        m2 = random_box_mask(b, spatial, lo, hi, self.generator, x.device)  # r2, an independent draw
        x_ul = mix(u, x, m2)  # unlabelled outside the box, the labelled image of the same index inside
        sup_logits = self.student(x, t)
        ls_logits = self.student(smix.image, torch.full_like(smix.task_a, SYNTHETIC_TASK))
        ul_logits = self.student.forward_tasks(x_ul, stage2_unlabeled_queries(x.device))
        weights = self.weights.at(self.stage2_epoch(progress))
        out = stage2_losses(sup_logits, y, ls_logits, smix.label, ul_logits, m2, weights,
                            detach_aggregate=self.options.detach_aggregate,
                            compat_cons_broadcast=self.options.compat_cons_broadcast)
        logs = {k: v.detach() for k, v in out.items() if k != "loss"}
        logs["train_dice"] = train_dice(foreground_prob(sup_logits.detach()), y)
        logs["stage"] = torch.full((), 2.0, device=x.device)
        return StepOutput(out["loss"], logs)


@dataclass
class VerSemiSupervisedOptions(VerSemiOptions):
    name: str = "versemi_supervised"
    pipeline: str = "supervised"


@register
class VerSemiSupervised(VerSemi):
    """The per-task supervised baseline under its own name (for ``bench compare``): same network, task
    prompts, labelled data only, L_sup = Dice + CE (spec 3.1 step 1 without the CutMix terms)."""

    name = "versemi_supervised"
    Options = VerSemiSupervisedOptions
    uses_unlabelled = False
    description = "per-task supervised baseline for VerSemi (task-prompted VNet, labelled data only)"
    default_pipeline = "supervised"
    presets = {"paper": {}, "released": {"train": {"amp": "off"}}}

