"""UST-RUN (Ma et al., arXiv 2505.24567): MiDSS plus a queue of reliable unlabelled samples used as
extra paste sources, and an all-cover intermediate sample for the least reliable one.
One training step, spec ust-run.md section 4.3, step by step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medsemi.methods.base import Batch, Method, Progress, StepOutput
from medsemi.methods.intermediate import (
    IntermediateOptions,
    compile_blocker,
    run_calls,
    seg,
    style_shift,
    teacher_targets,
    total_loss,
    ucp_pairs,
)
from medsemi.methods.registry import register
from medsemi.ops.boxes import all_cover_boxes, random_boxes
from medsemi.ops.copy_paste import paste
from medsemi.ops.hardness import hardness
from medsemi.ops.reliable_queue import ReliableQueue, pick_hardest
from medsemi.schedules import consistency_weight

LQ_MODES = ("loss", "forward_only", "off")


@dataclass
class USTRUNOptions(IntermediateOptions):
    name: str = "ustrun"
    queue: bool = True  # reliable-sample queue as extra paste sources (step 2, 11)
    queue_length: int = 10  # capacity of the reliable-sample queue
    queue_fraction: float = 0.5  # at most floor(0.5 * B) sources come from the queue
    theta_init: float = 0.1  # adaptive threshold: initial value and cap
    theta_growth: float = 1.0005  # adaptive threshold: factor applied at each update (capped at theta_init)
    # unreliable-sample branch (steps 9-10): "loss" = the paper (its output joins L_ul);
    # "forward_only" = the released code (forward runs, output discarded); "off" = skipped
    lq_mode: str = "loss"
    hardness_empty_rule: str = "ust"  # both-empty class scores 0 (ust) or 1/1.001 (midss)
    hardness_ignore_absent: bool = False  # spec 6 item 3's alternative
    warmup_hardness_epochs: int = 1  # hardness forced to 1 during the first epoch(s)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lq_mode not in LQ_MODES:
            raise ValueError(f"method.lq_mode must be one of {LQ_MODES}, got {self.lq_mode!r}")


@register
class USTRUN(Method):
    name = "ustrun"
    Options = USTRUNOptions
    uses_teacher = True
    description = "UST-RUN: MiDSS + reliable-sample queue + unreliable-sample all-cover mix"
    smoothed_empty_rule = "ust"  # its metrics file returns 0 when both are empty (spec 3.4)
    # released: the LQ forward runs and its output is discarded (spec 6 item 1); fp16 autocast + GradScaler
    presets = {
        "paper": {"method": {"lq_mode": "loss"}},
        "released": {"method": {"lq_mode": "forward_only"}, "train": {"amp": "fp16"}},
    }

    def __init__(self, options, student, teacher, info) -> None:
        super().__init__(options, student, teacher, info)
        spec, size = info.label_spec, tuple(info.patch_size)
        self.queue = ReliableQueue.for_label_spec(
            spec, info.in_channels, size, capacity=options.queue_length, theta_init=options.theta_init,
            growth=options.theta_growth, cap=options.theta_init,
        )
        # the unreliable slot LQ: one weak image, its teacher label and mask (emptied every epoch)
        self.register_buffer("lq_image", torch.zeros(info.in_channels, *size))
        self.register_buffer("lq_label", torch.zeros(self.queue.label_shape, dtype=self.queue.labels.dtype))
        self.register_buffer("lq_mask", torch.zeros(self.queue.mask_shape))

    def _sources(self, x_l: torch.Tensor, y_l: torch.Tensor, b: int) -> tuple[torch.Tensor, ...]:
        """Step 2: min(floor(0.5 B), |Q|) sources from the queue, the rest labelled (with replacement),
        randomly permuted; source weight = stored teacher mask for queued ones, 1 for labelled."""
        g, dev = self.generator, x_l.device
        lab_idx = torch.randint(len(x_l), (b,), generator=g, device=g.device).to(dev)
        perm = torch.randperm(b, generator=g, device=g.device).to(dev)
        image, label = x_l[lab_idx], y_l[lab_idx]
        weight = torch.ones((b, *self.queue.mask_shape), device=dev)
        if not self.options.queue:
            return image, label, weight
        n_q = torch.clamp(self.queue.count, max=int(self.options.queue_fraction * b))
        from_queue = (torch.arange(b, device=dev) < n_q)[perm]
        q_img, q_lab, q_mask = self.queue.gather(self.queue.draw_indices(b, g)[perm])

        def pick(q: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
            return torch.where(from_queue.view(-1, *[1] * (q.dim() - 1)), q.to(lab.dtype), lab)

        return pick(q_img, image), pick(q_lab, label), pick(q_mask, weight)

    def _lq_mix(self, x_l: torch.Tensor, y_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step 9: LQ image outside, a random labelled image inside the all-cover box of the union
        of both foregrounds; target LQ label / GT, weight LQ mask / 1 (no TP-RAM, no strong aug)."""
        g, spec = self.generator, self.label_spec
        j = torch.randint(len(x_l), (1,), generator=g, device=g.device).to(x_l.device)
        lab_img, lab_y = x_l[j], y_l[j]
        lq_y = self.lq_label[None]
        region = spec.foreground(lq_y) | spec.foreground(lab_y)
        box = all_cover_boxes(region, g)
        x = paste(self.lq_image[None], lab_img, box)
        y = paste(lq_y, lab_y, box)
        k = paste(self.lq_mask[None], torch.ones_like(self.lq_mask[None]), box)
        return x, y, k

    def compile_blocker(self) -> str | None:
        return compile_blocker(self.options)  # type: ignore[arg-type]

    def train_step(self, labelled: Batch, unlabelled: Batch | None, progress: Progress) -> StepOutput:
        o, spec, g = self.options, self.label_spec, self.generator
        x_l, y_l = labelled["image"], labelled["label"]
        u_w, u_s = unlabelled["image"], unlabelled["strong"]
        b = len(u_w)
        # 2. sources from the labelled batch and the reliable queue
        source, src_y, src_k = self._sources(x_l, y_l, b)
        # 3. TP-RAM with the weak unlabelled view as style
        shifted = style_shift(source, u_w, progress.fraction, o, g)
        # 4. boxes, teacher forwards on the raw sources, SymGD
        box = random_boxes(b, *u_w.shape[-2:], generator=g, device=u_w.device, prob=o.box_prob)
        y0, k0, y_f, k_s = teacher_targets(self.teacher, u_w, source, box, spec, o)
        # 5. student on the weak view, for hardness only (no graph; train-mode BN as the original)
        with torch.no_grad():
            y_hat = spec.predict(self.student(u_w).float())
        # 6. UCP inputs with the chosen sources' labels and weights
        (x_ul, y_ul, k_ul), (x_lu, y_lu, k_lu) = ucp_pairs(u_s, shifted, src_y, src_k, y0, k0, box)
        # 9. the unreliable sample of the previous iteration (the slot is emptied every epoch); it is
        # an intermediate sample of the UCP term, so it needs UCP
        has_lq = o.ucp and o.lq_mode != "off" and progress.iteration % progress.epoch_length != 0
        lq = self._lq_mix(x_l, y_l) if has_lq else None
        # 7. student forwards in the original order: S(x_l), S(x_ul), S(x_lu), S(u_s), then S(x_lq)
        calls = [x_l] + ([x_ul, x_lu] if o.ucp else []) + [u_s] + ([lq[0]] if lq is not None else [])
        z = run_calls(self.student, calls, o.forward_mode, o.grouped_norm)
        z_s = z[3] if o.ucp else z[1]
        # 8. hardness = 1 - mean smoothed Dice(student, teacher); forced to 1 in the first epoch
        h = hardness(y_hat, y0, spec, o.hardness_empty_rule, o.hardness_ignore_absent)  # float64 as the original
        if progress.epoch < o.warmup_hardness_epochs:
            h = torch.ones_like(h)
        # 10. refill LQ with the hardest sample (first on ties)
        # index_select with a (1,) index tensor: indexing with the 0-dim tensor itself (``u_w[worst]``)
        # converts it to a Python int, a host synchronisation on a GPU
        worst = pick_hardest(h).view(1)
        self.lq_image.copy_(u_w.index_select(0, worst)[0])
        self.lq_label.copy_(y0.index_select(0, worst)[0].to(self.lq_label.dtype))
        self.lq_mask.copy_(k0.index_select(0, worst)[0])
        # 11. queue update and adaptive threshold
        theta_before = self.queue.theta.clone()
        reliable = self.queue.update(u_w, y0, k0, h) if o.queue else torch.zeros_like(h, dtype=torch.bool)
        # 12. losses; with lq_mode=loss the LQ output joins L_ul (one CE mean, one batch Dice over 5)
        terms = {"loss_sup": seg(z[0], y_l, None, spec), "loss_s": seg(z_s, y_f, k_s, spec)}
        if o.ucp:
            z_ul, t_ul, w_ul = z[1], y_ul, k_ul
            if lq is not None and o.lq_mode == "loss":
                z_ul = torch.cat([z_ul, z[-1]])
                t_ul, w_ul = torch.cat([y_ul, lq[1]]), torch.cat([k_ul, lq[2]])
            terms["loss_ul"] = seg(z_ul, t_ul, w_ul, spec)
            terms["loss_lu"] = seg(z[2], y_lu, k_lu, spec)
        w = consistency_weight(progress.iteration, progress.max_iterations, o.ramp_epochs)
        loss = total_loss(terms, w, o)
        logs = {k: v.detach() for k, v in terms.items()}
        logs.update(
            mask_ratio=k_s.float().mean(), hardness=h.float().mean(), reliable=reliable.float().sum(),
            theta=theta_before.float(), queue_size=self.queue.count.float(), w=torch.full((), w, device=loss.device),
        )
        return StepOutput(loss, logs)
