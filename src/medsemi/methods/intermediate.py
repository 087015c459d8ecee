"""Shared pieces of the intermediate-domain methods MiDSS and UST-RUN (spec ust-run.md 4.1-4.3).

Teacher targets with Symmetric Guidance, Unified Copy-Paste inputs, forward modes and the loss
``L = L_sup + w (L_ul + L_lu + w L_s)``. Pure tensor code: no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medsemi.data.contract import LabelSpec
from medsemi.losses import seg_loss
from medsemi.methods.base import MethodOptions
from medsemi.nets.grouped_norm import GroupedBatchNorm2d, ensure_grouped_norm, grouped_batches, grouped_norm_modules
from medsemi.nets.interleaved_norm import CallLayout, interleave_blocker, interleaved_batches
from medsemi.ops.copy_paste import paste
from medsemi.ops.pseudo_label import pseudo_label, symgd_fuse
from medsemi.ops.tpram import amplitude_mix, sample_ratios

FORWARD_MODES = ("separate", "fused", "grouped")
GROUPED_NORMS = ("auto", "interleaved", "loop", "one_pass")


@dataclass
class IntermediateOptions(MethodOptions):
    """Switches shared by MiDSS and UST-RUN; the defaults reproduce the papers' code."""

    threshold: float = 0.95  # pseudo-label confidence τ (spec 3.2)
    ucp: bool = True  # Unified Copy-Paste student terms L_ul and L_lu
    symgd: bool = True  # Symmetric Guidance fusion for the strong-view target (else the plain Y0, K0)
    tpram: bool = True  # Fourier amplitude mix of the pasted source towards the unlabelled style
    tpram_band: float = 0.01  # L: half-size of the low-frequency square = floor(L * P)
    box_prob: float = 1.0  # probability of a cut-mix box
    strong_weight_squared: bool = True  # the strong-view term is weighted w² (spec 4.2 step 9)
    ramp_epochs: int = 200  # consistency ramp: w = exp(-5 (1 - e/200)^2), e = floor(k / (max/200))
    # separate: one forward per call, per-call BatchNorm statistics (faithful, spec 3.5)
    # fused: the teacher calls in one forward and the student calls in one forward (shared BN
    # statistics; faster, changes semantics; off by default)
    # grouped: one forward per network like fused, but BatchNorm statistics and running buffers per
    # original call (nets/grouped_norm.py), equal to separate up to rounding
    forward_mode: str = "separate"
    # with forward_mode=grouped, how the per-call statistics are computed (all equal separate up to
    # rounding): interleaved = the calls' samples interleaved so that one native BatchNorm kernel per block
    # of equal calls computes them all (nets/interleaved_norm.py; NCHW, eager); loop = one native kernel
    # per call; one_pass = one reduction and one in-place running update per buffer (what torch.compile
    # can fuse); auto = interleaved where it fits (not compiled, not channels-last, fixed momentum), else loop
    grouped_norm: str = "auto"
    # paper | released: a bundle of the settings below and train.amp (Method.presets; explicit keys win)
    preset: str = "paper"

    def __post_init__(self) -> None:
        if self.forward_mode not in FORWARD_MODES:
            raise ValueError(f"method.forward_mode must be one of {FORWARD_MODES}, got {self.forward_mode!r}")
        if self.grouped_norm not in GROUPED_NORMS:
            raise ValueError(f"method.grouped_norm must be one of {GROUPED_NORMS}, got {self.grouped_norm!r}")


def compile_blocker(opts: IntermediateOptions) -> str | None:
    """Why ``train.compile=true`` does not work with these options (``grouped_norm=auto`` compiles with
    ``loop``)."""
    if opts.forward_mode == "grouped" and opts.grouped_norm == "interleaved":
        return ("method.grouped_norm=interleaved runs in eager mode only (it hands tensors to the BatchNorms "
                "from outside the traced forward); use grouped_norm=auto, loop or one_pass")
    return None


def run_calls(net: nn.Module, inputs: list[torch.Tensor], mode: str,
              grouped_norm: str = "auto") -> list[torch.Tensor]:
    """Run ``net`` on each input as separate calls (``separate``), or once on their concatenation with
    shared BatchNorm statistics (``fused``) or per-call statistics (``grouped``, spec 3.5, computed as
    ``grouped_norm`` says).

    ``grouped`` converts the network's BatchNorm2d modules to GroupedBatchNorm2d on first use, in place
    (only the class of each module object changes, so the optimiser keeps holding the same parameters);
    with ``torch.compile`` convert before compiling (``nets.grouped_norm.ensure_grouped_norm``). With
    ``interleaved`` the batch interleaves the calls' samples and each call's output is a strided view.
    """
    if mode not in FORWARD_MODES:
        raise ValueError(f"methods/intermediate.py: forward mode must be one of {FORWARD_MODES}, "
                         f"got {mode!r}")
    if mode == "separate" or len(inputs) == 1:
        return [net(x) for x in inputs]
    sizes = [len(x) for x in inputs]
    if mode == "fused":
        return list(net(torch.cat(inputs)).split(sizes))
    modules, impl = _grouped_setup(net, grouped_norm)
    if impl == "interleaved":
        layout = CallLayout.of(sizes)
        with interleaved_batches(net, modules, layout):
            out = net(layout.arrange(inputs))
        return layout.split(out)
    with grouped_batches(net, sizes, impl, modules):
        out = net(torch.cat(inputs))
    return list(out.split(sizes))


def _grouped_setup(net: nn.Module, grouped_norm: str) -> tuple[list[GroupedBatchNorm2d], str]:
    """The net's grouped BatchNorms and the computation ``grouped_norm`` resolves to, decided at the first
    grouped call and kept on the net (no walk over the modules per call). The first call converts the
    net's BatchNorm2d modules in place."""
    cache = net.__dict__.setdefault("_grouped_norm_setup", {})
    if grouped_norm not in cache:
        if "modules" not in cache:
            ensure_grouped_norm(net)
            cache["modules"] = grouped_norm_modules(net)
        modules = cache["modules"]
        blocker = interleave_blocker(net, modules)
        if grouped_norm == "interleaved" and blocker:
            raise ValueError(f"method.grouped_norm=interleaved does not fit this network: {blocker}; "
                             "use loop or one_pass")
        cache[grouped_norm] = ("loop" if blocker else "interleaved") if grouped_norm == "auto" else grouped_norm
    return cache["modules"], cache[grouped_norm]


def style_shift(source: torch.Tensor, style: torch.Tensor, fraction: float, opts: IntermediateOptions,
                generator: torch.Generator | None) -> torch.Tensor:
    """TP-RAM (spec 4.1): the source's low-frequency amplitude moves towards the style image's by
    λ ~ U(0, t) per sample."""
    if not opts.tpram:
        return source
    ratios = sample_ratios(len(source), fraction, generator, source.device)
    return amplitude_mix(source, style, ratios, opts.tpram_band)


@torch.no_grad()
def teacher_targets(
    teacher: nn.Module, u_w: torch.Tensor, source: torch.Tensor, box: torch.Tensor,
    spec: LabelSpec, opts: IntermediateOptions,
) -> tuple[torch.Tensor, ...]:
    """Teacher forwards on ``u_w``, ``u_w ⊕_M s`` and ``s ⊕_M u_w`` (raw source, no TP-RAM) and the
    SymGD fusion (spec 4.1). Returns ``(Y0, K0, Y_f, K_s)``."""
    p0, p_ul, p_lu = run_calls(
        teacher, [u_w, paste(u_w, source, box), paste(source, u_w, box)], opts.forward_mode, opts.grouped_norm
    )
    y0, k0 = pseudo_label(p0, spec, opts.threshold)
    if not opts.symgd:
        return y0, k0, y0, k0
    y_ul, k_ul = pseudo_label(p_ul, spec, opts.threshold)
    y_lu, k_lu = pseudo_label(p_lu, spec, opts.threshold)
    y_f, k_s = symgd_fuse(y0, k0, y_ul, k_ul, y_lu, k_lu, box)
    return y0, k0, y_f, k_s


def ucp_pairs(
    u_s: torch.Tensor, shifted: torch.Tensor, src_y: torch.Tensor, src_k: torch.Tensor,
    y0: torch.Tensor, k0: torch.Tensor, box: torch.Tensor,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Unified Copy-Paste (spec 4.1): ``x_ul = u_s ⊕_M s̃`` and ``x_lu = s̃ ⊕_M u_s`` with their
    targets and weights (teacher ``Y0``/``K0`` on the unlabelled part, source label/weight on the rest)."""
    x_ul = (paste(u_s, shifted, box), paste(y0, src_y, box), paste(k0, src_k, box))
    x_lu = (paste(shifted, u_s, box), paste(src_y, y0, box), paste(src_k, k0, box))
    return x_ul, x_lu


def total_loss(
    terms: dict[str, torch.Tensor], w: float, opts: IntermediateOptions
) -> torch.Tensor:
    """``L_sup + w (L_ul + L_lu + w' L_s)`` with ``w' = w`` (default) or 1 (spec 4.2 step 9)."""
    strong = terms["loss_s"] * (w if opts.strong_weight_squared else 1.0)
    unsup = strong
    if opts.ucp:
        unsup = unsup + terms["loss_ul"] + terms["loss_lu"]
    return terms["loss_sup"] + w * unsup


def seg(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
        spec: LabelSpec) -> torch.Tensor:
    return seg_loss(logits, target, weight, spec)[0]
