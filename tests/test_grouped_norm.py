"""Grouped-statistics BatchNorm (nets/grouped_norm.py) and forward_mode="grouped": one fused forward that
equals the separate calls of spec ust-run.md 3.5 in outputs, gradients and BatchNorm buffers."""

import copy

import pytest
import torch
from torch import nn

from medsemi.data.contract import DatasetInfo, LabelSpec
from medsemi.methods.base import Progress
from medsemi.methods.intermediate import GROUPED_NORMS, run_calls
from medsemi.methods.midss import MiDSS, MiDSSOptions
from medsemi.methods.ustrun import USTRUN, USTRUNOptions
from medsemi.nets.grouped_norm import IMPLS, GroupedBatchNorm2d, ensure_grouped_norm, grouped_batches
from medsemi.nets.unet2d import UNet2D

TOL = dict(rtol=1e-9, atol=1e-10)


def _buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def _assert_same(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype, f"{what} {k}"
        torch.testing.assert_close(a[k], b[k], **TOL, msg=f"{what} {k}")


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("sizes", [[3, 3, 3], [2, 2, 2, 2, 2], [4, 1, 3], [2, 5, 1, 3, 2]])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("impl", IMPLS)
def test_layer_matches_sequential_batchnorm(sizes, momentum, impl):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(5, momentum=momentum).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
    ref.num_batches_tracked.fill_(3)
    grouped = copy.deepcopy(ref)
    ensure_grouped_norm(grouped)
    assert type(grouped) is GroupedBatchNorm2d
    x = torch.randn(sum(sizes), 5, 6, 7, dtype=torch.float64) * 3 + 1
    x_ref, x_grp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    cot = torch.randn_like(x)
    y_ref = torch.cat([ref(c) for c in x_ref.split(sizes)])
    with grouped_batches(grouped, sizes, impl):
        y_grp = grouped(x_grp)
    assert grouped.group_sizes is None and grouped.impl == "loop"  # layout restored
    torch.testing.assert_close(y_grp, y_ref, **TOL)
    (y_ref * cot).sum().backward()
    (y_grp * cot).sum().backward()
    torch.testing.assert_close(x_grp.grad, x_ref.grad, **TOL)
    torch.testing.assert_close(grouped.weight.grad, ref.weight.grad, **TOL)
    torch.testing.assert_close(grouped.bias.grad, ref.bias.grad, **TOL)
    _assert_same(_buffers(grouped), _buffers(ref), "buffers")
    assert int(grouped.num_batches_tracked) == 3 + len(sizes)


@pytest.mark.parametrize("impl", IMPLS)
def test_running_var_uses_unbiased_group_variance(impl):
    """Hand-computed check, independent of nn.BatchNorm2d: one update per group, unbiased variance."""
    bn = GroupedBatchNorm2d(1, momentum=0.5).double()
    x = torch.tensor([1.0, 3.0, 10.0, 14.0], dtype=torch.float64).view(4, 1, 1, 1)
    with grouped_batches(bn, [2, 2], impl):
        y = bn(x)
    # group means 2, 12; unbiased variances 2, 8; r = 0.5 (0.5 * 0 + 0.5 * 2) + 0.5 * 12 = 6.5
    torch.testing.assert_close(bn.running_mean, torch.tensor([6.5], dtype=torch.float64))
    # var: 0.5 (0.5 * 1 + 0.5 * 2) + 0.5 * 8 = 4.75
    torch.testing.assert_close(bn.running_var, torch.tensor([4.75], dtype=torch.float64))
    expected = torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64) / torch.sqrt(
        torch.tensor([1.0, 1.0, 4.0, 4.0], dtype=torch.float64) + bn.eps) * torch.tensor([1.0, 1.0, 2.0, 2.0],
                                                                                          dtype=torch.float64)
    torch.testing.assert_close(y.view(-1), expected)


@pytest.mark.parametrize("sizes", [[4, 4, 4], [4, 4, 4, 4, 1]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_matches_loop_channels_last_and_low_precision(sizes, dtype):
    """The float64 tests above prove both computations; here the layouts and dtypes of real training:
    a channels-last float32 input, and a bfloat16 input (statistics in float32, output in bfloat16)."""
    torch.manual_seed(4)
    nets = {impl: GroupedBatchNorm2d(8).train() for impl in IMPLS}
    for net in nets.values():
        net.load_state_dict(nets["loop"].state_dict())
    x = (torch.randn(sum(sizes), 8, 12, 10) * 2 + 3).to(dtype).contiguous(memory_format=torch.channels_last)
    cot = torch.randn(x.shape, dtype=dtype)
    outs, grads = {}, {}
    for impl, net in nets.items():
        xi = x.clone().requires_grad_(True)
        with grouped_batches(net, sizes, impl):
            outs[impl] = net(xi)
        (outs[impl].float() * cot.float()).sum().backward()
        grads[impl] = (xi.grad, net.weight.grad, net.bias.grad)
    assert outs["one_pass"].dtype == dtype
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=4e-2)
    torch.testing.assert_close(outs["one_pass"], outs["loop"], **tol)
    for a, b in zip(grads["one_pass"], grads["loop"]):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(nets["one_pass"].running_mean, nets["loop"].running_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(nets["one_pass"].running_var, nets["loop"].running_var, rtol=1e-3, atol=1e-3)
    assert int(nets["one_pass"].num_batches_tracked) == int(nets["loop"].num_batches_tracked) == len(sizes)


@pytest.mark.parametrize("impl", IMPLS)
def test_training_needs_two_values_per_channel_in_each_group(impl):
    """As F.batch_norm refuses a one-value batch when training, and the separate call would."""
    bn = GroupedBatchNorm2d(2)
    with pytest.raises(ValueError, match="more than 1 value per channel"), grouped_batches(bn, [2, 1], impl):
        bn(torch.randn(3, 2, 1, 1))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        run_calls(UNet2D(3, 2, 2).train(), [torch.randn(2, 3, 16, 16), torch.randn(1, 3, 16, 16)], "grouped")
    with grouped_batches(bn.eval(), [2, 1], impl):
        assert bn(torch.randn(3, 2, 1, 1)).shape == (3, 2, 1, 1)  # running statistics: no such need
    with pytest.raises(ValueError, match="one_pass"), grouped_batches(GroupedBatchNorm2d(2), [2, 1], "vectorised"):
        pass
    with pytest.raises(ValueError, match="method.grouped_norm"):
        MiDSSOptions(forward_mode="grouped", grouped_norm="fast")


def test_plain_behaviour_without_layout_and_in_eval():
    torch.manual_seed(1)
    ref = nn.BatchNorm2d(4)
    grouped = GroupedBatchNorm2d(4)
    grouped.load_state_dict(ref.state_dict())
    assert list(grouped.state_dict()) == list(ref.state_dict())
    x = torch.randn(6, 4, 5, 5)
    torch.testing.assert_close(grouped(x), ref(x), rtol=0, atol=0)
    _assert_same(_buffers(grouped), _buffers(ref), "train buffers")
    grouped.eval()
    ref.eval()
    with grouped_batches(grouped, [3, 3]):  # eval: running statistics, layout ignored
        torch.testing.assert_close(grouped(x), ref(x), rtol=0, atol=0)
    _assert_same(_buffers(grouped), _buffers(ref), "eval buffers")
    ref.load_state_dict(grouped.state_dict())  # checkpoints interchangeable both ways


def test_bad_layout_is_an_error():
    bn = GroupedBatchNorm2d(2)
    with pytest.raises(ValueError, match="sum to 5"), grouped_batches(bn, [2, 3]):
        bn(torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="positive"), grouped_batches(bn, [2, 0]):
        pass


def test_ensure_grouped_norm_keeps_parameter_objects():
    net = UNet2D(3, 2, 4)
    params = [id(p) for p in net.parameters()]
    keys = list(net.state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    n = ensure_grouped_norm(net)
    assert n == 18 and all(type(m) is not nn.BatchNorm2d for m in net.modules())
    assert [id(p) for p in net.parameters()] == params == [id(p) for p in opt.param_groups[0]["params"]]
    assert list(net.state_dict()) == keys
    assert ensure_grouped_norm(net) == 0


@pytest.mark.parametrize("sizes", [[4, 4, 4], [3, 3, 3, 3], [4, 4, 4, 4, 1], [2, 4, 3]])
@pytest.mark.parametrize("impl", GROUPED_NORMS)
def test_unet_grouped_forward_equals_separate_calls(sizes, impl):
    torch.manual_seed(2)
    ref = UNet2D(3, 2, 4).double().train()
    grouped = copy.deepcopy(ref)
    xs = [torch.randn(s, 3, 32, 32, dtype=torch.float64) for s in sizes]
    cots = [torch.randn(s, 2, 32, 32, dtype=torch.float64) for s in sizes]
    out_ref = run_calls(ref, xs, "separate")
    out_grp = run_calls(grouped, xs, "grouped", impl)
    assert any(isinstance(m, GroupedBatchNorm2d) for m in grouped.modules())
    for a, b in zip(out_grp, out_ref):
        torch.testing.assert_close(a, b, **TOL)
    sum((o * c).sum() for o, c in zip(out_ref, cots)).backward()
    sum((o * c).sum() for o, c in zip(out_grp, cots)).backward()
    _assert_same(_grads(grouped), _grads(ref), "grads")
    _assert_same(_buffers(grouped), _buffers(ref), "buffers")
    # the plain fused forward really differs (shared statistics), so the comparison above has teeth
    fused = run_calls(copy.deepcopy(ref), xs, "fused")
    assert not torch.allclose(fused[0], out_ref[0], atol=1e-6)


SPECS = {"exclusive": (LabelSpec("exclusive", ("background", "organ")), 1),
         "multilabel": (LabelSpec("multilabel", ("cup", "disc")), 3)}


def _data(spec, ch, b, seed, size=32):
    g = torch.Generator().manual_seed(seed)
    img = (torch.rand(b, ch, size, size, generator=g, dtype=torch.float64) * 2 - 1)
    if spec.multilabel:
        disc = (torch.rand(b, size, size, generator=g) > 0.4).double()
        label = torch.stack([disc * (torch.rand(b, size, size, generator=g) > 0.5).double(), disc], 1)
    else:
        label = (torch.rand(b, size, size, generator=g) > 0.5).long()
    return img, label


@pytest.mark.parametrize("method_cls,options,kind,impl", [
    (MiDSS, MiDSSOptions, "multilabel", "loop"), (MiDSS, MiDSSOptions, "exclusive", "one_pass"),
    (USTRUN, USTRUNOptions, "exclusive", "loop"), (USTRUN, USTRUNOptions, "multilabel", "one_pass"),
    (MiDSS, MiDSSOptions, "exclusive", "interleaved"), (USTRUN, USTRUNOptions, "multilabel", "interleaved"),
    (USTRUN, USTRUNOptions, "exclusive", "auto"),
])
def test_method_step_grouped_equals_separate(method_cls, options, kind, impl):
    """A full MiDSS / UST-RUN step (iterations 0 and 1, so UST-RUN's unreliable slot joins at 1) from the
    same state and generator: same loss, gradients, logs and every buffer (BN, queue, LQ slot)."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(3)
        spec, ch = SPECS[kind]
        info = DatasetInfo("toy", ch, spec, ("a", "b"), (32, 32))
        student, teacher = UNet2D(ch, spec.num_outputs, 4), UNet2D(ch, spec.num_outputs, 4)
        x_l, y_l = _data(spec, ch, 4, 1)
        u_w, _ = _data(spec, ch, 4, 2)
        # a low threshold so that the pseudo-label masks are not empty
        opts = {"threshold": 0.5, "grouped_norm": impl}
        if method_cls is USTRUN:
            opts["warmup_hardness_epochs"] = 0
        results = {}
        for mode in ("separate", "grouped"):
            method = method_cls(options(forward_mode=mode, **opts), copy.deepcopy(student),
                                copy.deepcopy(teacher), info)
            method.generator = torch.Generator().manual_seed(7)
            steps = []
            for it in (0, 1):
                method.student.zero_grad()
                out = method.train_step({"image": x_l, "label": y_l}, {"image": u_w, "strong": u_w * 0.9},
                                        Progress(it, 10, epoch_length=5))
                out.loss.backward()
                state = copy.deepcopy(method.state_dict())
                steps.append((out, _grads(method.student), _buffers(method), state))
            results[mode] = steps
        for (o_s, g_s, b_s, st_s), (o_g, g_g, b_g, st_g) in zip(results["separate"], results["grouped"]):
            torch.testing.assert_close(o_g.loss, o_s.loss, **TOL)
            for k in o_s.logs:
                torch.testing.assert_close(o_g.logs[k], o_s.logs[k], **TOL, msg=k)
            _assert_same(g_g, g_s, "grads")
            _assert_same(b_g, b_s, "BN buffers")
            assert any(k.startswith("teacher.") for k in b_s) and any(k.startswith("student.") for k in b_s)
            _assert_same(st_g, st_s, "state")
        assert results["separate"][1][0].logs["mask_ratio"] > 0
    finally:
        torch.set_default_dtype(torch.float32)
