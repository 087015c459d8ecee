"""Batched, on-device weak and strong augmentation (spec ust-run.md 2.5 and 2.6).

The original (UST custom_transforms.py) augments one PIL image at a time in the loader
workers. Here a whole batch is augmented on its own device with plain tensor ops: every
sample draws its own coins and parameters from an explicit ``torch.Generator``; there is no
Python loop over samples and no host synchronisation.

Coordinates: "corner" pixel coordinates, pixel ``i`` spans ``[i, i + 1)`` and has its centre
at ``i + 0.5`` (the PIL convention, and ``grid_sample(align_corners=False)``).

Weak view (2.5). The four steps (scale + crop, rotation, flip, elastic) are composed into ONE
sampling map per sample, so the image is resampled (bilinearly) only once instead of four
times: an output pixel ``u`` is traced back through elastic -> flip -> rotation -> scale/crop
to a point of the input. Fill semantics follow the original step by step:

- rotation: PIL ``rotate`` fills a pixel whose source lies outside the canvas
  (``[0, W) x [0, H)``); inside, bilinear clamps at the canvas edge. Image fill is 0 in the
  8-bit space, i.e. -1 here.
- elastic: ``scipy.ndimage.map_coordinates(order=1, mode='constant')`` fills (0 -> -1) a
  pixel whose source lies outside the pixel-centre range; the mask uses nearest neighbour
  with edge replicate.
- scale + crop never leaves the resized image (border clamp, like PIL ``resize``).

Masks are traced through the same steps but SNAPPED to a pixel at every step (round half up
for the elastic step as scipy order 0, floor for PIL nearest rotate / resize), so a mask is
exactly what the step-by-step nearest-neighbour pipeline gives, and stays in its label set
(resize rule ``floor((j + 0.5) W / out_w)`` in exact integer arithmetic; PIL's accumulated
doubles can land one pixel lower exactly at ties). All channels of a multi-label mask use the
same index map, so nesting such as cup-inside-disc survives.

Mask fill: the rotation fill is the dataset's *background* (table 1.4: fundus and prostate fill
255, M&Ms and BUSI fill 0, and in each case that raw value decodes to background). In the
decoded label space that is class 0 for exclusive labels and all-zero channels for multi-label
labels, so no per-dataset fill value is needed here.

Strong view (2.6), photometric only (it is applied to the weak view, so it shares its geometry):
brightness (PIL ``ImageEnhance.Brightness``), contrast (PIL ``ImageEnhance.Contrast``, blend
with the rounded mean grey value) and a separable Gaussian blur (reflection padding, per
channel, sigma per sample, batched with a grouped convolution); every step truncates back to
8 bit like PIL / ``ToPILImage`` do (with a 1e-3 tolerance, so an exact level that float
arithmetic turned into 99.99999 stays 100). The weak view is not quantised before the strong
one (the original's weak view is 8-bit; here it is float after bilinear resampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medsemi.data.contract import LabelSpec

_HERE = "medsemi/data/augment.py"
# Truncation to 8 bit is ``floor``; the tolerance keeps an exact integer that float arithmetic
# turned into 99.99999 at 99.99999 -> 100 (the exact result), not 99.
_TRUNC_EPS = 1e-3


def _pair(name: str, value: object) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{_HERE}: AugmentConfig.{name} must be a pair [low, high], got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not 0.0 <= lo <= hi:
        raise ValueError(f"{_HERE}: AugmentConfig.{name} needs 0 <= low <= high, got {value!r}")
    return lo, hi


@dataclass
class AugmentConfig:
    """Augmentation settings; the defaults are the spec values (ust-run.md 2.5, 2.6, table 1.4
    fundus column). ``elastic_sigma`` and ``elastic_alpha`` are multiples of the patch size
    ``P``; ``blur_kernel = 0`` means ``int(0.1 P)`` made odd (25 for 256, 39 for 384, 29 for 288).
    ``P`` is ``min(H, W)`` of the batch (the spec's patches are square)."""

    scale_crop_prob: float = 0.5
    scale_max: float = 1.5
    rotate_prob: float = 0.5
    rotate_degrees: float = 20.0
    flip_prob: float = 0.5
    elastic_prob: float = 0.5
    elastic_sigma: float = 0.08
    elastic_alpha: float = 2.0
    brightness: tuple[float, float] = (0.5, 1.5)
    contrast: tuple[float, float] = (0.5, 1.5)
    blur_kernel: int = 0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("scale_crop_prob", "rotate_prob", "flip_prob", "elastic_prob"):
            p = float(getattr(self, name))
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{_HERE}: AugmentConfig.{name} must be a probability, got {p}")
            setattr(self, name, p)
        self.brightness = _pair("brightness", self.brightness)
        self.contrast = _pair("contrast", self.contrast)
        self.blur_sigma = _pair("blur_sigma", self.blur_sigma)
        if self.blur_sigma[0] <= 0:
            raise ValueError(f"{_HERE}: AugmentConfig.blur_sigma must be > 0, got {self.blur_sigma}")
        if float(self.scale_max) < 1.0:
            raise ValueError(f"{_HERE}: AugmentConfig.scale_max must be >= 1, got {self.scale_max}")
        if float(self.rotate_degrees) < 0:
            raise ValueError(f"{_HERE}: AugmentConfig.rotate_degrees must be >= 0, got {self.rotate_degrees}")
        if float(self.elastic_sigma) <= 0 or float(self.elastic_alpha) < 0:
            raise ValueError(f"{_HERE}: AugmentConfig.elastic_sigma must be > 0 and elastic_alpha >= 0")
        k = int(self.blur_kernel)
        if k < 0 or (k > 0 and k % 2 == 0):
            raise ValueError(f"{_HERE}: AugmentConfig.blur_kernel must be 0 (auto) or odd, got {k}")
        self.blur_kernel = k


def blur_kernel_size(patch: int) -> int:
    """Spec table 1.4: ``k = int(0.1 P)``, made odd as ``2 * floor(k / 2) + 1``."""
    k = int(0.1 * patch)
    return 2 * (k // 2) + 1


def gaussian_kernel1d(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised 1D Gaussians ``exp(-x^2 / (2 sigma^2))`` on ``x = -r..r`` (``size = 2r+1``),
    one row per entry of ``sigma`` -> ``(N, size)``."""
    r = size // 2
    x = torch.arange(-r, r + 1, device=sigma.device, dtype=torch.float32)
    w = torch.exp(-(x**2) / (2 * sigma.float().reshape(-1, 1) ** 2))
    return w / w.sum(dim=1, keepdim=True)


def _smooth_zero_pad(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(mode='constant', cval=0)`` (truncate 4 sigma) of
    ``(N, H, W)`` fields: separable, each 1D pass a product with the banded (Toeplitz) matrix
    of the kernel, which is the zero-padded convolution and much faster than a long conv."""
    r = int(4.0 * sigma + 0.5)
    t = torch.arange(-r, r + 1, device=field.device, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2.0 * sigma**2))  # built on the device: no host-to-device copy
    k = k / k.sum()

    def band(n: int) -> torch.Tensor:
        d = torch.arange(n, device=field.device).view(1, n) - torch.arange(n, device=field.device).view(n, 1)
        return torch.where(d.abs() <= r, k[(d + r).clamp(0, 2 * r)], torch.zeros((), device=field.device))

    _, h, w = field.shape
    return band(h) @ field.float() @ band(w)  # the kernel is symmetric: band == band.T


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Clip to [0, 255] and truncate (floor), as PIL's blend and ``ToPILImage`` do."""
    return torch.floor(x.clamp(0.0, 255.0) + _TRUNC_EPS).clamp_max(255.0)


@dataclass
class WeakParams:
    """Per-sample parameters of one weak augmentation (all tensors on the data's device).

    ``out_w``/``out_h``: resized size (equal to W/H where no scaling); ``off_x``/``off_y``: crop
    offset in the resized image; ``angle``: integer degrees, counter-clockwise (0 where no
    rotation); ``displacement``: ``(B, 2, H, W)`` elastic (dx, dy) in pixels (0 where off)."""

    scale_on: torch.Tensor
    out_w: torch.Tensor
    out_h: torch.Tensor
    off_x: torch.Tensor
    off_y: torch.Tensor
    rotate_on: torch.Tensor
    angle: torch.Tensor
    flip_on: torch.Tensor
    elastic_on: torch.Tensor
    displacement: torch.Tensor


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"{_HERE}: the generator lives on {generator.device} but the data on {device}; "
            "create it with torch.Generator(device=data.device)"
        )


class BatchAugment:
    """Weak (geometric, 2.5) and strong (photometric, 2.6) augmentation of whole batches."""

    def __init__(self, cfg: AugmentConfig, label_spec: LabelSpec) -> None:
        self.cfg = cfg
        self.label_spec = label_spec

    # ------------------------------------------------------------------ weak
    def sample_weak(
        self, batch: int, height: int, width: int, device: torch.device | str,
        generator: torch.Generator | None = None,
    ) -> WeakParams:
        """Draw every sample's coins and parameters (spec 2.5); each step has its own coin."""
        cfg = self.cfg
        device = torch.device(device)
        _check_generator(generator, device)
        u = torch.rand((batch, 10), generator=generator, device=device)
        scale_on = u[:, 0] < cfg.scale_crop_prob
        # int(U(1, scale_max) * W), independent for width and height
        fw = 1.0 + (cfg.scale_max - 1.0) * u[:, 1]
        fh = 1.0 + (cfg.scale_max - 1.0) * u[:, 2]
        out_w = torch.where(scale_on, torch.floor(fw * width), float(width)).long().clamp_min(width)
        out_h = torch.where(scale_on, torch.floor(fh * height), float(height)).long().clamp_min(height)
        # uniform integer offsets in [0, out - size]
        off_x = torch.minimum(torch.floor(u[:, 3] * (out_w - width + 1)).long(), out_w - width)
        off_y = torch.minimum(torch.floor(u[:, 4] * (out_h - height + 1)).long(), out_h - height)
        rotate_on = u[:, 5] < cfg.rotate_prob
        d = int(cfg.rotate_degrees)
        angle = torch.minimum(torch.floor(u[:, 6] * (2 * d + 1)).long(), torch.full_like(off_x, 2 * d)) - d
        angle = torch.where(rotate_on, angle, torch.zeros_like(angle))
        flip_on = u[:, 7] < cfg.flip_prob
        elastic_on = u[:, 8] < cfg.elastic_prob
        if cfg.elastic_prob > 0 and cfg.elastic_alpha > 0:
            patch = min(height, width)
            noise = torch.rand((batch * 2, height, width), generator=generator, device=device) * 2 - 1
            disp = _smooth_zero_pad(noise, cfg.elastic_sigma * patch) * (cfg.elastic_alpha * patch)
            disp = disp.view(batch, 2, height, width) * elastic_on.view(batch, 1, 1, 1)
        else:
            disp = torch.zeros((batch, 2, height, width), device=device)
        return WeakParams(scale_on, out_w, out_h, off_x, off_y, rotate_on, angle, flip_on, elastic_on, disp)

    def apply_weak(
        self, image: torch.Tensor, label: torch.Tensor | None, params: WeakParams
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Apply drawn weak parameters: one bilinear resampling of the image, an exact
        step-by-step nearest-neighbour mapping of the label (see the module docstring)."""
        self._check(image, label)
        b, _, h, w = image.shape
        dev = image.device
        p = params
        ux = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5).view(1, 1, w)
        uy = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5).view(1, h, 1)

        # (4) elastic: output u samples the flipped canvas at u + d(u)
        ex = ux + p.displacement[:, 0].float()
        ey = uy + p.displacement[:, 1].float()
        valid = (ex >= 0.5) & (ex <= w - 0.5) & (ey >= 0.5) & (ey <= h - 0.5)
        mx = torch.floor(ex).clamp(0, w - 1) + 0.5  # round half up of (e - 0.5), edge replicate
        my = torch.floor(ey).clamp(0, h - 1) + 0.5

        # (3) horizontal flip
        flip = p.flip_on.view(b, 1, 1)
        ex = torch.where(flip, w - ex, ex)
        mx = torch.where(flip, w - mx, mx)

        # (2) rotation about the centre, counter-clockwise (PIL): source = c + R(theta) (x - c)
        theta = p.angle.float() * (math.pi / 180.0)
        cos, sin = torch.cos(theta).view(b, 1, 1), torch.sin(theta).view(b, 1, 1)
        cx, cy = w / 2.0, h / 2.0

        def rotate(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            dx, dy = x - cx, y - cy
            return cx + cos * dx - sin * dy, cy + sin * dx + cos * dy

        rx, ry = rotate(ex, ey)
        valid &= (rx >= 0) & (rx < w) & (ry >= 0) & (ry < h)
        rx, ry = rx.clamp(0.5, w - 0.5), ry.clamp(0.5, h - 0.5)  # PIL bilinear clamps at the canvas edge
        mrx, mry = rotate(mx, my)
        mvalid = (mrx >= 0) & (mrx < w) & (mry >= 0) & (mry < h)
        mix = torch.floor(mrx).clamp(0, w - 1).long()
        miy = torch.floor(mry).clamp(0, h - 1).long()

        # (1) scale + crop: crop pixel -> resized (+offset) -> original (x W / out_w)
        ow, oh = p.out_w.view(b, 1, 1), p.out_h.view(b, 1, 1)
        ox, oy = p.off_x.view(b, 1, 1), p.off_y.view(b, 1, 1)
        sx = (rx + ox) * (w / ow.float())
        sy = (ry + oy) * (h / oh.float())
        grid = torch.stack((2 * sx / w - 1, 2 * sy / h - 1), dim=-1).to(image.dtype)
        out = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out = torch.where(valid.unsqueeze(1), out, torch.full_like(out, -1.0))

        if label is None:
            return out, None
        # PIL resize NEAREST: floor((j + 0.5) * W / out_w), in exact integer arithmetic
        px = (((2 * (mix + ox) + 1) * w) // (2 * ow)).clamp(0, w - 1)
        py = (((2 * (miy + oy) + 1) * h) // (2 * oh)).clamp(0, h - 1)
        index = (py * w + px).view(b, -1)
        if self.label_spec.multilabel:
            k = label.shape[1]
            lab = label.reshape(b, k, -1).gather(2, index.unsqueeze(1).expand(b, k, -1)).view(b, k, h, w)
            lab = torch.where(mvalid.unsqueeze(1), lab, torch.zeros_like(lab))
        else:
            lab = label.reshape(b, -1).gather(1, index).view(b, h, w)
            lab = torch.where(mvalid, lab, torch.zeros_like(lab))
        return out, lab

    def weak(
        self, image: torch.Tensor, label: torch.Tensor | None, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weak view (spec 2.5): random scale + crop, integer rotation, flip, elastic."""
        if not self.cfg.enabled:
            return image, label
        self._check(image, label)
        b, _, h, w = image.shape
        return self.apply_weak(image, label, self.sample_weak(b, h, w, image.device, generator))

    # ---------------------------------------------------------------- strong
    def blur_size(self, height: int, width: int) -> int:
        return self.cfg.blur_kernel or blur_kernel_size(min(height, width))

    def sample_strong(
        self, batch: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample (brightness factor, contrast factor, blur sigma), each ``(B,)``."""
        device = torch.device(device)
        _check_generator(generator, device)
        u = torch.rand((batch, 3), generator=generator, device=device)
        (b0, b1), (c0, c1), (s0, s1) = self.cfg.brightness, self.cfg.contrast, self.cfg.blur_sigma
        return b0 + (b1 - b0) * u[:, 0], c0 + (c1 - c0) * u[:, 1], s0 + (s1 - s0) * u[:, 2]

    def apply_strong(
        self, image: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        """Brightness, contrast, Gaussian blur with given per-sample factors (spec 2.6)."""
        self._check(image, None)
        b, c, h, w = image.shape
        x = (image.float() + 1.0) * 127.5
        # PIL ImageEnhance.Brightness: blend with black = x * f, clipped and truncated to 8 bit
        x = _to_uint8(x * brightness.float().view(b, 1, 1, 1))
        # PIL ImageEnhance.Contrast: blend with the rounded mean of the "L" (grey) image
        if c == 3:
            grey = torch.floor(0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2] + 0.5)
        elif c == 1:
            grey = x[:, 0]
        else:  # not in the spec: plain channel mean
            grey = torch.floor(x.mean(dim=1) + 0.5)
        mean = torch.floor(grey.mean(dim=(1, 2)) + 0.5).view(b, 1, 1, 1)
        x = _to_uint8(mean + contrast.float().view(b, 1, 1, 1) * (x - mean))
        # separable Gaussian blur, reflection padding, one kernel per sample (grouped conv)
        k = self.blur_size(h, w)
        r = k // 2
        kern = gaussian_kernel1d(sigma, k).repeat_interleave(c, dim=0)  # (B*C, k)
        y = x.reshape(1, b * c, h, w)
        if r > 0:
            y = F.pad(y, (r, r, r, r), mode="reflect")
            y = F.conv2d(y, kern.view(b * c, 1, 1, k), groups=b * c)
            y = F.conv2d(y, kern.view(b * c, 1, k, 1), groups=b * c)
        x = _to_uint8(y.view(b, c, h, w))
        return (x / 127.5 - 1.0).to(image.dtype)

    def strong(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Strong view (spec 2.6), photometric only: apply it to the weak view to share geometry."""
        if not self.cfg.enabled:
            return image
        self._check(image, None)
        return self.apply_strong(image, *self.sample_strong(image.shape[0], image.device, generator))

    # ---------------------------------------------------------------- checks
    def _check(self, image: torch.Tensor, label: torch.Tensor | None) -> None:
        if image.dim() != 4 or not image.is_floating_point():
            raise ValueError(f"{_HERE}: image must be a float (B, C, H, W) tensor, got {tuple(image.shape)} "
                             f"{image.dtype}")
        if label is None:
            return
        b, _, h, w = image.shape
        if self.label_spec.multilabel:
            want = (b, self.label_spec.num_outputs, h, w)
        else:
            want = (b, h, w)
        if tuple(label.shape) != want or label.device != image.device:
            raise ValueError(
                f"{_HERE}: a {self.label_spec.kind} label for an image {tuple(image.shape)} must be "
                f"{want} on {image.device}, got {tuple(label.shape)} on {label.device}"
            )
