"""Whole-step reference tests for VerSemi: medsemi's stage-1 and stage-2 steps (shared backbone, one
pass per distinct input), run by the engine's own train_step (Adam, optimiser reset at the stage
boundary), against the plain reference of tests/reference (spec versemi.md 3.1, 3.2: the original's
4 and 7 separate network calls), in float64 with the same inputs and box draws. After each step: the
loss terms and every parameter; with ``bn_update_per_query`` also the BatchNorm running statistics
(spec N16); without it, those statistics differ by design (one update per backbone pass)."""

from __future__ import annotations

import contextlib
import random
from types import SimpleNamespace

import pytest
import torch
from reference.harness import assert_close, stand_in_engine
from reference.versemi_reference import VerSemiRefConfig, VerSemiReference

from medsemi.data.contract import DatasetInfo, LabelSpec
from medsemi.engine.trainer import Trainer
from medsemi.methods.base import Progress
from medsemi.methods.versemi import VerSemi, VerSemiOptions
from medsemi.nets.task_prompted import TaskPromptedVNet

SHAPE, B, STAGE1 = (32, 32, 16), 4, 2  # bottleneck 2x2x1 voxels
ITERS = [0, 1, 2, 3]  # stage 1 for iterations 0-1, stage 2 (fresh Adam) for 2-3
TASKS = [1, 3, 1, 2]  # pairs (0, 2) share task 1 (the same-task override), (1, 3) do not
RTOL = 1e-10
# Parameters: the InstanceNorms near the bottleneck normalise over 4-32 voxels, which makes the backbone
# gradients ill-conditioned (the shared-backbone and the per-query computations differ by ~1e-9 relative
# in float64 after Adam), so parameters get 1e-7; a wrong term moves them by ~lr = 1e-3 per step. The
# conv biases in front of an InstanceNorm without affine have a mathematically zero gradient and no effect
# on any output: their Adam updates are rounding noise times lr/1e-8, so they get an absolute 1e-6.
PARAM_RTOL = 1e-7
NOISE_ATOL = 1e-6


def _noise_only(net: torch.nn.Module) -> set[str]:
    """Names of the biases of convolutions directly followed by an affine-free InstanceNorm."""
    names = set()
    for prefix, mod in net.named_modules():
        kids = list(mod.named_children())
        for (name, a), (_, b) in zip(kids, kids[1:]):
            if isinstance(b, torch.nn.InstanceNorm3d) and not b.affine and getattr(a, "bias", None) is not None:
                names.add(f"{prefix}.{name}.bias" if prefix else f"{name}.bias")
    return names
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _data(gen: torch.Generator):
    """Labelled images, raw labels in {0, 1, 2} (only 1 is foreground) and unlabelled images."""
    x = torch.rand(B, 1, *SHAPE, generator=gen, dtype=torch.float64)
    label = torch.zeros(B, *SHAPE, dtype=torch.long)
    for i in range(B):
        lo = [int(torch.randint(0, n - 8, (1,), generator=gen)) for n in SHAPE]
        label[i, lo[0]:lo[0] + 8, lo[1]:lo[1] + 7, lo[2]:lo[2] + 6] = 1
        label[i, :4] = 2  # another structure's value: background for this task
        x[i, 0][label[i] == 1] += 1.0
    u = torch.rand(B, 1, *SHAPE, generator=gen, dtype=torch.float64)
    return x, label, u


@contextlib.contextmanager
def _inject(monkeypatch, stage: int, draws):
    """Feed the method's box draws. Stage 1 (``ops.versemi_ops.box_mask``): one
    ``randint(0, n - s, (B/2,))`` per axis -> the given integer starts. Stage 2
    (``methods.versemi.random_box_mask``, twice): ``rand(())`` for the ratio, then one ``rand((B',))``
    per axis -> the given uniforms."""
    calls = []
    if stage == 1:
        starts = draws
        for axis, n in enumerate(SHAPE):
            calls.append(("randint", torch.tensor([s[axis] for s in starts]), n - int(n * 2 / 3)))
    else:
        for u_ratio, u_starts in draws:
            calls.append(("rand", torch.tensor(u_ratio, dtype=torch.float64), None))
            for axis in range(3):
                calls.append(("rand", torch.tensor([s[axis] for s in u_starts], dtype=torch.float64), None))

    def fake_randint(low, high, size, device=None, generator=None):
        kind, out, want_high = calls.pop(0)
        assert kind == "randint" and (low, high) == (0, want_high) and tuple(size) == tuple(out.shape)
        return out.clone()

    def fake_rand(size, generator=None, device=None, dtype=None):
        kind, out, _ = calls.pop(0)
        assert kind == "rand" and tuple(size) == tuple(out.shape)
        return out.clone().to(dtype or torch.float32)

    with monkeypatch.context() as mp:
        mp.setattr(torch, "randint", fake_randint)
        mp.setattr(torch, "rand", fake_rand)
        yield
    assert not calls, "the method skipped a box draw"


def _engine(method):
    """Adam as VerSemi's train.py configures it, constant LR."""
    return stand_in_engine(method, optimizer="adam", lr=1e-3, betas=(0.5, 0.999), weight_decay=0.0,
                           schedule="constant", iterations=len(ITERS), ema_decay=0.99)


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    assert_close(a, b, what, rtol)


@pytest.mark.parametrize("bn_per_query,compat", [(True, False), (False, True)])
def test_versemi_steps_match_reference(bn_per_query, compat, monkeypatch):
    torch.manual_seed(7)
    net = TaskPromptedVNet(1, base_filters=2, bn_update_per_query=bn_per_query).double()
    info = DatasetInfo("toy3d", 1, LabelSpec("exclusive", ("background", "organ")), ("a", "b"), SHAPE)
    opts = VerSemiOptions(pipeline="two_stage", stage1_iterations=STAGE1, compat_cons_broadcast=compat)
    method = VerSemi(opts, net, None, info)
    method.generator = torch.Generator().manual_seed(0)
    # the reference queries one task per call with the original's grouped-convolution head
    ref_net = TaskPromptedVNet(1, base_filters=2, bn_update_per_query=bn_per_query, head_impl="grouped").double()
    ref_net.load_state_dict(net.state_dict())
    ref = VerSemiReference(ref_net, VerSemiRefConfig(compat_cons_broadcast=compat))
    eng = _engine(method)
    noise = _noise_only(net)
    assert len(noise) == 28  # every backbone convolution (spec 2.1: 21 conv stages + 4 down + 3 up)
    gen, rng = torch.Generator().manual_seed(21), random.Random(9)
    for k in ITERS:
        x, label, u = _data(gen)
        task = torch.tensor(TASKS)
        eng.labelled = SimpleNamespace(next=lambda x=x, y=label, t=task: {"image": x, "label": y, "task": t})
        eng.unlabelled = SimpleNamespace(next=lambda u=u: {"image": u})
        if k < STAGE1:
            starts = [[rng.randrange(n - int(n * 2 / 3)) for n in SHAPE] for _ in range(B // 2)]
            with _inject(monkeypatch, 1, starts):
                logs = Trainer.train_step(eng, Progress(k, len(ITERS)))
            expected = ref.stage1_step(x, label, TASKS, starts)
            names = ("sup", "chaos", "spec")
        else:
            if k == STAGE1:
                ref.reset_optimiser()  # a fresh Adam at the stage boundary (reset_optimizer_at_stage2)
            box1 = (rng.random(), [[rng.random() for _ in range(3)] for _ in range(B // 2)])
            box2 = (rng.random(), [[rng.random() for _ in range(3)] for _ in range(B)])
            with _inject(monkeypatch, 2, [box1, box2]):
                logs = Trainer.train_step(eng, Progress(k, len(ITERS)))
            expected = ref.stage2_step(x, label, TASKS, u, box1, box2)
            names = ("sup", "chaos_sup", "chaos", "cons")
        for name in names + ("loss",):
            _close(logs[name], torch.tensor(expected[name], dtype=torch.float64), f"step {k} {name}")
        mine, theirs = method.student.state_dict(), ref.net.state_dict()
        assert mine.keys() == theirs.keys()
        for name in mine:
            if name in noise:
                assert (mine[name] - theirs[name]).abs().max() <= NOISE_ATOL, f"step {k} {name}"
            elif bn_per_query or not name.endswith(BN_BUFFERS):
                _close(mine[name], theirs[name], f"step {k} {name}", PARAM_RTOL)
        if not bn_per_query and k == ITERS[-1]:  # one BN update per backbone pass instead of one per query
            assert not torch.equal(mine["gap.0.num_batches_tracked"], theirs["gap.0.num_batches_tracked"])
