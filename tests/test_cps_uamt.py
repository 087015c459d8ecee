"""CPS (methods/cps.py) and UA-MT (methods/uamt.py) against slow references of their losses, plus the
options, the second network's life in the engine, and a 2D CPU run on the synthetic data; the same
classes on volumes (cps3d, uamt3d, mean_teacher3d with the 3D lineage's defaults) against the same
references, voxel-wise (bcp3d's reference is in test_baselines.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medsemi.checkpoints import load_checkpoint
from medsemi.config import load_config
from medsemi.data.contract import DatasetInfo, LabelSpec
from medsemi.engine.trainer import Trainer
from medsemi.losses import seg_loss
from medsemi.methods.base import Progress
from medsemi.methods.cps import CPS, CPSOptions, init_convs
from medsemi.methods.mean_teacher import noisy
from medsemi.methods.uamt import UAMT, UAMTOptions
from medsemi.nets.unet2d import UNet2D
from medsemi.schedules import consistency_weight, sigmoid_rampup

P = 32
KINDS = ("exclusive", "multilabel")
DEMO = "configs/demo.yaml"


def make_info(kind: str) -> DatasetInfo:
    if kind == "multilabel":
        return DatasetInfo("toy", 3, LabelSpec("multilabel", ("cup", "disc")), ("a", "b"), (P, P))
    return DatasetInfo("toy", 1, LabelSpec("exclusive", ("background", "organ", "lesion")), ("a", "b"), (P, P))


def make_batches(info: DatasetInfo, seed: int = 0, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    c, k = info.in_channels, info.label_spec.num_outputs
    if info.label_spec.multilabel:
        y = (torch.rand((b, k, P, P), generator=g) > 0.6).float()
    else:
        y = torch.randint(0, k, (b, P, P), generator=g)
    lab = {"image": torch.rand((b, c, P, P), generator=g) * 2 - 1, "label": y}
    weak = torch.rand((b, c, P, P), generator=g) * 2 - 1
    return lab, {"image": weak, "strong": weak.flip(-1)}


def unet(info: DatasetInfo, seed: int) -> UNet2D:
    torch.manual_seed(seed)
    return UNet2D(info.in_channels, info.label_spec.num_outputs, base_channels=4)


# ---------------------------------------------------------------------------------------------- CPS
def _hard_ce_reference(logits: torch.Tensor, other: torch.Tensor, spec: LabelSpec) -> torch.Tensor:
    """Slow CE of ``logits`` against the hard labels of ``other``: a loop over pixels (or voxels)."""
    b, c = logits.shape[:2]
    z, o = logits.double().reshape(b, c, -1), other.double().reshape(b, c, -1)
    total, n = 0.0, 0
    for i in range(b):
        for j in range(z.shape[2]):
            if spec.multilabel:
                for k in range(c):
                    t = 1.0 if torch.sigmoid(o[i, k, j]) >= 0.5 else 0.0
                    p = torch.sigmoid(z[i, k, j])
                    total += -(t * math.log(p) + (1 - t) * math.log(1 - p))
                    n += 1
            else:
                t = int(o[i, :, j].argmax())
                total += -float(torch.log_softmax(z[i, :, j], 0)[t])
                n += 1
    return torch.tensor(total / n, dtype=torch.float64)


@pytest.mark.parametrize("on_labelled", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_cps_loss_matches_reference(kind: str, on_labelled: bool) -> None:
    info = make_info(kind)
    spec = info.label_spec
    method = CPS(CPSOptions(cps_on_labelled=on_labelled), unet(info, 0), None, info, peer=unet(info, 1))
    lab, unl = make_batches(info)
    progress = Progress(300, 1000)
    out = method.train_step(lab, unl, progress)
    with torch.no_grad():  # train-mode forwards again: the same logits (BN uses the batch statistics)
        f1, f2 = method.student, method.peer
        sup = seg_loss(f1(lab["image"]), lab["label"], None, spec)[0] + seg_loss(f2(lab["image"]), lab["label"],
                                                                                 None, spec)[0]
        z1, z2 = f1(unl["image"]), f2(unl["image"])
        cps_1 = _hard_ce_reference(z1, z2, spec)  # the first learns the second's labels
        cps_2 = _hard_ce_reference(z2, z1, spec)
        if on_labelled:  # the paper's crossing on the labelled images as well
            l1, l2 = f1(lab["image"]), f2(lab["image"])
            cps_1, cps_2 = cps_1 + _hard_ce_reference(l1, l2, spec), cps_2 + _hard_ce_reference(l2, l1, spec)
    w = 0.1 * consistency_weight(300, 1000, 200)
    assert torch.allclose(out.logs["loss_cps"].double(), cps_1, atol=1e-5)
    assert torch.allclose(out.logs["loss_cps_peer"].double(), cps_2, atol=1e-5)
    assert torch.allclose(out.loss.detach().double(), sup.double() + w * (cps_1 + cps_2), atol=1e-5)


def test_cps_trains_both_networks_and_the_switch_chooses_the_evaluated_one() -> None:
    info = make_info("exclusive")
    a, b = unet(info, 0), unet(info, 1)
    method = CPS(CPSOptions(init="default"), a, None, info, peer=b)
    params = method.trainable_parameters()
    assert {id(p) for p in params} == {id(p) for p in [*a.parameters(), *b.parameters()]}
    lab, unl = make_batches(info)
    method.train_step(lab, unl, Progress(999, 1000)).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (a.outc.weight, b.outc.weight))
    assert set(method.eval_networks()) == {"student", "peer"}
    assert any(k.startswith("peer.") for k in method.state_dict())  # the checkpoint carries both
    first, second = unet(info, 0), unet(info, 1)
    swapped = CPS(CPSOptions(init="default", evaluate="second"), first, None, info, peer=second)
    assert swapped.student is second and swapped.peer is first
    with pytest.raises(ValueError, match="methods/cps.py.*second network"):
        CPS(CPSOptions(), unet(info, 0), None, info)


def test_cps_initialisations_differ_as_ssl4mis() -> None:
    torch.manual_seed(0)
    net = UNet2D(1, 2, base_channels=8)
    init_convs(net, "kaiming")
    w = net.down2.conv.block[0].weight.detach()  # fan_in = 8 * 9: std sqrt(2 / fan_in)
    assert abs(float(w.std()) - math.sqrt(2 / (w.shape[1] * 9))) < 0.1 * math.sqrt(2 / (w.shape[1] * 9))
    init_convs(net, "xavier")  # std sqrt(2 / (fan_in + fan_out))
    expected = math.sqrt(2 / (w.shape[1] * 9 + w.shape[0] * 9))
    assert abs(float(w.std()) - expected) < 0.1 * expected


@pytest.mark.parametrize("bad", [{"init": "orthogonal"}, {"evaluate": "both"}, {"consistency": -1.0}])
def test_cps_bad_options(bad: dict) -> None:
    with pytest.raises(ValueError, match="methods/cps.py"):
        CPSOptions(**bad)


# ---------------------------------------------------------------------------------------------- UA-MT
def test_teacher_noise_is_clamped_gaussian() -> None:
    x = torch.zeros(200_000)
    n = noisy(x, 0.1, torch.Generator().manual_seed(0))
    assert float(n.abs().max()) <= 0.2 + 1e-7 and float((n.abs() == 0.2).float().mean()) > 0.03  # P(|z|>2)≈4.6%
    assert abs(float(n.std()) - 0.1) < 0.01
    assert noisy(x, 0.0, None) is x


def _uamt_reference(method: UAMT, lab, unl, progress: Progress, seed: int) -> torch.Tensor:
    """Slow UA-MT loss: the generator replayed, T single passes stacked, entropy and masked mean by hand."""
    opt, spec = method.options, method.label_spec
    g = torch.Generator().manual_seed(seed)
    u = unl["image"]
    b = u.shape[0]
    with torch.no_grad():
        sup = seg_loss(method.student(lab["image"]), lab["label"], None, spec,
                       skip_background=getattr(opt, "sup_dice", "all") == "foreground")[0].double()
        target_in = u + (torch.randn(u.shape, generator=g) * 0.1).clamp(-0.2, 0.2)
        t_logits = method.teacher(target_in).double()
        preds = []
        for _ in range(opt.passes // opt.copies):
            rep = torch.cat([u] * opt.copies)
            out = method.teacher(rep + (torch.randn(rep.shape, generator=g) * 0.1).clamp(-0.2, 0.2)).double()
            preds += list(out.split(b))
        s_logits = method.student(u).double()
    act = (lambda z: torch.sigmoid(z)) if spec.multilabel else (lambda z: torch.softmax(z, 1))
    mu = torch.stack([act(p) for p in preds]).mean(0)
    if spec.multilabel:
        ent = -(mu * torch.log(mu + 1e-6) + (1 - mu) * torch.log(1 - mu + 1e-6))
        c = 2
    else:
        ent = -sum(mu[:, k:k + 1] * torch.log(mu[:, k:k + 1] + 1e-6) for k in range(mu.shape[1]))
        c = mu.shape[1]
    h = (0.75 + 0.25 * sigmoid_rampup(progress.iteration, progress.max_iterations)) * math.log(c)
    dist = (act(s_logits) - act(t_logits)) ** 2
    keep = (ent < h).expand_as(dist)
    cons = dist[keep].sum() / (keep.sum() + 1e-16)  # the masked mean over the kept elements
    w = 0.1 * consistency_weight(progress.iteration, progress.max_iterations, opt.ramp_epochs)
    return sup + w * cons


@pytest.mark.parametrize("kind", KINDS)
def test_uamt_loss_matches_reference(kind: str) -> None:
    info = make_info(kind)
    teacher = unet(info, 1)
    teacher.requires_grad_(False)
    method = UAMT(UAMTOptions(), unet(info, 0), teacher, info)
    method.generator = torch.Generator().manual_seed(7)
    lab, unl = make_batches(info)
    progress = Progress(600, 1000)
    out = method.train_step(lab, unl, progress)
    ref = _uamt_reference(method, lab, unl, progress, seed=7)
    assert torch.allclose(out.loss.detach().double(), ref, atol=1e-5), (out.loss, ref)
    assert 0.0 < float(out.logs["mask_ratio"]) <= 1.0


def test_uamt_threshold_ramp_and_options() -> None:
    info = make_info("exclusive")
    method = UAMT(UAMTOptions(), unet(info, 0), unet(info, 1), info)
    assert math.isclose(method.threshold(Progress(0, 100)), (0.75 + 0.25 * math.exp(-5)) * math.log(3))
    assert math.isclose(method.threshold(Progress(100, 100)), math.log(3))
    ln2 = UAMT(UAMTOptions(max_entropy="ln2"), unet(info, 0), unet(info, 1), info)
    assert math.isclose(ln2.threshold(Progress(100, 100)), math.log(2))
    for bad in ({"passes": 7}, {"copies": 0}, {"threshold_start": 1.5}, {"max_entropy": "e"}):
        with pytest.raises(ValueError, match="methods/uamt.py"):
            UAMTOptions(**bad)


def test_uamt_dropout_makes_the_teacher_passes_disagree() -> None:
    """With dropout and no input noise the T passes still differ, so the uncertainty is not the entropy of
    one prediction."""
    info = make_info("exclusive")
    torch.manual_seed(0)
    teacher = UNet2D(1, 3, base_channels=4, dropout=0.5)
    method = UAMT(UAMTOptions(teacher_noise=0.0), unet(info, 0), teacher, info)
    _, unl = make_batches(info)
    u = unl["image"]
    with torch.no_grad():
        single = torch.softmax(teacher(u), 1)
        one = -(single * torch.log(single + 1e-6)).sum(1, keepdim=True)
        assert not torch.allclose(method.uncertainty(u), one, atol=1e-4)


# ---------------------------------------------------------------------------------------------- runs
@pytest.mark.parametrize("name", ["cps", "uamt"])
def test_2d_run_loss_goes_down(tmp_path, tiny_overrides, name: str) -> None:
    cfg = load_config(DEMO, [*tiny_overrides, f"method.name={name}", "train.iterations=24", "train.eval_every=24",
                             "train.log_every=6", "train.optimizer=adam", "train.lr=0.003"], replace_method=True)
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    if name == "cps":  # both networks are saved; the evaluated one is the student
        state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
        assert any(k.startswith("peer.") for k in state["method"])
        assert not any(k.startswith("teacher.") for k in state["method"])


# --------------------------------------------------------------------- the same classes on volumes (3D)
SHAPE_3D = (32, 16, 16)  # the VNet's four stride-2 levels need multiples of 16 (InstanceNorm: > 1 voxel)


def _volume_case(seed: int = 0):
    from medsemi.nets.vnet import SegVNet

    info = DatasetInfo("toy3d", 1, LabelSpec("exclusive", ("background", "organ")), ("la",), SHAPE_3D)
    g = torch.Generator().manual_seed(seed)
    lab = {"image": torch.rand((2, 1, *SHAPE_3D), generator=g) * 2 - 1,
           "label": torch.randint(0, 2, (2, *SHAPE_3D), generator=g)}
    weak = torch.rand((2, 1, *SHAPE_3D), generator=g) * 2 - 1

    def vnet(s: int) -> SegVNet:
        torch.manual_seed(s)
        return SegVNet(1, 2, base_filters=2)

    return info, lab, {"image": weak, "strong": weak.flip(-1)}, vnet


def test_cps3d_loss_matches_reference() -> None:
    from medsemi.methods.cps import CPS3D, CPS3DOptions

    info, lab, unl, vnet = _volume_case()
    spec = info.label_spec
    method = CPS3D(CPS3DOptions(), vnet(0), None, info, peer=vnet(1))
    progress = Progress(300, 1000)
    out = method.train_step(lab, unl, progress)
    with torch.no_grad():
        f1, f2 = method.student, method.peer
        sup = seg_loss(f1(lab["image"]), lab["label"], None, spec)[0] + seg_loss(f2(lab["image"]), lab["label"],
                                                                                 None, spec)[0]
        z1, z2 = f1(unl["image"]), f2(unl["image"])
        cps_1, cps_2 = _hard_ce_reference(z1, z2, spec), _hard_ce_reference(z2, z1, spec)
    w = 0.1 * consistency_weight(300, 1000, method.options.ramp_epochs)
    assert torch.allclose(out.logs["loss_cps"].double(), cps_1, atol=1e-5)
    assert torch.allclose(out.logs["loss_cps_peer"].double(), cps_2, atol=1e-5)
    assert torch.allclose(out.loss.detach().double(), sup.double() + w * (cps_1 + cps_2), atol=1e-5)


def test_uamt3d_loss_matches_reference() -> None:
    """UA-MT on volumes: the 3D lineage's defaults (foreground Dice, 40-epoch ramp) against the slow
    reference, whose supervised term uses the foreground Dice as the options say."""
    from medsemi.methods.uamt import UAMT3D, UAMT3DOptions

    info, lab, unl, vnet = _volume_case(1)
    teacher = vnet(1)
    teacher.requires_grad_(False)
    method = UAMT3D(UAMT3DOptions(), vnet(0), teacher, info)
    assert method.options.sup_dice == "foreground" and method.options.ramp_epochs == 40
    method.generator = torch.Generator().manual_seed(7)
    progress = Progress(600, 1000)
    out = method.train_step(lab, unl, progress)
    ref = _uamt_reference(method, lab, unl, progress, seed=7)
    assert torch.allclose(out.loss.detach().double(), ref, atol=1e-5), (out.loss, ref)
    assert 0.0 < float(out.logs["mask_ratio"]) <= 1.0


def test_mean_teacher3d_loss_matches_reference() -> None:
    """Mean Teacher on volumes with the 3D lineage's defaults: CE + foreground Dice, the teacher on
    u + clamp(0.1·N(0, 1), ±0.2), the student on u, MSE of softmax probabilities, λ = 0.1 with a
    40-epoch sigmoid ramp; the consistency written out voxel-wise here."""
    from medsemi.methods.mean_teacher import MeanTeacher3D, MeanTeacher3DOptions

    info, lab, unl, vnet = _volume_case(2)
    teacher = vnet(1)
    teacher.requires_grad_(False)
    method = MeanTeacher3D(MeanTeacher3DOptions(), vnet(0), teacher, info)
    method.generator = torch.Generator().manual_seed(5)
    progress = Progress(400, 1000)
    out = method.train_step(lab, unl, progress)
    g = torch.Generator().manual_seed(5)
    u = unl["image"]
    with torch.no_grad():
        sup = seg_loss(method.student(lab["image"]), lab["label"], None, info.label_spec,
                       skip_background=True)[0].double()
        t = torch.softmax(teacher(u + (torch.randn(u.shape, generator=g) * 0.1).clamp(-0.2, 0.2)).double(), 1)
        s = torch.softmax(method.student(u).double(), 1)
    cons = sum(float((s[i, k, d, h, w] - t[i, k, d, h, w]) ** 2) for i in range(2) for k in range(2)
               for d in range(0, SHAPE_3D[0]) for h in range(SHAPE_3D[1]) for w in range(SHAPE_3D[2]))
    cons /= s.numel()
    w = 0.1 * consistency_weight(400, 1000, 40)
    assert abs(float(out.logs["loss_cons"]) - cons) < 1e-6
    assert torch.allclose(out.loss.detach().double(), sup + w * cons, atol=1e-5)
