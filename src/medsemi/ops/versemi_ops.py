"""Pure tensor pieces of VerSemi's training step (spec ``versemi.md`` sections 3.0-3.3, 3.7, 6).

Everything is batched and stays on the device (no ``.item()``, no NumPy, no loop over samples).
Conventions: task ids are 1-based (1-4 real tasks, 5 = synthetic task); labels handed to these
functions are **binary** ``{0, 1}`` int64 ``(B, *S)`` (use :func:`binarize_label`: only the value 1
is foreground, spec 1.4); probabilities are foreground softmax probabilities ``(B, *S)``.

Box masks follow the original ``context_mask``: **1 outside the box, 0 inside**, int64, and
``mix(a, b, M) = a*M + b*(1-M)`` takes the box content from the *second* argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from medsemi.schedules import sigmoid_rampup  # exp(-5 (1 - t/L)^2), one definition for all methods

__all__ = [
    "SYNTHETIC_TASK",
    "REAL_TASKS",
    "LossWeights",
    "SyntheticMix",
    "aggregate_task_probs",
    "binarize_label",
    "box_mask",
    "box_supervision_loss",
    "consistency_loss",
    "draw_box_ratio",
    "foreground_prob",
    "mix",
    "sigmoid_rampup",
    "soft_dice_loss",
    "stage1_losses",
    "stage1_mix_queries",
    "stage2_losses",
    "stage2_unlabeled_queries",
    "supervised_loss",
    "synthetic_cutmix",
    "task_specific_loss",
    "task_specific_targets",
    "train_dice",
]

SYNTHETIC_TASK = 5
REAL_TASKS = (1, 2, 3, 4)
assert SYNTHETIC_TASK == len(REAL_TASKS) + 1 and REAL_TASKS == tuple(range(1, SYNTHETIC_TASK))
_EPS = 1e-5


# --- 3.0 primitives ----------------------------------------------------------------------------
def binarize_label(label: torch.Tensor) -> torch.Tensor:
    """Binary label: only the value 1 is foreground (spec 1.4, ``lab == 1``)."""
    return (label == 1).long()


def foreground_prob(logits: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """Foreground probability of 2-way softmax logits; the channel axis is removed (spec 2.2 step 7)."""
    if logits.shape[channel_dim] != 2:
        raise ValueError(
            f"ops/versemi_ops.py: expected 2 logit channels on dim {channel_dim}, got {tuple(logits.shape)}"
        )
    return torch.softmax(logits.float(), dim=channel_dim).select(channel_dim, 1)


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """VerSemi/BCP ``dice_loss`` (spec 3.0): ``1 - (2 sum p y + eps) / (sum p^2 + sum y^2 + eps)``.

    Sums run over **every element of the batch at once** (not per sample / per task); the
    denominator uses squares. ``target`` may be binary or soft.
    """
    if prob.shape != target.shape:
        raise ValueError(
            f"ops/versemi_ops.py: Dice needs equal shapes, got {tuple(prob.shape)} and {tuple(target.shape)}"
        )
    p = prob.float()
    y = target.float()
    inter = (p * y).sum()
    return 1.0 - (2.0 * inter + eps) / ((p * p).sum() + (y * y).sum() + eps)


def supervised_loss(logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L_sup parts (spec 3.1 step 1): (batch soft Dice on the foreground prob, 2-class CE mean).

    ``logits`` (B, 2, *S), ``label`` (B, *S) binary int64.
    """
    if logits.shape[0] != label.shape[0] or logits.shape[2:] != label.shape[1:]:
        raise ValueError(
            f"ops/versemi_ops.py: logits {tuple(logits.shape)} do not match label {tuple(label.shape)}"
        )
    dice = soft_dice_loss(foreground_prob(logits), label)
    ce = F.cross_entropy(logits.float(), label.long())
    return dice, ce


def draw_box_ratio(low: float = 0.3, high: float = 0.6, generator: torch.Generator | None = None) -> float:
    """r ~ U(low, high) on the host CPU generator (stage 2 draws one r per mask, spec 3.2). No device sync."""
    return low + (high - low) * float(torch.rand((), generator=generator))


def box_mask(
    batch: int,
    spatial: tuple[int, ...] | torch.Size,
    ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """BCP/VerSemi ``context_mask`` (spec 3.0), one box per sample, batched.

    Side ``s_k = int(size_k * ratio)`` on every axis (one side for the whole batch); per sample
    and axis a start drawn uniformly in ``[0, size_k - s_k)`` (upper bound excluded: the box never
    touches the far face, note N12; the original hard-codes 96 = the patch size). Returns int64
    ``(batch, *spatial)``: 1 outside the box, 0 inside. Add a channel axis with ``unsqueeze(1)``.
    """
    spatial = tuple(int(s) for s in spatial)
    sides = [int(s * ratio) for s in spatial]
    for size, side in zip(spatial, sides):
        if not 1 <= side < size:
            raise ValueError(
                f"ops/versemi_ops.py: box ratio {ratio} gives side {side} on an axis of {size}; "
                "need 1 <= side < size"
            )
    inside = torch.ones((batch,) + (1,) * len(spatial), dtype=torch.bool, device=device)
    for k, (size, side) in enumerate(zip(spatial, sides)):
        start = torch.randint(0, size - side, (batch,), device=device, generator=generator)
        idx = torch.arange(size, device=device)
        ax = (idx >= start[:, None]) & (idx < start[:, None] + side)  # (B, size_k)
        shape = [batch] + [1] * len(spatial)
        shape[1 + k] = size
        inside = inside & ax.view(shape)
    return (~inside).long()


def mix(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``a * M + b * (1 - M)`` (exact select): ``a`` outside the box, ``b`` inside (spec 3.0).

    ``mask`` (B, *S); for images (B, C, *S) the channel axis is added automatically.
    """
    if a.shape != b.shape:
        raise ValueError(f"ops/versemi_ops.py: cannot mix {tuple(a.shape)} with {tuple(b.shape)}")
    n_sp = mask.dim() - 1
    ok = a.dim() in (mask.dim(), mask.dim() + 1) and a.shape[0] == mask.shape[0]
    if not ok or a.shape[-n_sp:] != mask.shape[1:]:
        raise ValueError(f"ops/versemi_ops.py: mask {tuple(mask.shape)} does not fit tensor {tuple(a.shape)}")
    m = mask.bool()
    if a.dim() == mask.dim() + 1:
        m = m.unsqueeze(1)
    return torch.where(m, a, b)


# --- 3.1 synthetic CutMix and task-specific constraint -----------------------------------------
class SyntheticMix(NamedTuple):
    """Composite of batch halves a = [0, B/2) and b = [B/2, B) (pairs (i, i + B/2)), spec 3.1 steps 2-5.

    ``label`` = union label of the synthetic task (a's foreground outside the box, b's inside);
    ``target_a`` / ``target_b`` = task-specific targets (y_a*M, y_b*(1-M), or the full mixed label
    for same-task pairs).
    """

    image: torch.Tensor
    label: torch.Tensor
    mask: torch.Tensor
    task_a: torch.Tensor
    task_b: torch.Tensor
    target_a: torch.Tensor
    target_b: torch.Tensor


def task_specific_targets(
    y_a: torch.Tensor, y_b: torch.Tensor, mask: torch.Tensor, task_a: torch.Tensor, task_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_spec targets (spec 3.1 step 5): ``y_a*M``, ``y_b*(1-M)``; if ``t_a == t_b`` both = mix(y_a, y_b)."""
    m = mask.long()
    same = (task_a == task_b).view((-1,) + (1,) * (y_a.dim() - 1))
    y_mix = mix(y_a, y_b, mask)
    target_a = torch.where(same, y_mix, y_a * m)
    target_b = torch.where(same, y_mix, y_b * (1 - m))
    return target_a, target_b


def synthetic_cutmix(
    image: torch.Tensor, label: torch.Tensor, task_ids: torch.Tensor, mask: torch.Tensor
) -> SyntheticMix:
    """Synthetic-task composite of the two halves of a labelled batch (spec 3.1 steps 2-3, 3.2 step 2).

    ``image`` (B, C, *S), ``label`` (B, *S) binary, ``task_ids`` (B,), ``mask`` (B/2, *S) from
    :func:`box_mask` (stage 1: ratio 2/3; stage 2: U(0.3, 0.6)).
    """
    b = image.shape[0]
    if b % 2 or label.shape[0] != b or task_ids.shape != (b,):
        raise ValueError(
            "ops/versemi_ops.py: synthetic CutMix needs an even batch with matching labels and (B,) "
            "task ids, got "
            f"image {tuple(image.shape)}, label {tuple(label.shape)}, task_ids {tuple(task_ids.shape)}"
        )
    h = b // 2
    if mask.shape != (h, *label.shape[1:]):
        raise ValueError(f"ops/versemi_ops.py: mask must be {(h, *label.shape[1:])}, got {tuple(mask.shape)}")
    x_a, x_b, y_a, y_b = image[:h], image[h:], label[:h], label[h:]
    t_a, t_b = task_ids[:h], task_ids[h:]
    target_a, target_b = task_specific_targets(y_a, y_b, mask, t_a, t_b)
    return SyntheticMix(mix(x_a, x_b, mask), mix(y_a, y_b, mask), mask, t_a, t_b, target_a, target_b)


def stage1_mix_queries(smix: SyntheticMix) -> torch.Tensor:
    """Task queries on the stage-1 composite, (B/2, 3): [synthetic 5, t_a, t_b] for ``forward_tasks``."""
    return torch.stack([torch.full_like(smix.task_a, SYNTHETIC_TASK), smix.task_a, smix.task_b], dim=1)


def task_specific_loss(
    prob_a: torch.Tensor, prob_b: torch.Tensor, target_a: torch.Tensor, target_b: torch.Tensor
) -> torch.Tensor:
    """L_spec = 1/2 [Dice(p_{t_a}(x_mix), target_a) + Dice(p_{t_b}(x_mix), target_b)] (spec 3.1 step 5)."""
    return 0.5 * (soft_dice_loss(prob_a, target_a) + soft_dice_loss(prob_b, target_b))


# --- 3.2 aggregate, consistency, box supervision ----------------------------------------------
def stage2_unlabeled_queries(device: torch.device | str | None = None) -> torch.Tensor:
    """Queries on the unlabelled composite, (5,): [5, 1, 2, 3, 4] (synthetic first, then the real tasks).

    Built with ``arange`` on the device: no host-to-device copy (a synchronisation) inside a step.
    """
    n = len(REAL_TASKS) + 1
    return (torch.arange(n, dtype=torch.long, device=device) + n - 1) % n + 1


def aggregate_task_probs(probs: torch.Tensor, dim: int = 1, detach: bool = False) -> torch.Tensor:
    """q = clip(max_t p_t, 0, 1): voxel-wise **max** of the real-task foreground probs (spec 3.2 step 5).

    No temperature, no threshold. Not detached by default (as in the code, note N3); gradients go
    to the arg-max head (split evenly on exact ties). ``detach=True`` = switch ``detach_aggregate``.
    """
    q = probs.amax(dim=dim).clamp(0.0, 1.0)
    return q.detach() if detach else q


def consistency_loss(synthetic_prob: torch.Tensor, aggregate: torch.Tensor) -> torch.Tensor:
    """Unlabelled consistency L_chaos = Dice(s, q), soft target (spec 3.2 step 6)."""
    return soft_dice_loss(synthetic_prob, aggregate)


def box_supervision_loss(
    synthetic_prob: torch.Tensor, label: torch.Tensor, mask: torch.Tensor, compat_cons_broadcast: bool = False
) -> torch.Tensor:
    """Stage-2 L_cons: synthetic head vs the labelled GT inside the pasted box (spec 3.2 step 7).

    Default (intended): ``Dice(s * (1-M), y * (1-M))`` per sample, batch-global sums.
    ``compat_cons_broadcast=True`` reproduces the original bug (note N2): the (B, 1, *S) mask times
    (B, *S) tensors broadcasts to (B, B, *S) with entry [i, j] = sample j restricted to box i. It is
    computed without materialising B x B volumes: with box_i in {0, 1} and C = sum_i box_i,
    sum_ij box_i s_j y_j = sum_v C * sum_j s_j y_j, and likewise for the squares.
    """
    if synthetic_prob.shape != label.shape or mask.shape != label.shape:
        raise ValueError(
            "ops/versemi_ops.py: box supervision needs equal shapes, got "
            f"{tuple(synthetic_prob.shape)}, {tuple(label.shape)}, mask {tuple(mask.shape)}"
        )
    box = 1.0 - mask.float()
    s = synthetic_prob.float()
    y = label.float()
    if not compat_cons_broadcast:
        return soft_dice_loss(s * box, y * box)
    count = box.sum(0)
    inter = (count * (s * y).sum(0)).sum()
    ss = (count * (s * s).sum(0)).sum()
    yy = (count * (y * y).sum(0)).sum()
    return 1.0 - (2.0 * inter + _EPS) / (ss + yy + _EPS)


# --- 3.3 weights and ramp-up -------------------------------------------------------------------


@dataclass(frozen=True)
class LossWeights:
    """Loss weights of spec 3.3 (all 1 by default) and the optional ramp-up of spec 3.7 (off).

    ``sup``: L_sup; ``chaos``: labelled synthetic CutMix (stage-1 L_chaos, stage-2 L_chaos_sup);
    ``spec``: L_spec (stage 1); ``unsup``: unlabelled consistency Dice(s, q) (stage 2);
    ``cons``: box supervision L_cons (stage 2). With ``rampup_epochs > 0`` the two unlabelled terms
    (``unsup``, ``cons``) are multiplied by ``sigmoid_rampup(epoch, rampup_epochs)`` — the original
    computes such a ramp (40 epochs) and never uses it.
    """

    sup: float = 1.0
    chaos: float = 1.0
    spec: float = 1.0
    unsup: float = 1.0
    cons: float = 1.0
    rampup_epochs: float = 0.0

    def at(self, epoch: float) -> LossWeights:
        """Weights in effect at ``epoch`` (ramp applied to the unlabelled terms)."""
        r = sigmoid_rampup(epoch, self.rampup_epochs)
        return LossWeights(self.sup, self.chaos, self.spec, self.unsup * r, self.cons * r, 0.0)


# --- composed stage losses (pure: logits in, losses out) ---------------------------------------
def stage1_losses(
    sup_logits: torch.Tensor,
    label: torch.Tensor,
    mix_logits: torch.Tensor,
    smix: SyntheticMix,
    weights: LossWeights = LossWeights(),
) -> dict[str, torch.Tensor]:
    """Stage-1 loss (spec 3.1 step 6): L = w_sup L_sup + w_chaos L_chaos + w_spec L_spec.

    ``sup_logits`` (B, 2, *S): each sample queried with its own task; ``mix_logits``
    (B/2, 3, 2, *S): the composite queried with :func:`stage1_mix_queries` = [5, t_a, t_b].
    """
    if mix_logits.dim() != sup_logits.dim() + 1 or mix_logits.shape[1] != 3:
        raise ValueError(
            f"ops/versemi_ops.py: mix_logits must be (B/2, 3, 2, *S), got {tuple(mix_logits.shape)}"
        )
    sup_dice, sup_ce = supervised_loss(sup_logits, label)
    p = foreground_prob(mix_logits, channel_dim=2)  # (B/2, 3, *S)
    chaos = soft_dice_loss(p[:, 0], smix.label)
    spec = task_specific_loss(p[:, 1], p[:, 2], smix.target_a, smix.target_b)
    sup = sup_dice + sup_ce
    loss = weights.sup * sup + weights.chaos * chaos + weights.spec * spec
    return {"loss": loss, "sup": sup, "sup_dice": sup_dice, "sup_ce": sup_ce, "chaos": chaos, "spec": spec}


def stage2_losses(
    sup_logits: torch.Tensor,
    label: torch.Tensor,
    ls_logits: torch.Tensor,
    ls_label: torch.Tensor,
    ul_logits: torch.Tensor,
    ul_mask: torch.Tensor,
    weights: LossWeights = LossWeights(),
    detach_aggregate: bool = False,
    compat_cons_broadcast: bool = False,
) -> dict[str, torch.Tensor]:
    """Stage-2 loss (spec 3.2 step 8): L = w_sup L_sup + w_unsup L_chaos + w_cons L_cons + w_chaos L_chaos_sup

    ``sup_logits`` (B, 2, *S) with own tasks; ``ls_logits`` (B/2, 2, *S): labelled composite queried
    with task 5, ``ls_label`` its union label; ``ul_logits`` (B, 5, 2, *S): the unlabelled composite
    ``mix(u, x, ul_mask)`` queried with :func:`stage2_unlabeled_queries` = [5, 1, 2, 3, 4];
    ``ul_mask`` (B, *S). ``weights`` should already be ``weights.at(epoch)`` if ramped.
    """
    if ul_logits.dim() != sup_logits.dim() + 1 or ul_logits.shape[1] != 1 + len(REAL_TASKS):
        raise ValueError(f"ops/versemi_ops.py: ul_logits must be (B, 5, 2, *S), got {tuple(ul_logits.shape)}")
    sup_dice, sup_ce = supervised_loss(sup_logits, label)
    chaos_sup = soft_dice_loss(foreground_prob(ls_logits), ls_label)
    p = foreground_prob(ul_logits, channel_dim=2)  # (B, 5, *S)
    s = p[:, 0]
    q = aggregate_task_probs(p[:, 1:], dim=1, detach=detach_aggregate)
    chaos = consistency_loss(s, q)
    cons = box_supervision_loss(s, label, ul_mask, compat_cons_broadcast)
    sup = sup_dice + sup_ce
    loss = weights.sup * sup + weights.unsup * chaos + weights.cons * cons + weights.chaos * chaos_sup
    return {
        "loss": loss,
        "sup": sup,
        "sup_dice": sup_dice,
        "sup_ce": sup_ce,
        "chaos_sup": chaos_sup,
        "chaos": chaos,
        "cons": cons,
    }


def train_dice(prob: torch.Tensor, label: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Hard batch Dice at ``prob > threshold`` for logging (spec 3.1 step 8), on device (0-d tensor)."""
    pred = (prob > threshold).float()
    y = label.float()
    return 2.0 * (pred * y).sum() / (pred.sum() + y.sum()).clamp_min(1e-8)
