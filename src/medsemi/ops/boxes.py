"""Cut-mix boxes and the all-cover box, batched on the device.

Spec: ``shared/spec/ust-run.md`` section 4.1 ("Random cut-mix box", "All-cover box") and section 6
item 9 (no per-sample Python loops, no ``nonzero`` on the CPU).

The original sampler (UST ``train.py`` ``obtain_cutmix_box``), per sample of size ``P x P``:

1. with probability ``1 - prob`` the mask is empty;
2. area ``A = U(area_min, area_max) * P^2`` drawn once;
3. repeat: aspect ``r = U(aspect_min, aspect_max)``, ``w = int(sqrt(A / r))``, ``h = int(sqrt(A * r))``,
   ``x, y`` uniform integers in ``[0, P)``; accept when ``x + w <= P`` and ``y + h <= P``;
4. mask = 1 on rows ``y .. y+h-1`` and columns ``x .. x+w-1``.

Vectorised form with the same distribution: for one candidate ``r`` the event "``x, y`` fit" has
probability ``p(r) = max(P-w+1, 0)/P * max(P-h+1, 0)/P``, and conditioned on it ``x`` and ``y`` are
uniform on ``{0..P-w}`` and ``{0..P-h}``. So we draw ``CANDIDATES`` aspects per sample at once,
accept each with probability ``p(r)`` (one uniform each), take the first accepted aspect, and then draw
the position uniformly among the valid ones. The acceptance probability per candidate is at least
about 0.06 for every area in ``[0.02, 0.4]`` (measured for P = 16 .. 384; it decreases towards ~0.061
for large P), so all ``CANDIDATES = 512`` fail with probability below ``0.94**512 ~ 2e-14`` per sample.
In that (practically impossible) case the sample falls back to a square box of the drawn area at a
uniform valid position — the only deviation from the original distribution.

Non-square images (``H != W``; the original only handles squares): the area is a fraction of ``H*W``
and the aspect is relative to the image's own aspect, ``w = int(sqrt(A/r * W/H))``,
``h = int(sqrt(A*r * H/W))``; for ``H == W`` this is exactly the original formula.
"""

from __future__ import annotations

import torch

CANDIDATES = 512
"""Aspect candidates drawn per sample; see the module docstring for the failure probability."""


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """U[0, 1) draws from ``generator`` (on its own device), moved to ``device`` (host->device only)."""
    if generator is None:
        return torch.rand(shape, device=device, dtype=dtype)
    out = torch.rand(shape, generator=generator, device=generator.device, dtype=dtype)
    return out.to(device)


def _rect_mask(y: torch.Tensor, x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, height: int, width: int
               ) -> torch.Tensor:
    """(B,H,W) float mask, 1 on rows ``y..y+h-1`` and columns ``x..x+w-1`` (all int64 ``(B,)``)."""
    rows = torch.arange(height, device=y.device)
    cols = torch.arange(width, device=y.device)
    in_rows = (rows[None, :] >= y[:, None]) & (rows[None, :] < (y + h)[:, None])
    in_cols = (cols[None, :] >= x[:, None]) & (cols[None, :] < (x + w)[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :]).to(torch.float32)


def _check_range(name: str, lo_hi: tuple[float, float], lo_bound: float, hi_bound: float | None) -> None:
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    if not (lo_bound < lo <= hi) or (hi_bound is not None and hi > hi_bound):
        raise ValueError(f"medsemi.ops.boxes: invalid {name} range {lo_hi!r}")


def sample_box_params(batch: int, height: int, width: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu", area: tuple[float, float] = (0.02, 0.4),
                      aspect: tuple[float, float] = (0.3, 1 / 0.3), prob: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Box parameters ``(y, x, h, w)``, int64 ``(B,)`` each, with the distribution of spec 4.1.

    A sample without a box (probability ``1 - prob``) gets ``h = w = 0``.
    """
    if batch < 0 or height < 1 or width < 1:
        raise ValueError(f"medsemi.ops.boxes: bad box batch/size {batch}, {height}x{width}")
    _check_range("area", area, 0.0, 1.0)
    _check_range("aspect", aspect, 0.0, None)
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"medsemi.ops.boxes: box probability must be in [0, 1], got {prob}")
    f64 = torch.float64
    draws = _uniform((batch, 3 + 2 * CANDIDATES), generator, device)
    keep = draws[:, 0] <= prob  # original: empty when random.random() > p
    area_px = (area[0] + (area[1] - area[0]) * draws[:, 1]) * float(height * width)  # (B,)
    r = aspect[0] + (aspect[1] - aspect[0]) * draws[:, 3:3 + CANDIDATES]  # (B,K)
    u_acc = draws[:, 3 + CANDIDATES:]
    # for H == W, W/H == H/W == 1.0 exactly, so these equal int(sqrt(A/r)), int(sqrt(A*r)).
    w = torch.floor(torch.sqrt(area_px[:, None] / r * (width / height)))
    h = torch.floor(torch.sqrt(area_px[:, None] * r * (height / width)))
    p_fit = ((width - w + 1).clamp(min=0) / width) * ((height - h + 1).clamp(min=0) / height)
    accepted = u_acc < p_fit  # (B,K)
    any_acc = accepted.any(dim=1)
    cand = torch.arange(CANDIDATES, device=accepted.device)
    # index of the first accepted candidate (the last one, if none was accepted)
    first = torch.where(accepted, cand, CANDIDATES).amin(dim=1, keepdim=True).clamp(max=CANDIDATES - 1)
    w_sel = torch.gather(w, 1, first).squeeze(1)
    h_sel = torch.gather(h, 1, first).squeeze(1)
    # fallback (probability < 1e-13 per sample): square box of the drawn area, clipped to the image
    side = torch.floor(torch.sqrt(area_px))
    w_sel = torch.where(any_acc, w_sel, side.clamp(max=width))
    h_sel = torch.where(any_acc, h_sel, side.clamp(max=height))
    # position uniform among the valid top-left corners
    nx = (width - w_sel + 1).to(f64)
    ny = (height - h_sel + 1).to(f64)
    x = torch.minimum(torch.floor(draws[:, 2] * nx), nx - 1)
    y_draw = _uniform((batch,), generator, device)
    y = torch.minimum(torch.floor(y_draw * ny), ny - 1)
    zero = torch.zeros_like(w_sel)
    w_sel = torch.where(keep, w_sel, zero)
    h_sel = torch.where(keep, h_sel, zero)
    return y.long(), x.long(), h_sel.long(), w_sel.long()


def random_boxes(batch: int, height: int, width: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", area: tuple[float, float] = (0.02, 0.4),
                 aspect: tuple[float, float] = (0.3, 1 / 0.3), prob: float = 1.0) -> torch.Tensor:
    """One random cut-mix box per sample, float32 ``(B, H, W)`` with 1 inside (spec 4.1)."""
    y, x, h, w = sample_box_params(batch, height, width, generator, device, area, aspect, prob)
    return _rect_mask(y, x, h, w, height, width)


def bounding_box_params(region: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Tightest box of each sample's region: ``(y, x, h, w, nonempty)``, int64 / bool ``(B,)``.

    Row/column ``any`` plus first/last index; an empty region gives ``h = w = 0``, ``nonempty = False``.
    """
    if region.dim() != 3:
        raise ValueError(f"medsemi.ops.boxes: region must be (B, H, W), got shape {tuple(region.shape)}")
    region = region.bool()
    height, width = region.shape[1:]
    rows = region.any(dim=2)  # (B,H)
    cols = region.any(dim=1)  # (B,W)
    nonempty = rows.any(dim=1)
    r_idx = torch.arange(height, device=region.device)
    c_idx = torch.arange(width, device=region.device)
    y0 = torch.where(rows, r_idx, height).amin(dim=1)  # first / last occupied row and column
    y1 = torch.where(rows, r_idx, -1).amax(dim=1)
    x0 = torch.where(cols, c_idx, width).amin(dim=1)
    x1 = torch.where(cols, c_idx, -1).amax(dim=1)
    zero = torch.zeros_like(y0)
    h = torch.where(nonempty, y1 - y0 + 1, zero)
    w = torch.where(nonempty, x1 - x0 + 1, zero)
    return torch.where(nonempty, y0, zero), torch.where(nonempty, x0, zero), h, w, nonempty


def all_cover_boxes(region: torch.Tensor, generator: torch.Generator | None = None,
                    area: tuple[float, float] = (0.02, 0.4), aspect: tuple[float, float] = (0.3, 1 / 0.3)
                    ) -> torch.Tensor:
    """All-cover box (UST, spec 4.1): the tightest box containing every non-zero pixel of each
    sample's ``region`` (B,H,W); a sample with an empty region gets a random cut-mix box (p = 1).

    Returns float32 ``(B, H, W)``. Random boxes are drawn for the whole batch (no host sync to ask which
    samples are empty), so the generator advances the same way whatever the regions are.
    """
    y0, x0, h, w, nonempty = bounding_box_params(region)
    height, width = region.shape[1:]
    ry, rx, rh, rw = sample_box_params(region.shape[0], height, width, generator, region.device, area,
                                       aspect, prob=1.0)
    y = torch.where(nonempty, y0, ry)
    x = torch.where(nonempty, x0, rx)
    h = torch.where(nonempty, h, rh)
    w = torch.where(nonempty, w, rw)
    return _rect_mask(y, x, h, w, height, width)


__all__ = ["CANDIDATES", "random_boxes", "sample_box_params", "all_cover_boxes", "bounding_box_params"]
