"""VerSemi method, 3D splits/sources/evaluation and 3D predict, end to end on CPU (spec versemi.md 3-4).

Slow-but-obvious references: separate full network passes per task query (instead of the shared
backbone), per-sample Python loops for masks, mixes and targets, and the Dice formula written out.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsemi.config import load_config
from medsemi.data.contract import DatasetInfo, LabelSpec
from medsemi.engine.trainer import Trainer
from medsemi.methods.base import Progress
from medsemi.methods.versemi import VerSemi, VerSemiOptions, random_box_mask
from medsemi.nets.task_prompted import TaskPromptedVNet
from medsemi.ops.versemi_ops import box_mask
from medsemi.workflows.compare import method_overrides, run_label

REPO = Path(__file__).resolve().parents[1]
CPU_CFG = REPO / "configs" / "versemi" / "synthetic3d_cpu.yaml"
S = 32
INFO = DatasetInfo("t", 1, LabelSpec("exclusive", ("background", "foreground")),
                   ("pancreas", "la", "spleen", "lung"), (S, S, S))

TINY = [
    "train.iterations=6", "method.stage1_iterations=3", "train.eval_every=6", "train.checkpoint_every=6",
    "train.log_every=1", "train.batch_size=2", "train.unlabelled_batch_size=2", "train.device=cpu",
    "train.progress_bar=false", "train.tensorboard=false", "data.options.strides=[32,32,32]",
    "data.options.synthetic.n_per_task=4", "data.options.synthetic.size_max=36",
]


# ----------------------------------------------------------------------------- references
def ref_dice(p, y):
    return 1 - (2 * (p * y).sum() + 1e-5) / ((p * p).sum() + (y * y).sum() + 1e-5)


def fg(logits):
    return torch.softmax(logits, dim=1)[:, 1]


def query(net, x, task):
    """A separate full pass with one task id for every sample (the original's way)."""
    return net(x, torch.full((x.shape[0],), task, dtype=torch.long))


def make_method(**opts):
    torch.manual_seed(0)
    net = TaskPromptedVNet(1, base_filters=4)
    m = VerSemi(VerSemiOptions(**opts), net, None, INFO)
    m.generator = torch.Generator().manual_seed(7)
    return m


def batch(b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, S, S, S, generator=g)
    y = (torch.rand(b, S, S, S, generator=g) > 0.7).long()
    y[0] = 2 * y[0]  # a value 2 is background (spec 1.4)
    t = torch.tensor([1, 2, 3, 1])[:b]  # pair (0, 3) has the same task
    return x, y, t


# ----------------------------------------------------------------------------- box masks
def test_random_box_mask_law():
    g = torch.Generator().manual_seed(3)
    sides = set()
    for _ in range(30):
        m = random_box_mask(5, (S, S, S), 0.3, 0.6, g, torch.device("cpu"))
        assert m.shape == (5, S, S, S) and m.dtype == torch.long
        inside = m == 0
        side = round(float(inside[0].sum()) ** (1 / 3))
        sides.add(side)
        assert int(S * 0.3) <= side <= int(S * 0.6)
        for i in range(5):  # one cube of the shared side per sample, never touching the far face
            idx = inside[i].nonzero()
            assert inside[i].sum() == side**3
            lo, hi = idx.min(0).values, idx.max(0).values
            assert torch.equal(hi - lo + 1, torch.full((3,), side))
            assert (lo < S - side).all()
    assert len(sides) > 3  # the ratio is redrawn each call
    # a degenerate range gives the fixed-ratio box of ops.box_mask (same side)
    m = random_box_mask(2, (S, S, S), 2 / 3, 2 / 3, g, torch.device("cpu"))
    assert int((m == 0).sum()) == 2 * int((box_mask(2, (S, S, S), 2 / 3) == 0)[0].sum())


# ----------------------------------------------------------------------------- the step vs the spec
def test_stage1_step_matches_reference():
    m = make_method(pipeline="released_main")
    x, y, t = batch()
    out = m.train_step({"image": x, "label": y, "task": t}, None, Progress(0, 10))
    # replay the generator to get the same box, then follow spec 3.1 literally
    mask = box_mask(2, (S, S, S), 2 / 3, generator=torch.Generator().manual_seed(7))
    net = m.student
    yb = (y == 1).long()
    sup = net(x, t)
    l_sup = ref_dice(fg(sup), yb.float()) + F.cross_entropy(sup, yb)
    xm = torch.stack([x[i] * mask[i] + x[i + 2] * (1 - mask[i]) for i in range(2)])
    ym = torch.stack([yb[i] * mask[i] + yb[i + 2] * (1 - mask[i]) for i in range(2)])
    l_chaos = ref_dice(fg(query(net, xm, 5)), ym.float())
    ta, tb = [], []
    for i in range(2):
        if t[i] == t[i + 2]:
            ta.append(ym[i]), tb.append(ym[i])
        else:
            ta.append(yb[i] * mask[i]), tb.append(yb[i + 2] * (1 - mask[i]))
    pa = fg(net(xm, t[:2]))  # the composite queried with a's task ids, then with b's (batch passes)
    pb = fg(net(xm, t[2:]))
    l_spec = 0.5 * (ref_dice(pa, torch.stack(ta).float()) + ref_dice(pb, torch.stack(tb).float()))
    assert out.loss.item() == pytest.approx((l_sup + l_chaos + l_spec).item(), rel=1e-4)
    assert out.logs["spec"].item() == pytest.approx(l_spec.item(), rel=1e-4)


@pytest.mark.parametrize("compat", [False, True])
def test_stage2_step_matches_reference(compat):
    m = make_method(pipeline="stage2_only", compat_cons_broadcast=compat)
    x, y, t = batch()
    u = torch.randn(4, 1, S, S, S, generator=torch.Generator().manual_seed(5))
    out = m.train_step({"image": x, "label": y, "task": t}, {"image": u}, Progress(0, 10))
    g = torch.Generator().manual_seed(7)
    m1 = random_box_mask(2, (S, S, S), 0.3, 0.6, g, torch.device("cpu"))
    m2 = random_box_mask(4, (S, S, S), 0.3, 0.6, g, torch.device("cpu"))
    net = m.student
    yb = (y == 1).long()
    sup = net(x, t)
    l_sup = ref_dice(fg(sup), yb.float()) + F.cross_entropy(sup, yb)
    xm = torch.stack([x[i] * m1[i] + x[i + 2] * (1 - m1[i]) for i in range(2)])
    ym = torch.stack([yb[i] * m1[i] + yb[i + 2] * (1 - m1[i]) for i in range(2)])
    l_chaos_sup = ref_dice(fg(query(net, xm, 5)), ym.float())
    xul = torch.stack([u[i] * m2[i] + x[i] * (1 - m2[i]) for i in range(4)])
    s = fg(query(net, xul, 5))
    q = torch.stack([fg(query(net, xul, k)) for k in (1, 2, 3, 4)]).max(0).values
    l_unsup = ref_dice(s, q)
    if compat:  # the original's line, broadcasting (B, 1, *S) against (B, *S)
        box = (1 - m2).unsqueeze(1).float()
        l_cons = ref_dice(s * box, yb.float() * box)
    else:
        box = (1 - m2).float()
        l_cons = ref_dice(s * box, yb.float() * box)
    expect = l_sup + l_chaos_sup + l_unsup + l_cons
    assert out.loss.item() == pytest.approx(expect.item(), rel=1e-4)
    assert out.logs["cons"].item() == pytest.approx(l_cons.item(), rel=1e-4)


@pytest.mark.parametrize("detach", [False, True])
def test_detach_aggregate_stops_gradient_to_real_task_codes(detach):
    """With only the unlabelled consistency active, the controller columns of task codes 1-4 receive a
    gradient through max_t p_t unless the aggregate is detached (spec N3)."""
    m = make_method(pipeline="stage2_only", detach_aggregate=detach, w_sup=0.0, w_chaos=0.0, w_cons=0.0)
    x, y, t = batch()
    u = torch.randn(4, 1, S, S, S, generator=torch.Generator().manual_seed(5))
    out = m.train_step({"image": x, "label": y, "task": t}, {"image": u}, Progress(0, 10))
    out.loss.backward()
    w = m.student.controller.weight.grad[:, -5:, 0, 0, 0]  # columns of the one-hot code
    assert w[:, 4].abs().sum() > 0  # the synthetic code always gets a gradient
    assert (w[:, :4].abs().sum() == 0) == detach


def test_supervised_pipeline_and_stage_schedule():
    m = make_method(pipeline="supervised")
    x, y, t = batch()
    out = m.train_step({"image": x, "label": y, "task": t}, None, Progress(0, 10))
    sup = m.student(x, t)
    yb = (y == 1).long()
    assert out.loss.item() == pytest.approx((ref_dice(fg(sup), yb.float()) + F.cross_entropy(sup, yb)).item(),
                                            rel=1e-4)
    two = make_method(stage1_iterations=4)
    stages = [two.stage_at(Progress(i, 10)) for i in range(10)]
    assert stages == ["stage1"] * 4 + ["stage2"] * 6
    assert [two.on_stage_start(Progress(i, 10)) for i in range(10)] == [i == 4 for i in range(10)]
    assert make_method(stage1_fraction=0.3).stage1_end(Progress(0, 10)) == 3
    ramp = make_method(stage1_iterations=4, epoch_iterations=2)  # ramp-up epochs count from stage 2
    assert [ramp.stage2_epoch(Progress(i, 10)) for i in (0, 4, 5, 6, 9)] == [0, 0, 0, 1, 2]
    assert not any(make_method(pipeline="released_main").on_stage_start(Progress(i, 10)) for i in range(10))
    with pytest.raises(ValueError, match="pipeline"):
        make_method(pipeline="stage3")


# ----------------------------------------------------------------------------- through the Trainer
def _cfg(run_overrides=()):
    return load_config(CPU_CFG, [*TINY, *run_overrides])


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.method.state_dict().items()}


def test_two_stages_through_trainer(tmp_path):
    torch.manual_seed(0)
    tr = Trainer(_cfg(), tmp_path / "run")
    assert tr.unlabelled is not None and tr.family.test_volumes
    tr.fit(stop_after=3)  # the whole of stage 1
    before = {k: v.clone() for k, v in tr.student.state_dict().items()}
    old_opt = tr.optimizer
    assert old_opt.state[next(iter(tr.student.parameters()))]["step"].item() == 3
    tr._stop = False  # fit() may be called again after a requested stop
    tr.fit(stop_after=1)  # the first stage-2 step: fresh Adam, same weights
    assert tr.optimizer is not old_opt
    assert tr.optimizer.state[next(iter(tr.student.parameters()))]["step"].item() == 1
    after = tr.student.state_dict()
    for k, v in before.items():
        if v.is_floating_point() and "running" not in k:
            # one fresh-Adam step moves each weight by at most ~lr: the weights were kept, not re-initialised
            assert (after[k] - v).abs().max() <= 1.01e-3, k
    tr._stop = False
    tr.fit()
    assert tr.finished
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in records if r["kind"] == "train"]
    assert stages == [1.0] * 3 + [2.0] * 3
    last_train = [r for r in records if r["kind"] == "train"][-1]
    assert {"chaos", "cons", "chaos_sup"} <= set(last_train)
    ev = [r for r in records if r["kind"] == "eval"][-1]
    assert ev["test_student_dice"] == pytest.approx(ev["test_student_dice_pancreas"])  # spec 4.5
    assert {f"test_student_dice_{k}" for k in ("la", "spleen", "lung")} <= set(ev)
    assert (tmp_path / "run" / "checkpoints" / "best_test.pt").exists()
    summary = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert summary["labelled_per_task"] == {"pancreas": 2, "la": 2, "spleen": 2, "lung": 2}


def test_released_main_has_no_unlabelled_stream(tmp_path):
    tr = Trainer(_cfg(["method.pipeline=released_main", "train.iterations=1"]), tmp_path / "run")
    assert tr.unlabelled is None and tr.family.unlabelled_volumes == []


def test_resume_equals_uninterrupted(tmp_path):
    straight = Trainer(_cfg(), tmp_path / "straight")
    straight.fit()
    run = tmp_path / "resumed"
    first = Trainer(_cfg(), run)
    first.fit(stop_after=2)  # inside stage 1
    del first
    second = Trainer(_cfg(), run, resume=True)
    assert second.iteration == 2
    second.fit(stop_after=1)  # stops exactly at the stage boundary
    del second
    third = Trainer(_cfg(), run, resume=True)
    assert third.iteration == 3
    third.fit()
    a, b = _weights(straight), _weights(third)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert straight.best == third.best


# ----------------------------------------------------------------------------- evaluation, predict, compare
class ConstantNet(torch.nn.Module):
    """Predicts foreground everywhere for every task (a known, checkable prediction)."""

    def forward(self, x, task_ids):
        assert task_ids.shape == (x.shape[0],) and 1 <= int(task_ids.min()) and int(task_ids.max()) <= 4
        z = torch.zeros(x.shape[0], 2, *x.shape[2:])
        z[:, 1] = 1.0
        return z


def test_evaluate_per_task_matches_reference(tmp_path):
    cfg = _cfg(["method.pipeline=released_main"])
    from medsemi.families.select import build_family

    splits = build_family(cfg)
    res = splits.evaluate({"student": ConstantNet()}, cfg, torch.device("cpu"), surface=True)
    res = res["test"]["student"]
    for task, vols in splits.test_volumes.items():
        name = INFO.domains[task - 1]
        ref = np.mean([2 * v.label.sum() / (v.label.size + v.label.sum()) for v in vols])
        assert res["per_domain"][name]["foreground"]["dice"] == pytest.approx(ref, rel=1e-6)
        assert "hd95_mm" in res["per_domain"][name]["foreground"]
    assert res["mean_dice"] == pytest.approx(res["per_domain"]["pancreas"]["foreground"]["dice"])
    assert res["mean_dice_tasks"] == pytest.approx(
        np.mean([res["per_domain"][d]["foreground"]["dice"] for d in INFO.domains]))


def test_predict_nifti_keeps_geometry(tmp_path):
    nib = pytest.importorskip("nibabel")
    from medsemi.workflows.predict import predict_folder

    tr = Trainer(_cfg(["method.pipeline=released_main", "train.iterations=1", "train.eval_every=1"]),
                 tmp_path / "run")
    tr.fit()
    vol = tr.family.test_volumes[3][0]
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = (10, -4, 7)
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(vol.image, affine), str(tmp_path / "in" / "case.nii.gz"))
    ckpt = tmp_path / "run" / "checkpoints" / "best_test.pt"
    written = predict_folder(ckpt, tmp_path / "in", tmp_path / "out", device="cpu", task=3)
    out = nib.load(str(written[0]))
    assert written[0].name == "case.nii.gz" and out.shape == vol.image.shape
    assert np.allclose(out.affine, affine)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1}
    with pytest.raises(ValueError, match="--task"):
        predict_folder(ckpt, tmp_path / "in", tmp_path / "o2", device="cpu", task=None)


def test_compare_method_variants():
    assert method_overrides("versemi") == ["method.name=versemi"]
    assert method_overrides("versemi:pipeline=released_main:detach_aggregate=true") == [
        "method.name=versemi", "method.pipeline=released_main", "method.detach_aggregate=true"]
    assert run_label("versemi:pipeline=released_main") == "versemi-pipeline-released_main"
    with pytest.raises(ValueError):
        method_overrides("versemi:released_main")
    cfg = load_config(CPU_CFG, method_overrides("versemi:pipeline=released_main"))
    assert cfg.method.pipeline == "released_main" and not cfg.method.needs_unlabelled
