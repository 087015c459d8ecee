"""Tests for the 2D U-Net (spec ust-run.md 3.1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsemi.nets.unet2d import UNet2D, count_parameters


def _expected_params(cin: int, cout: int, b: int) -> int:
    """Parameter count from the spec 3.1 layout, computed by hand."""

    def dconv(i: int, o: int) -> int:  # two bias-free 3x3 convs + two BN (weight, bias)
        return 9 * i * o + 2 * o + 9 * o * o + 2 * o

    enc = dconv(cin, b) + dconv(b, 2 * b) + dconv(2 * b, 4 * b) + dconv(4 * b, 8 * b) + dconv(8 * b, 16 * b)
    dec = 0
    for i, o in ((16 * b, 8 * b), (8 * b, 4 * b), (4 * b, 2 * b), (2 * b, b)):
        dec += 4 * i * (i // 2) + i // 2  # ConvTranspose 2x2 with bias
        dec += dconv(i, o)
    head = b * cout + cout
    return enc + dec + head


def test_parameter_count_pin() -> None:
    model = UNet2D(3, 2)
    assert count_parameters(model) == 31_037_698
    assert _expected_params(3, 2, 64) == 31_037_698


def test_layer_details() -> None:
    model = UNet2D(3, 2, base_channels=8)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    three = [m for m in convs if m.kernel_size == (3, 3)]
    assert len(three) == 18 and all(m.bias is None for m in three)
    assert model.outc.kernel_size == (1, 1) and model.outc.bias is not None
    ups = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == 4 and all(m.bias is not None and m.stride == (2, 2) for m in ups)
    assert [u.out_channels for u in ups] == [64, 32, 16, 8]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 18
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


@pytest.mark.parametrize("base", [4, 8, 16])
def test_base_channels_scaling(base: int) -> None:
    model = UNet2D(1, 3, base_channels=base)
    assert count_parameters(model) == _expected_params(1, 3, base)
    assert model.inc.block[0].out_channels == base
    assert model.down4.conv.block[0].out_channels == 16 * base


@pytest.mark.parametrize("hw", [(64, 64), (65, 70), (33, 47)])
def test_output_shape_odd_sizes(hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = UNet2D(3, 2, base_channels=4)
    x = torch.randn(2, 3, *hw)
    out = model(x)
    assert out.shape == (2, 2, *hw)
    assert torch.isfinite(out).all()


def test_padding_places_upsampled_map_centred() -> None:
    # Skip 7x5, upsampled 6x4: dh = dw = 1 -> pad 0 top / 1 bottom, 0 left / 1 right.
    from medsemi.nets.unet2d import Up

    up = Up(4, 2)
    with torch.no_grad():
        up.up.weight.fill_(1.0)
        up.up.bias.zero_()
    captured: dict[str, torch.Tensor] = {}
    up.conv.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    x = torch.ones(1, 4, 3, 2)
    skip = torch.zeros(1, 2, 7, 5)
    up(x, skip)
    cat = captured["x"]
    assert cat.shape == (1, 4, 7, 5)
    assert torch.equal(cat[:, :2], skip)  # skip first
    upsampled = cat[0, 2]
    assert upsampled[-1].abs().sum() == 0  # bottom pad row
    assert upsampled[:, -1].abs().sum() == 0  # right pad column
    assert (upsampled[0:6, 0:4] != 0).all()


def test_gradients_flow() -> None:
    torch.manual_seed(0)
    model = UNet2D(2, 3, base_channels=4)
    x = torch.randn(2, 2, 32, 32, requires_grad=True)
    model(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_channels_last_and_autocast_match() -> None:
    torch.manual_seed(0)
    model = UNet2D(3, 2, base_channels=4).eval()
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out_cl = model_cl(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_amp = model_cl(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out_cl, ref, atol=1e-4)
    assert out_amp.shape == ref.shape
    assert torch.allclose(out_amp.float(), ref, atol=0.1, rtol=0.1)


def test_norm_layer_factory_is_used() -> None:
    made: list[int] = []

    def norm(c: int) -> nn.Module:
        made.append(c)
        return nn.GroupNorm(1, c)

    model = UNet2D(1, 2, base_channels=4, norm_layer=norm)
    assert len(made) == 18
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_bilinear_variant_runs() -> None:
    model = UNet2D(3, 2, base_channels=4, bilinear=True)
    assert model(torch.randn(2, 3, 33, 35)).shape == (2, 2, 33, 35)
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())


def test_bad_input_errors() -> None:
    model = UNet2D(3, 2, base_channels=4)
    with pytest.raises(ValueError, match="unet2d.py"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="unet2d.py"):
        model(torch.randn(1, 3, 8, 32))
    with pytest.raises(ValueError, match="unet2d.py"):
        UNet2D(3, 0)
