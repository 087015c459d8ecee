"""grouped_norm=interleaved (nets/interleaved_norm.py): the calls' samples interleaved so that one native
BatchNorm kernel per block of equal calls computes every call's statistics. It must equal the separate
calls of spec ust-run.md 3.5 (outputs, gradients, running buffers), whatever the modules' settings."""

import copy

import pytest
import torch
from torch import nn

from medsemi.methods.intermediate import compile_blocker, run_calls
from medsemi.methods.midss import MiDSSOptions
from medsemi.nets.grouped_norm import GroupedBatchNorm2d, ensure_grouped_norm
from medsemi.nets.interleaved_norm import CallLayout, interleave_blocker
from medsemi.nets.unet2d import UNet2D

TOL = dict(rtol=1e-9, atol=1e-10)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _compare(ref, got, out_ref, out_got):
    for a, b in zip(out_got, out_ref):
        torch.testing.assert_close(a, b, **TOL)
    for (name, p), q in zip(ref.named_parameters(), got.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=name)
    s_ref, s_got = _state(ref), _state(got)
    assert s_ref.keys() == s_got.keys()
    for k in s_ref:
        assert s_got[k].dtype == s_ref[k].dtype, k
        torch.testing.assert_close(s_got[k], s_ref[k], **TOL, msg=k)


def _two_steps(ref, got, sizes, channels=3, impl="interleaved", size=32, memory_format=torch.contiguous_format):
    """Two forwards and backwards of each network, separate calls against grouped ones."""
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        xs = [torch.randn(s, channels, size, size, generator=g, dtype=torch.float64).contiguous(
            memory_format=memory_format) for s in sizes]
        out_ref, out_got = run_calls(ref, xs, "separate"), run_calls(got, xs, "grouped", impl)
        cots = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in out_ref]
        sum((o * c).sum() for o, c in zip(out_ref, cots)).backward()
        sum((o * c).sum() for o, c in zip(out_got, cots)).backward()
        _compare(ref, got, out_ref, out_got)


@pytest.mark.parametrize("sizes", [[3, 3, 3], [4, 1, 3], [3, 1, 3, 1], [2, 5, 1, 3, 2]])
def test_layout_places_sample_i_of_every_call_side_by_side(sizes):
    layout = CallLayout.of(sizes)
    xs = [torch.arange(s, dtype=torch.float64)[:, None, None, None] + 100 * c + torch.zeros(s, 2, 3, 3)
          for c, s in enumerate(sizes)]  # value = 100 * call + sample
    batch = layout.arrange(xs)
    expected = []
    for n, calls in layout.blocks:  # blocks by size, first appearance first; within one, sample-major
        assert [sizes[c] for c in calls] == [n] * len(calls)
        expected += [100 * c + i for i in range(n) for c in calls]
    assert batch[:, 0, 0, 0].tolist() == expected
    assert [layout.blocks[k][0] for k in range(len(layout.blocks))] == list(dict.fromkeys(sizes))
    for x, back in zip(xs, layout.split(batch)):
        assert torch.equal(back, x)


def test_layout_rejects_bad_sizes_and_inputs():
    with pytest.raises(ValueError, match="positive integers"):
        CallLayout.of([2, 0])
    with pytest.raises(ValueError, match="inputs of sizes"):
        CallLayout.of([2, 2]).arrange([torch.zeros(2, 1, 2, 2), torch.zeros(3, 1, 2, 2)])


class _Mixed(nn.Module):
    """BatchNorms of every kind: plain, no affine, no running statistics, another momentum and eps."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 3, 3, padding=1), nn.BatchNorm2d(3, affine=False)
        self.c3, self.b3 = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5, track_running_stats=False)
        self.c4, self.b4 = nn.Conv2d(5, 2, 3, padding=1), nn.BatchNorm2d(2, momentum=0.3, eps=1e-3)

    def forward(self, x):
        for conv, bn in ((self.c1, self.b1), (self.c2, self.b2), (self.c3, self.b3), (self.c4, self.b4)):
            x = torch.relu(bn(conv(x)))
        return x


@pytest.mark.parametrize("sizes", [[3, 3, 3], [4, 4, 4, 4, 1]])
def test_every_kind_of_batchnorm_equals_separate_calls(sizes):
    torch.manual_seed(0)
    ref = _Mixed().double().train()
    got = copy.deepcopy(ref)
    _two_steps(ref, got, sizes, channels=2)
    assert got.__dict__["_grouped_norm_setup"]["interleaved"] == "interleaved"


def test_eval_mode_modules_use_their_running_statistics_and_keep_them():
    """A BatchNorm in eval mode inside a training network normalises with its running statistics, in any
    order of the samples, and is not updated (the plan leaves it out)."""
    torch.manual_seed(1)
    ref = UNet2D(3, 2, 2).double().train()
    ref.inc.block[1].eval()
    ref.down1.conv.block[4].eval()
    got = copy.deepcopy(ref)
    before = got.inc.block[1].running_mean.clone()
    _two_steps(ref, got, [4, 4, 4, 4, 1])
    assert torch.equal(got.inc.block[1].running_mean, before)


def test_channels_last_input_is_normalised_correctly():
    """Channels-last activations in an NCHW network are made contiguous first (correct, slower)."""
    torch.manual_seed(2)
    ref = UNet2D(3, 2, 2).double().train()
    _two_steps(ref, copy.deepcopy(ref), [3, 3, 1], memory_format=torch.channels_last)


def test_two_forwards_before_one_backward():
    """Each forward has its own statistics scratch: a second forward does not invalidate the first's graph."""
    torch.manual_seed(3)
    ref = UNet2D(3, 2, 2).double().train()
    got = copy.deepcopy(ref)
    xs = [[torch.randn(2, 3, 16, 16, dtype=torch.float64) for _ in range(3)] for _ in range(2)]
    outs_ref = [run_calls(ref, x, "separate") for x in xs]
    outs_got = [run_calls(got, x, "grouped", "interleaved") for x in xs]
    sum(o.square().sum() for out in outs_ref for o in out).backward()
    sum(o.square().sum() for out in outs_got for o in out).backward()
    _compare(ref, got, [o for out in outs_ref for o in out], [o for out in outs_got for o in out])


def test_a_dtype_change_after_the_first_call_builds_a_new_plan():
    torch.manual_seed(4)
    ref = UNet2D(3, 2, 2).train()
    got = copy.deepcopy(ref)
    xs = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    run_calls(ref, xs, "separate"), run_calls(got, xs, "grouped", "interleaved")
    ref.double(), got.double()
    got.load_state_dict(ref.state_dict())  # the float32 step agreed to float32 rounding only
    _two_steps(ref, got, [2, 2, 2])


def test_auto_falls_back_to_loop_where_interleaving_does_not_fit():
    torch.manual_seed(5)
    cumulative = UNet2D(3, 2, 2).double().train()
    for m in cumulative.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average: no closed-form update with a fixed factor
    channels_last = UNet2D(3, 2, 2).double().train().to(memory_format=torch.channels_last)
    for net, reason in ((cumulative, "momentum=None"), (channels_last, "channels-last")):
        ensure_grouped_norm(net)
        modules = [m for m in net.modules() if isinstance(m, GroupedBatchNorm2d)]
        assert reason in interleave_blocker(net, modules)
        got = copy.deepcopy(net)
        _two_steps(net, got, [2, 2, 1], impl="auto")
        assert got.__dict__["_grouped_norm_setup"]["auto"] == "loop"
        with pytest.raises(ValueError, match=reason):
            run_calls(copy.deepcopy(net), [torch.randn(2, 3, 16, 16, dtype=torch.float64)] * 2, "grouped",
                      "interleaved")
    assert interleave_blocker(UNet2D(3, 2, 2), []) is None


def test_interleaved_is_refused_under_compile_but_auto_is_not():
    assert "eager" in compile_blocker(MiDSSOptions(forward_mode="grouped", grouped_norm="interleaved"))
    assert compile_blocker(MiDSSOptions(forward_mode="grouped")) is None
    assert compile_blocker(MiDSSOptions(forward_mode="separate", grouped_norm="interleaved")) is None
    with pytest.raises(ValueError, match="grouped_norm must be one of"):
        MiDSSOptions(grouped_norm="stacked")


def test_low_precision_matches_loop():
    """bfloat16 activations (CPU autocast): interleaved and loop agree to bfloat16 rounding."""
    torch.manual_seed(6)
    nets = {impl: UNet2D(3, 2, 4).train() for impl in ("interleaved", "loop")}
    nets["loop"].load_state_dict(nets["interleaved"].state_dict())
    xs = [torch.randn(s, 3, 32, 32) for s in (4, 4, 4, 1)]
    outs = {}
    for impl, net in nets.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[impl] = run_calls(net, xs, "grouped", impl)
        sum(o.float().square().mean() for o in outs[impl]).backward()
    for a, b in zip(outs["interleaved"], outs["loop"]):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)
    for (name, p), q in zip(nets["loop"].named_parameters(), nets["interleaved"].parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0.05, atol=0.02, msg=name)
    for (name, a), b in zip(nets["loop"].named_buffers(), nets["interleaved"].buffers()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3, msg=name)


def test_module_without_a_plan_is_an_error():
    bn = GroupedBatchNorm2d(2).train()
    bn.__dict__.update(group_sizes=(1, 1), impl="interleaved")
    with pytest.raises(ValueError, match="interleaved_batches"):
        bn(torch.randn(2, 2, 3, 3))
