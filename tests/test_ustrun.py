"""MiDSS and UST-RUN training steps: both label kinds, and the queue / threshold / unreliable slot
evolving as spec ust-run.md 4.3 says on a constructed case."""

import copy

import pytest
import torch
from torch import nn

from medsemi.data.contract import DatasetInfo, LabelSpec
from medsemi.methods.base import Progress
from medsemi.methods.midss import MiDSS, MiDSSOptions
from medsemi.methods.ustrun import USTRUN, USTRUNOptions
from medsemi.nets.unet2d import UNet2D

SPECS = {
    "exclusive": LabelSpec("exclusive", ("background", "organ")),
    "multilabel": LabelSpec("multilabel", ("cup", "disc")),
}


def _batch(spec, channels, b=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(b, channels, size, size, generator=g) * 2 - 1
    if spec.multilabel:
        disc = (torch.rand(b, size, size, generator=g) > 0.5).float()
        label = torch.stack([disc * (torch.rand(b, size, size, generator=g) > 0.5).float(), disc], 1)
    else:
        label = (torch.rand(b, size, size, generator=g) > 0.5).long()
    return img, label


@pytest.mark.parametrize("kind", ["exclusive", "multilabel"])
@pytest.mark.parametrize("method_cls,options", [(MiDSS, MiDSSOptions), (USTRUN, USTRUNOptions)])
@pytest.mark.parametrize("forward_mode", ["separate", "fused"])
def test_step_runs_and_trains(kind, method_cls, options, forward_mode):
    torch.manual_seed(0)
    spec = SPECS[kind]
    ch = 3 if spec.multilabel else 1
    info = DatasetInfo("toy", ch, spec, ("a", "b"), (32, 32))
    student, teacher = UNet2D(ch, spec.num_outputs, 4), UNet2D(ch, spec.num_outputs, 4)
    method = method_cls(options(forward_mode=forward_mode), student, teacher, info)
    method.generator = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    x_l, y_l = _batch(spec, ch, seed=1)
    u_w, _ = _batch(spec, ch, seed=2)
    for it in range(4):
        out = method.train_step({"image": x_l, "label": y_l}, {"image": u_w, "strong": u_w * 0.9},
                                Progress(it, 10, epoch_length=2))
        assert torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        assert all(p.grad is not None for p in student.parameters())
        opt.step()
    assert {"loss_sup", "loss_s", "loss_ul", "loss_lu", "mask_ratio"} <= set(out.logs)


def _threshold_net(channels=1):
    """A deterministic 'network': foreground where the image is bright (no BatchNorm)."""
    net = nn.Conv2d(channels, 2, 1)
    with torch.no_grad():
        net.weight.zero_()
        net.weight[1, 0] = 20.0
        net.weight[0, 0] = -20.0
        net.bias.zero_()
    return net


def _square_images():
    """Four 16x16 images: 0 and 2 are empty (all dark), 1 has a 4x4 bright square, 3 a 6x6 one."""
    u = -torch.ones(4, 1, 16, 16)
    u[1, :, 2:6, 2:6] = 1.0
    u[3, :, 5:11, 5:11] = 1.0
    return u


def test_queue_threshold_and_unreliable_slot_follow_spec():
    spec = SPECS["exclusive"]
    info = DatasetInfo("toy", 1, spec, ("a",), (16, 16))
    student = _threshold_net()
    method = USTRUN(USTRUNOptions(), student, copy.deepcopy(student), info)
    method.generator = torch.Generator().manual_seed(0)
    u = _square_images()
    x_l = -torch.ones(4, 1, 16, 16)
    x_l[:, :, 8:12, 8:12] = 1.0
    y_l = (x_l[:, 0] > 0).long()
    lb, ub = {"image": x_l, "label": y_l}, {"image": u, "strong": u}

    def step(it):
        return method.train_step(lb, ub, Progress(it, 100, epoch_length=2))

    # epoch 0: hardness forced to 1 -> nothing reliable, queue stays empty, θ unchanged,
    # LQ = sample 0 (first of the ties)
    step(0)
    assert int(method.queue.count) == 0 and float(method.queue.theta) == pytest.approx(0.1)
    assert torch.equal(method.lq_image, u[0])
    step(1)
    assert int(method.queue.count) == 0

    # epoch 1: student == teacher, so hardness = 1 - (2n+1)/(2n+1.001) for the squares, and 1 for
    # the empty images (both-empty class scores 0 under the UST rule)
    h_sq = {1: 1 - 33 / 33.001, 3: 1 - 73 / 73.001}
    out = step(2)
    assert float(out.logs["reliable"]) == 2
    assert int(method.queue.count) == 2
    # inserted at the front in batch order
    assert torch.equal(method.queue.images[0], u[1]) and torch.equal(method.queue.images[1], u[3])
    assert method.queue.hardness[:2].tolist() == pytest.approx([h_sq[1], h_sq[3]], rel=1e-4)
    # θ <- min(θ, max stored h) = h of the smaller square
    assert float(method.queue.theta) == pytest.approx(h_sq[1], rel=1e-4)
    # LQ <- first sample with the largest hardness: image 0 (empty)
    assert torch.equal(method.lq_image, u[0])

    # same batch again: only the larger square is strictly below θ; it goes to the front and θ stays
    theta = float(method.queue.theta)
    out = step(3)
    assert float(out.logs["reliable"]) == 1 and int(method.queue.count) == 3
    assert torch.equal(method.queue.images[0], u[3]) and torch.equal(method.queue.images[1], u[1])
    assert float(method.queue.theta) == pytest.approx(theta, rel=1e-9)

    # a batch of empty images: nothing reliable -> θ relaxes by ×1.0005 (capped at 0.1)
    ub["image"] = ub["strong"] = -torch.ones(4, 1, 16, 16)
    out = step(4)  # iteration 4 starts an epoch: the LQ slot from iteration 3 is not used
    assert float(out.logs["reliable"]) == 0 and int(method.queue.count) == 3
    assert float(method.queue.theta) == pytest.approx(theta * 1.0005, rel=1e-6)


def test_lq_branch_reaches_the_loss_only_in_paper_mode():
    spec = SPECS["exclusive"]
    info = DatasetInfo("toy", 1, spec, ("a",), (32, 32))
    u = torch.nn.functional.interpolate(_square_images(), scale_factor=2.0)  # 32 px: batch-1 BN needs >1 value
    x_l = -torch.ones(4, 1, 32, 32)
    x_l[:, :, 8:12, 8:12] = 1.0
    y_l = (x_l[:, 0] > 0).long()
    losses = {}
    for mode in ("loss", "forward_only"):
        torch.manual_seed(0)
        student = UNet2D(1, 2, 4)
        method = USTRUN(USTRUNOptions(lq_mode=mode), student, copy.deepcopy(student), info)
        method.generator = torch.Generator().manual_seed(0)
        for it in range(2):  # iteration 1 uses the LQ filled at iteration 0
            out = method.train_step({"image": x_l, "label": y_l}, {"image": u, "strong": u},
                                    Progress(it, 100, epoch_length=500))
        losses[mode] = float(out.logs["loss_ul"])
    assert losses["loss"] != pytest.approx(losses["forward_only"], abs=1e-7)
