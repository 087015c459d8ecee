"""MiDSS (Ma et al., CVPR 2024, arXiv 2404.08951): intermediate domains by Unified Copy-Paste,
Symmetric Guidance and TP-RAM. One training step, spec ust-run.md section 4.2, step by step.
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
from medsemi.ops.boxes import random_boxes
from medsemi.schedules import consistency_weight


@dataclass
class MiDSSOptions(IntermediateOptions):
    name: str = "midss"


@register
class MiDSS(Method):
    name = "midss"
    Options = MiDSSOptions
    uses_teacher = True
    description = "MiDSS: UCP + SymGD + TP-RAM with a fixed labelled source per unlabelled image"
    smoothed_empty_rule = "midss"  # its metrics file leaves the empty-empty rule out: 1/1.001 (spec 3.4)
    # released: the public code autocasts in fp16 with a GradScaler (spec addendum "AMP dtype")
    presets = {"paper": {}, "released": {"train": {"amp": "fp16"}}}

    def compile_blocker(self) -> str | None:
        return compile_blocker(self.options)  # type: ignore[arg-type]

    def train_step(self, labelled: Batch, unlabelled: Batch | None, progress: Progress) -> StepOutput:
        o, spec, g = self.options, self.label_spec, self.generator
        x_l, y_l = labelled["image"], labelled["label"]
        u_w, u_s = unlabelled["image"], unlabelled["strong"]
        b = len(u_w)
        if len(x_l) < b:
            raise ValueError("MiDSS pairs unlabelled sample i with labelled sample i: "
                             "train.batch_size must be >= train.unlabelled_batch_size")
        # 2. source of unlabelled sample i = labelled sample i, label = GT, weight = 1
        source, src_y = x_l[:b], y_l[:b]
        # 3. TP-RAM on each source with the style of the weak unlabelled view it is pasted into
        shifted = style_shift(source, u_w, progress.fraction, o, g)
        # 4. one cut-mix box per unlabelled sample
        box = random_boxes(b, *u_w.shape[-2:], generator=g, device=u_w.device, prob=o.box_prob)
        # 5. teacher on u_w and both mixed images (raw source), SymGD fusion
        y0, k0, y_f, k_s = teacher_targets(self.teacher, u_w, source, box, spec, o)
        # 6. UCP inputs and targets
        (x_ul, y_ul, k_ul), (x_lu, y_lu, k_lu) = ucp_pairs(u_s, shifted, src_y, torch.ones_like(k0), y0, k0, box)
        # 7. student forwards in the original order S(x_l), S(x_ul), S(x_lu), S(u_s) (the order sets the
        # BatchNorm running statistics); separate calls unless forward_mode says otherwise
        calls = [x_l, x_ul, x_lu, u_s] if o.ucp else [x_l, u_s]
        z = run_calls(self.student, calls, o.forward_mode, o.grouped_norm)
        # 8. losses
        terms = {"loss_sup": seg(z[0], y_l, None, spec), "loss_s": seg(z[-1], y_f, k_s, spec)}
        if o.ucp:
            terms["loss_ul"] = seg(z[1], y_ul, k_ul, spec)
            terms["loss_lu"] = seg(z[2], y_lu, k_lu, spec)
        # 9. L = L_sup + w (L_ul + L_lu + w L_s)
        w = consistency_weight(progress.iteration, progress.max_iterations, o.ramp_epochs)
        loss = total_loss(terms, w, o)
        logs = {k: v.detach() for k, v in terms.items()}
        logs["mask_ratio"] = k_s.float().mean()
        logs["w"] = torch.full((), w, device=loss.device)  # a fill kernel, not a host-to-device copy
        return StepOutput(loss, logs)
