"""Tests for the VerSemi VNet backbone (spec versemi.md 2.1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medsemi.nets.vnet import VNet


def _cir(x: torch.Tensor, conv: torch.nn.Module, transposed: bool = False) -> torch.Tensor:
    """conv -> InstanceNorm (no affine, eps 1e-5) -> ReLU, written functionally."""
    if transposed:
        y = F.conv_transpose3d(x, conv.weight, conv.bias, stride=2)
    elif conv.kernel_size == (2, 2, 2):
        y = F.conv3d(x, conv.weight, conv.bias, stride=2)
    else:
        y = F.conv3d(x, conv.weight, conv.bias, padding=1)
    mean = y.mean(dim=(2, 3, 4), keepdim=True)
    var = y.var(dim=(2, 3, 4), unbiased=False, keepdim=True)
    return torch.relu((y - mean) / torch.sqrt(var + 1e-5))


def _convs(block: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in block if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]


def _stage(x: torch.Tensor, block: torch.nn.Module, n: int) -> torch.Tensor:
    convs = _convs(block)
    assert len(convs) == n
    for c in convs:
        x = _cir(x, c)
    return x


def _reference(net: VNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The table of spec 2.1, row by row."""
    x1 = _stage(x, net.block_one, 1)
    x2 = _stage(_cir(x1, _convs(net.block_one_dw)[0]), net.block_two, 2)
    x3 = _stage(_cir(x2, _convs(net.block_two_dw)[0]), net.block_three, 3)
    x4 = _stage(_cir(x3, _convs(net.block_three_dw)[0]), net.block_four, 3)
    x5 = _stage(_cir(x4, _convs(net.block_four_dw)[0]), net.block_five, 3)
    y = _cir(x5, _convs(net.block_five_up)[0], True) + x4
    y = _stage(y, net.block_six, 3)
    y = _cir(y, _convs(net.block_six_up)[0], True) + x3
    y = _stage(y, net.block_seven, 3)
    y = _cir(y, _convs(net.block_seven_up)[0], True) + x2
    y = _stage(y, net.block_eight, 2)
    feat = _cir(y, _convs(net.block_eight_up)[0], True)  # no x1 skip
    return x5, feat


def test_shapes_and_matches_spec_table() -> None:
    torch.manual_seed(0)
    net = VNet(base_filters=4).double()  # float64: compare to the reference without IN noise amplification
    x = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    x5, feat = net(x)
    assert x5.shape == (2, 64, 2, 2, 2)
    assert feat.shape == (2, 4, 32, 32, 32)
    r5, rf = _reference(net, x)
    torch.testing.assert_close(x5, r5, atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(feat, rf, atol=1e-9, rtol=1e-8)


def test_parameter_count_and_norms() -> None:
    net = VNet()  # spec defaults: 1 channel, 16 filters
    assert sum(p.numel() for p in net.parameters()) == 9_436_304
    norms = [m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert len(norms) == 28 and all(not m.affine and not m.track_running_stats for m in norms)
    assert not list(net.buffers())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())


def test_samples_are_independent() -> None:
    """InstanceNorm is per sample: a sample's features do not depend on its batch mates."""
    torch.manual_seed(1)
    net = VNet(base_filters=2).double()
    x = torch.randn(3, 1, 32, 32, 32, dtype=torch.float64)
    _, fb = net(x)
    _, f1 = net(x[1:2])
    torch.testing.assert_close(fb[1:2], f1, atol=1e-9, rtol=1e-8)


def test_channels_last_and_autocast() -> None:
    torch.manual_seed(2)
    net = VNet(base_filters=2)
    x = torch.randn(2, 1, 32, 32, 32)
    _, ref = net(x)
    net_cl = VNet(base_filters=2)
    net_cl.load_state_dict(net.state_dict())
    net_cl = net_cl.to(memory_format=torch.channels_last_3d)
    _, out = net_cl(x.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, low = net(x)
    assert torch.isfinite(low).all()
    assert low.dtype == torch.bfloat16
    # bf16 through 28 conv+IN layers (a 2^3 bottleneck amplifies rounding): loose, but a wrong graph fails
    assert (low.float() - ref).abs().mean() < 0.25 * ref.abs().mean()


def test_bad_input_errors() -> None:
    net = VNet(base_filters=2)
    with pytest.raises(ValueError, match="vnet.py.*divisible"):
        net(torch.randn(1, 1, 32, 32, 24))
    with pytest.raises(ValueError, match="vnet.py.*image batch"):
        net(torch.randn(1, 2, 32, 32, 32))
    with pytest.raises(ValueError, match="vnet.py.*bottleneck"):
        net(torch.randn(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="vnet.py"):
        VNet(base_filters=0)
