"""Tests for VerSemi's task-prompted VNet (spec versemi.md 2.2, 2.3, 7)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from medsemi.nets.task_prompted import (
    TaskPromptedVNet,
    dynamic_head,
    head_param_count,
    split_head_params,
    task_onehot,
)


def _loop_head(h0: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-query reference: slice the 180 numbers by hand, 1x1x1 convs one at a time."""
    b, t = params.shape[:2]
    zs, z2s = [], []
    for i in range(b):
        zi, z2i = [], []
        for j in range(t):
            p = params[i, j]
            w1, w2 = p[0:64].view(8, 8, 1, 1, 1), p[64:128].view(8, 8, 1, 1, 1)
            w3, w4 = p[128:144].view(2, 8, 1, 1, 1), p[144:160].view(2, 8, 1, 1, 1)
            b1, b2, b3, b4 = p[160:168], p[168:176], p[176:178], p[178:180]
            x = h0[i : i + 1]
            h1 = torch.relu(F.conv3d(x, w1, b1))
            h2 = torch.relu(F.conv3d(h1, w2, b2))
            zi.append(F.conv3d(h2, w3, b3)[0])
            z2i.append(F.conv3d(h2, w4, b4)[0])
        zs.append(torch.stack(zi))
        z2s.append(torch.stack(z2i))
    return torch.stack(zs), torch.stack(z2s)


def test_parameter_count_pinned() -> None:
    model = TaskPromptedVNet()  # spec defaults; construction only, no forward
    n = sum(p.numel() for p in model.parameters())
    assert n == 9_484_144
    assert sum(p.numel() for p in model.backbone.parameters()) == 9_436_304
    assert sum(p.numel() for p in model.gap.parameters()) == 512
    assert sum(p.numel() for p in model.controller.parameters()) == 261 * 180 + 180 == 47_160
    assert sum(p.numel() for p in model.precls_conv.parameters()) == 168
    assert head_param_count() == 180


def test_split_order() -> None:
    p = split_head_params(torch.arange(180.0).view(1, 1, 180))
    assert torch.equal(p.w1[0, 0], torch.arange(64.0).view(8, 8))  # [o, i] at 8*o + i
    assert torch.equal(p.w2[0, 0], torch.arange(64.0, 128).view(8, 8))
    assert torch.equal(p.w3[0, 0], torch.arange(128.0, 144).view(2, 8))
    assert torch.equal(p.w4[0, 0], torch.arange(144.0, 160).view(2, 8))
    assert torch.equal(p.b1[0, 0], torch.arange(160.0, 168))
    assert torch.equal(p.b2[0, 0], torch.arange(168.0, 176))
    assert torch.equal(p.b3[0, 0], torch.tensor([176.0, 177.0]))
    assert torch.equal(p.b4[0, 0], torch.tensor([178.0, 179.0]))
    with pytest.raises(ValueError, match="task_prompted.py"):
        split_head_params(torch.zeros(2, 179))


@pytest.mark.parametrize("impl", ["einsum", "grouped"])
def test_dynamic_head_matches_loop(impl: str) -> None:
    torch.manual_seed(0)
    h0 = torch.randn(3, 8, 4, 5, 6, dtype=torch.float64)
    params = torch.randn(3, 2, 180, dtype=torch.float64)
    z, z2 = dynamic_head(h0, split_head_params(params), impl=impl, return_aux=True)
    rz, rz2 = _loop_head(h0, params)
    assert z.shape == (3, 2, 2, 4, 5, 6)
    torch.testing.assert_close(z, rz, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(z2, rz2, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(dynamic_head(h0, split_head_params(params), impl=impl), rz)


def test_task_onehot() -> None:
    code = task_onehot(torch.tensor([[1, 5], [3, 2]]))
    assert code.shape == (2, 2, 5)
    assert torch.equal(code.argmax(-1), torch.tensor([[0, 4], [2, 1]]))
    assert torch.equal(code.sum(-1), torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="task ids"):
        task_onehot(torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="task ids"):
        task_onehot(torch.tensor([6]))
    with pytest.raises(TypeError, match="integer"):
        task_onehot(torch.tensor([1.0]))


def _small(seed: int = 0, **kw: object) -> TaskPromptedVNet:
    torch.manual_seed(seed)
    return TaskPromptedVNet(base_filters=2, **kw)


def test_forward_matches_reference_eval() -> None:
    """forward == backbone -> GAP(BN,ReLU,mean) -> controller on [g; onehot] -> per-sample loop head."""
    model = _small(1).double()
    # non-trivial running statistics for eval mode
    for bn in (model.gap[0], model.precls_conv[0]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    ids = torch.tensor([3, 5])
    out, aux = model(x, ids, return_aux=True)
    with torch.no_grad():
        x5, feat = model.backbone(x)
        bn = model.gap[0]
        g = torch.relu(F.batch_norm(x5, bn.running_mean, bn.running_var, bn.weight, bn.bias, False))
        g = g.mean((2, 3, 4))
        onehot = torch.zeros(2, 5, dtype=torch.float64)
        onehot[0, 2] = 1
        onehot[1, 4] = 1
        w = model.controller.weight.view(180, -1)
        params = F.linear(torch.cat([g, onehot], 1), w, model.controller.bias)
        bn2 = model.precls_conv[0]
        h0 = torch.relu(F.batch_norm(feat, bn2.running_mean, bn2.running_var, bn2.weight, bn2.bias, False))
        h0 = model.precls_conv[2](h0)
        rz, rz2 = _loop_head(h0, params.unsqueeze(1))
    assert out.shape == (2, 2, 32, 32, 32)
    torch.testing.assert_close(out, rz[:, 0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(aux, rz2[:, 0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("impl", ["einsum", "grouped"])
def test_shared_backbone_equals_naive_values_and_grads(impl: str) -> None:
    """Spec 2.3 / 7: T queries through one backbone == T separate forwards, in train mode (BN batch stats)."""
    naive = _small(2, head_impl=impl).double().train()
    shared = copy.deepcopy(naive)
    x = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    ids = torch.tensor([[1, 2, 3, 4, 5], [5, 3, 3, 1, 2]])
    wts = torch.randn(5, 2, 32, 32, 32, dtype=torch.float64)

    outs = [naive(x, ids[:, t]) for t in range(5)]
    loss_n = sum((o * wts[t]).sum() for t, o in enumerate(outs))
    loss_n.backward()
    out_s = shared.forward_tasks(x, ids)
    loss_s = sum((out_s[:, t] * wts[t]).sum() for t in range(5))
    loss_s.backward()

    assert out_s.shape == (2, 5, 2, 32, 32, 32)
    torch.testing.assert_close(out_s, torch.stack(outs, 1), atol=1e-10, rtol=1e-10)
    for (name, pn), ps in zip(naive.named_parameters(), shared.parameters()):
        assert pn.grad is not None and ps.grad is not None, name
        torch.testing.assert_close(ps.grad, pn.grad, atol=1e-8, rtol=1e-6, msg=name)
    # default: one BN momentum update per backbone pass (note N16), naive did 5
    assert int(shared.gap[0].num_batches_tracked) == 1 and int(naive.gap[0].num_batches_tracked) == 5
    assert not torch.allclose(shared.gap[0].running_mean, naive.gap[0].running_mean)


def test_bn_update_per_query_replays_running_stats() -> None:
    naive = _small(3).train()
    shared = copy.deepcopy(naive)
    shared.bn_update_per_query = True
    x = torch.randn(2, 1, 32, 32, 32)
    ids = torch.tensor([1, 2, 5])
    with torch.no_grad():
        for t in ids:
            naive(x, t.repeat(2))
        shared.forward_tasks(x, ids)
    for a, b in zip(naive.buffers(), shared.buffers()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert shared.gap[0].momentum == naive.gap[0].momentum == 0.1  # restored


def test_broadcast_ids_and_forward_consistency() -> None:
    model = _small(4).eval()
    x = torch.randn(3, 1, 32, 32, 32)
    with torch.no_grad():
        a = model.forward_tasks(x, torch.tensor([5, 1, 2]))
        b = model.forward_tasks(x, torch.tensor([[5, 1, 2]] * 3))
        c = model(x, torch.tensor([1, 1, 1]))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[:, 1], c, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="task_prompted.py"):
        model(x, torch.tensor([1, 2]))


def test_aux_controller_rows_get_no_gradient() -> None:
    """z' is unused: its 18 controller outputs (W4: 144..159, b4: 178, 179) get zero gradient (note N14)."""
    model = _small(5).train()
    x = torch.randn(2, 1, 32, 32, 32)
    model(x, torch.tensor([1, 4])).square().mean().backward()
    gw, gb = model.controller.weight.grad.flatten(1), model.controller.bias.grad
    unused = list(range(144, 160)) + [178, 179]
    used = [i for i in range(180) if i not in unused]
    assert gw[unused].abs().max() == 0 and gb[unused].abs().max() == 0
    assert gw[used].abs().sum() > 0


def test_channels_last_autocast_runs() -> None:
    model = _small(6).train().to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 1, 32, 32, 32).to(memory_format=torch.channels_last_3d)
    ref = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    out_ref = ref.forward_tasks(x.contiguous(), torch.tensor([1, 5]))
    out = model.forward_tasks(x, torch.tensor([1, 5]))
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.forward_tasks(x, torch.tensor([1, 5]))
    assert low.shape == (2, 2, 2, 32, 32, 32) and torch.isfinite(low.float()).all()
    low.float().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "controller" not in n)
