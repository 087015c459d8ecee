"""Tests for medsemi.ops.tpram against a per-sample NumPy implementation of spec 4.1 steps 1-6."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medsemi.ops.tpram import amplitude_mix, sample_ratios, window_half_size


def reference_tpram(src: np.ndarray, sty: np.ndarray, ratio: float, band: float) -> np.ndarray:
    """One sample (C,H,W) in [-1,1], float64, written from spec 4.1 steps 1-6 with fftshift."""
    s = (src.astype(np.float64) + 1) * 127.5
    g = (sty.astype(np.float64) + 1) * 127.5
    f_s = np.fft.fft2(s, axes=(-2, -1))
    amp_s, pha_s = np.abs(f_s), np.angle(f_s)
    amp_g = np.abs(np.fft.fft2(g, axes=(-2, -1)))
    a_s = np.fft.fftshift(amp_s, axes=(-2, -1))
    a_g = np.fft.fftshift(amp_g, axes=(-2, -1))
    _, h, w = a_s.shape
    b = int(np.floor(min(h, w) * band))
    ch, cw = h // 2, w // 2
    win = (slice(None), slice(ch - b, ch + b + 1), slice(cw - b, cw + b + 1))
    a_s[win] = a_s[win] * (1 - ratio) + a_g[win] * ratio
    amp = np.fft.ifftshift(a_s, axes=(-2, -1))
    out = np.real(np.fft.ifft2(amp * np.exp(1j * pha_s), axes=(-2, -1)))
    return np.clip(out, 0, 255) / 127.5 - 1


def _images(b: int, c: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # smooth-ish content plus noise so the low frequencies carry most of the energy, as in real images
    base = torch.rand(b, c, 1, 1, generator=g) * 1.2 - 0.6
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    src = (base + 0.3 * torch.sin(3 * xx + 2 * yy) + 0.2 * torch.rand(b, c, h, w, generator=g)).clamp(-1, 1)
    sty = (torch.rand(b, c, h, w, generator=g) * 2 - 1) * 0.5 + 0.3 * torch.cos(2 * yy)
    return src, sty.clamp(-1, 1)


@pytest.mark.parametrize("h,w", [(32, 32), (33, 33), (64, 64), (32, 33), (33, 64)])
@pytest.mark.parametrize("half", [0, 1, 2])
def test_matches_numpy_reference(h: int, w: int, half: int) -> None:
    band = (half + 0.5) / min(h, w)  # gives b = half, i.e. windows of side 1 / 3 / 5
    assert window_half_size(h, w, band) == half
    src, sty = _images(3, 2, h, w, seed=h * 100 + w + half)
    ratios = torch.tensor([0.0, 0.37, 1.0])
    out = amplitude_mix(src, sty, ratios, band=band)
    assert out.shape == src.shape and out.dtype == src.dtype
    for i in range(3):
        ref = reference_tpram(src[i].numpy(), sty[i].numpy(), float(ratios[i]), band)
        np.testing.assert_allclose(out[i].numpy(), ref, atol=1e-4, rtol=0)
    # the mix really changes the image when λ > 0 (guards against a no-op implementation)
    assert float((out[2] - src[2]).abs().max()) > 1e-3


def test_spec_band_window_sides() -> None:
    # spec 1.4: window side 5 at P = 256 / 288, 7 at P = 384
    assert [2 * window_half_size(p, p, 0.01) + 1 for p in (256, 288, 384)] == [5, 5, 7]


def test_zero_ratio_returns_input() -> None:
    src, sty = _images(4, 3, 33, 32, seed=5)
    out = amplitude_mix(src, sty, torch.zeros(4), band=0.5)
    torch.testing.assert_close(out, src, atol=2e-5, rtol=0)


@pytest.mark.parametrize("size", [32, 33])
def test_full_band_ratio_one_gives_style_amplitude_with_source_phase(size: int) -> None:
    src, sty = _images(2, 1, size, size, seed=size)
    src, sty = src * 0.4, sty * 0.4  # keeps the result inside [0, 255]: no clipping below
    out = amplitude_mix(src, sty, torch.ones(2), band=0.5)
    s = (src.double().numpy() + 1) * 127.5
    g = (sty.double().numpy() + 1) * 127.5
    f_s = np.fft.fft2(s)
    expect = np.real(np.fft.ifft2(np.abs(np.fft.fft2(g)) * np.exp(1j * np.angle(f_s))))
    np.testing.assert_allclose(out.numpy(), np.clip(expect, 0, 255) / 127.5 - 1, atol=1e-4, rtol=0)
    # nothing was clipped, so the output's spectrum has the style's amplitude and the source's phase
    assert (expect > 0).all() and (expect < 255).all()
    got = np.fft.fft2((out.double().numpy() + 1) * 127.5)
    f_g = np.fft.fft2(g)
    np.testing.assert_allclose(np.abs(got), np.abs(f_g), rtol=0, atol=0.05)
    strong = np.abs(f_g) > 1.0  # phase is meaningful where the amplitude is not tiny
    dphase = np.angle(got[strong] * np.conj(f_s[strong]))
    assert np.abs(dphase).max() < 1e-3


def test_batched_equals_one_by_one() -> None:
    src, sty = _images(5, 3, 32, 32, seed=9)
    ratios = torch.linspace(0, 1, 5)
    full = amplitude_mix(src, sty, ratios, band=0.07)
    for i in range(5):
        one = amplitude_mix(src[i:i + 1], sty[i:i + 1], ratios[i:i + 1], band=0.07)
        torch.testing.assert_close(full[i:i + 1], one, atol=1e-5, rtol=0)


def test_sample_ratios() -> None:
    assert torch.equal(sample_ratios(8, 0.0, torch.Generator().manual_seed(0)), torch.zeros(8))
    r = sample_ratios(20000, 0.6, torch.Generator().manual_seed(0))
    assert float(r.min()) >= 0 and float(r.max()) < 0.6
    assert abs(float(r.mean()) - 0.3) < 0.005  # sd of the mean 0.6/sqrt(12*20000) ~ 0.0012
    assert abs(float(r.var()) - 0.36 / 12) < 0.002
    a = sample_ratios(4, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, sample_ratios(4, 0.5, torch.Generator().manual_seed(3)))
    assert torch.equal(sample_ratios(4, torch.tensor(0.5), torch.Generator().manual_seed(3)), a)
    with pytest.raises(ValueError, match="tpram"):
        sample_ratios(4, 1.5)


def test_bad_inputs() -> None:
    src, sty = _images(2, 1, 16, 16, seed=0)
    with pytest.raises(ValueError, match="tpram"):
        amplitude_mix(src, sty[:, :, :8], torch.zeros(2))
    with pytest.raises(ValueError, match="tpram"):
        amplitude_mix(src, sty, torch.zeros(3))
    with pytest.raises(ValueError, match="tpram"):
        amplitude_mix(src, sty, torch.zeros(2), band=0.6)
    assert math.isfinite(float(amplitude_mix(src, sty, torch.full((2,), 0.5)).sum()))


def test_no_host_sync_on_meta_device() -> None:
    """Meta tensors have no data, so any host round trip inside the op would raise."""
    src = torch.empty(4, 3, 32, 32, device="meta")
    out = amplitude_mix(src, src, sample_ratios(4, 0.5, None, "meta"), band=0.01)
    assert out.shape == src.shape and out.device.type == "meta"
