"""CPS: cross pseudo supervision (Chen et al., CVPR 2021, "Semi-Supervised Semantic Segmentation with
Cross Pseudo Supervision"), in the form of SSL4MIS ``train_cross_pseudo_supervision_2D.py`` /
``..._3D.py`` (the medical lineage); one class for 2D and 3D.

Two networks of the same architecture with different initialisations, both trained (the engine builds
the second one, ``peer``, because ``uses_peer``). With ``f1 = student``, ``f2 = peer`` and hard
pseudo-labels ``ŷ_i = argmax f_i(u)`` (sigmoid ≥ 0.5 for multi-label labels), detached:

``L = L_sup(f1(x), y) + L_sup(f2(x), y) + λ · w · (CE(f1(u), ŷ2) + CE(f2(u), ŷ1))``

(the paper's ``L = L_s + λ L_cps``, ``L_cps`` the two crossed CE terms), ``L_sup`` = CE + Dice of spec 3.3
(SSL4MIS: ``0.5 · (CE + Dice)``), ``λ = 0.1`` and ``w`` the sigmoid consistency ramp (SSL4MIS
``--consistency 0.1``). The paper (natural images) applies the crossed terms to the labelled images too
and uses λ = 1.5 without a ramp: ``cps_on_labelled=true consistency=1.5 ramp=false``; SSL4MIS and the
default apply them to the unlabelled images only.

Initialisation (``init``): ``kaiming_xavier`` (SSL4MIS): Kaiming-normal conv weights in the first network,
Xavier-normal in the second (conv biases and norm layers keep their defaults; SSL4MIS also resets
BatchNorm to weight 1, bias 0, which are PyTorch's defaults); ``default``: the two networks' independent
default initialisations (the paper: two Kaiming inits with different seeds). Both networks see the same
unlabelled view (``student_view``; SSL4MIS: the weak view). One optimiser over both networks (SSL4MIS: two
SGD optimisers with the same settings, which is the same update since the parameters are disjoint).

``evaluate`` chooses the network the engine evaluates, selects and saves (``first`` = the Kaiming one,
the paper's and SSL4MIS's model 1; ``second``): the method swaps the two roles at construction, so the
evaluated network is always ``student`` and the other ``peer`` (both are in the checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medsemi.data.contract import DatasetInfo
from medsemi.losses import weighted_ce
from medsemi.methods.base import SUP_DICE, Batch, Method, MethodOptions, Progress, StepOutput
from medsemi.methods.mean_teacher import require_unlabelled
from medsemi.methods.registry import register
from medsemi.ops.pseudo_label import pseudo_label
from medsemi.schedules import consistency_weight

_HERE = "methods/cps.py"
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def init_convs(net: nn.Module, kind: str) -> nn.Module:
    """Re-initialise every (non-transposed) conv weight of ``net`` in place: ``kaiming`` (normal, fan-in,
    as ``torch.nn.init.kaiming_normal_``'s defaults) or ``xavier`` (normal)."""
    fn = {"kaiming": nn.init.kaiming_normal_, "xavier": nn.init.xavier_normal_}[kind]
    for module in net.modules():
        if isinstance(module, _CONVS):
            fn(module.weight)
    return net


@dataclass
class CPSOptions(MethodOptions):
    name: str = "cps"
    consistency: float = 0.1  # λ (SSL4MIS --consistency 0.1; the paper: 1.5 on VOC)
    ramp: bool = True  # multiply λ by the sigmoid ramp w (SSL4MIS: yes)
    ramp_epochs: int = 200  # the ramp rises over training in this many equal "epochs" (SSL4MIS: 200 x 150 it)
    init: str = "kaiming_xavier"  # kaiming_xavier (SSL4MIS) | default (independent default inits)
    evaluate: str = "first"  # first | second: the network that is evaluated, selected and saved
    student_view: str = "weak"  # weak (SSL4MIS) | strong: the unlabelled view both networks see
    cps_on_labelled: bool = False  # true: the crossed CE also on the labelled images (the paper; SSL4MIS: no)
    sup_dice: str = "all"  # all (SSL4MIS's DiceLoss over every class) | foreground

    def __post_init__(self) -> None:
        for key, allowed in (("init", ("kaiming_xavier", "default")), ("evaluate", ("first", "second")),
                             ("student_view", ("weak", "strong"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{_HERE}: method.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.consistency < 0:
            raise ValueError(f"{_HERE}: method.consistency must be >= 0, got {self.consistency}")
        if self.ramp_epochs < 1:
            raise ValueError(f"{_HERE}: method.ramp_epochs must be >= 1, got {self.ramp_epochs}")
        if self.sup_dice not in SUP_DICE:
            raise ValueError(f"{_HERE}: method.sup_dice must be one of {SUP_DICE}, got {self.sup_dice!r}")


@register
class CPS(Method):
    name = "cps"
    Options = CPSOptions
    uses_peer = True
    description = "CPS: two differently initialised networks supervise each other with hard pseudo-labels"

    def __init__(self, options: CPSOptions, student: nn.Module, teacher: nn.Module | None, info: DatasetInfo,
                 peer: nn.Module | None = None) -> None:
        if peer is None:
            raise ValueError(f"{_HERE}: {self.name} needs a second network (peer); the engine builds it "
                             "because uses_peer is set")
        if options.init == "kaiming_xavier":
            init_convs(student, "kaiming")
            init_convs(peer, "xavier")
        if options.evaluate == "second":
            student, peer = peer, student
        super().__init__(options, student, teacher, info, peer=peer)

    def train_step(self, labelled: Batch, unlabelled: Batch | None, progress: Progress) -> StepOutput:
        opt: CPSOptions = self.options  # type: ignore[assignment]
        spec = self.label_spec
        assert self.peer is not None
        x, y = labelled["image"], labelled["label"]
        logits_l1, logits_l2 = self.student(x), self.peer(x)
        sup_1, ce_1, dice_1 = self.supervised_loss(logits_l1, y)
        sup_2, _, _ = self.supervised_loss(logits_l2, y)
        u = require_unlabelled(unlabelled, _HERE, ("image", "strong") if opt.student_view == "strong" else ("image",))
        u_in = u["strong"] if opt.student_view == "strong" else u["image"]
        logits_1, logits_2 = self.student(u_in), self.peer(u_in)
        pl_1, _ = pseudo_label(logits_1, spec, 0.0)  # detached hard labels
        pl_2, _ = pseudo_label(logits_2, spec, 0.0)
        cps_1 = weighted_ce(logits_1, pl_2, None, spec)  # the first network learns the second's labels
        cps_2 = weighted_ce(logits_2, pl_1, None, spec)
        if opt.cps_on_labelled:  # the paper's L_cps^l: the same crossing on the labelled images
            cps_1 = cps_1 + weighted_ce(logits_l1, pseudo_label(logits_l2, spec, 0.0)[0], None, spec)
            cps_2 = cps_2 + weighted_ce(logits_l2, pseudo_label(logits_l1, spec, 0.0)[0], None, spec)
        w = consistency_weight(progress.iteration, progress.max_iterations, opt.ramp_epochs) if opt.ramp else 1.0
        weight = opt.consistency * w
        loss = sup_1 + sup_2 + weight * (cps_1 + cps_2)
        logs = {"loss_sup": sup_1.detach(), "loss_sup_peer": sup_2.detach(), "ce": ce_1.detach(),
                "dice_loss": dice_1.detach(), "loss_cps": cps_1.detach(), "loss_cps_peer": cps_2.detach(),
                "cons_weight": torch.full((), weight, device=loss.device),
                "agreement": (pl_1 == pl_2).float().mean()}
        return StepOutput(loss, logs)


@dataclass
class CPS3DOptions(CPSOptions):
    name: str = "cps3d"


@register
class CPS3D(CPS):
    name = "cps3d"
    Options = CPS3DOptions
    spatial_dims = 3
    single_task = True
    description = "CPS on one task's volumes (two plain VNets; SSL4MIS's 3D script)"
