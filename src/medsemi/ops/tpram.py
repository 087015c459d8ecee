"""TP-RAM: training-progress-aware random amplitude mix, batched with ``torch.fft``.

Spec: ``shared/spec/ust-run.md`` section 4.1 ("TP-RAM", steps 1-6) and section 6 item 9. Per sample
``i`` and channel, with ``s`` the source and ``g`` the style image (both in [-1, 1]):

1. ``v -> (v + 1) * 127.5``;
2. ``F = fft2``; amplitudes ``|F_s|``, ``|F_g|``, source phase ``angle(F_s)``;
3. centred square of half-size ``b = floor(min(H, W) * band)`` around the fftshifted zero frequency;
5. inside the square ``A = (1 - λ_i) |F_s| + λ_i |F_g|``; outside ``|F_s|``;
6. ``ifft2(A * exp(i * phase))``, real part, clip to [0, 255], map back to [-1, 1].

Instead of fftshift / ifftshift we select the un-shifted frequencies directly: after ``fftshift`` index
``j`` holds frequency ``(j - floor(n/2)) mod n``, so the shifted window ``floor(n/2) ± b`` is exactly the
set of un-shifted indices ``k`` with ``min(k, n - k) <= b`` — for odd and even ``n`` alike (``band <= 0.5``
keeps the shifted window inside the array, as in the original slicing).
"""

from __future__ import annotations

import math

import torch


def window_half_size(height: int, width: int, band: float) -> int:
    """``b = floor(min(H, W) * band)`` (spec 4.1 step 3); the window side is ``2b + 1``."""
    return int(math.floor(min(height, width) * band))


def _low_freq_window(n: int, b: int, device: torch.device) -> torch.Tensor:
    k = torch.arange(n, device=device)
    return torch.minimum(k, n - k) <= b


def amplitude_mix(source: torch.Tensor, style: torch.Tensor, ratios: torch.Tensor, band: float = 0.01
                  ) -> torch.Tensor:
    """Mix the low-frequency amplitude of ``style`` into ``source`` with one ratio per sample.

    ``source``, ``style``: ``(B, C, H, W)`` in [-1, 1]; ``ratios``: ``(B,)`` (λ, same for all channels).
    Returns ``(B, C, H, W)`` in [-1, 1], dtype of ``source``. Computed in float32 (complex64), or in
    float64 (complex128) for a float64 source (reference tests).
    """
    if source.dim() != 4 or source.shape != style.shape:
        raise ValueError(f"medsemi.ops.tpram: source {tuple(source.shape)} and style {tuple(style.shape)} "
                         "must both be (B, C, H, W) of the same shape")
    if ratios.shape != (source.shape[0],):
        raise ValueError(f"medsemi.ops.tpram: ratios must have shape ({source.shape[0]},), "
                         f"got {tuple(ratios.shape)}")
    if not 0.0 <= band <= 0.5:
        raise ValueError(f"medsemi.ops.tpram: band must be in [0, 0.5], got {band}")
    height, width = source.shape[-2:]
    b = window_half_size(height, width, band)
    work = torch.float64 if source.dtype == torch.float64 else torch.float32
    s = (source.to(work) + 1.0) * 127.5
    g = (style.to(work) + 1.0) * 127.5
    f_s = torch.fft.fft2(s)
    amp_g = torch.fft.fft2(g).abs()
    amp_s = f_s.abs()
    lam = ratios.to(device=source.device, dtype=work).view(-1, 1, 1, 1)
    dev = source.device
    win = _low_freq_window(height, b, dev)[:, None] & _low_freq_window(width, b, dev)[None, :]
    amp = torch.where(win, (1 - lam) * amp_s + lam * amp_g, amp_s)
    mixed = torch.polar(amp, torch.angle(f_s))
    out = torch.fft.ifft2(mixed).real.clamp(0.0, 255.0)
    return (out / 127.5 - 1.0).to(source.dtype)


def sample_ratios(batch: int, progress: float | torch.Tensor, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """λ ~ U(0, t) per sample, ``t = iter / max_iter`` (spec 4.1 step 4). float32 ``(B,)``."""
    if not isinstance(progress, torch.Tensor) and not 0.0 <= float(progress) <= 1.0:
        raise ValueError(f"medsemi.ops.tpram: training progress must be in [0, 1], got {progress}")
    if generator is None:
        u = torch.rand((batch,), device=device)
    else:
        u = torch.rand((batch,), generator=generator, device=generator.device).to(device)
    if isinstance(progress, torch.Tensor):
        progress = progress.to(device=u.device, dtype=u.dtype)
    return u * progress


__all__ = ["amplitude_mix", "sample_ratios", "window_half_size"]
