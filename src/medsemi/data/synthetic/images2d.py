"""Embedded synthetic mixed-domain 2D dataset (no download): the default data of the demo and the tests.

A seeded generator of 2D images from ``K`` domains that look like different scanners / sites. The
*anatomy* (shape, position and size of the structures) is drawn per image; the *domain* only changes the
appearance (colour or intensity mapping, contrast, blur, noise, smooth bias field, texture) plus a mild
change of size statistics. So the task is learnable across domains but carries a real domain shift, the
setting of mixed-domain semi-supervised segmentation (spec ust-run.md 1.1).

Two targets (``SyntheticConfig.kind``):

- ``"multilabel"`` -- fundus-like (spec 2.1): an RGB image of a retina background with texture and dark
  vessel-like curves radiating from a bright elliptical optic "disc" that holds a brighter "cup"
  (cup inside disc). Label: float32 ``(2, H, W)``, channels (cup, disc), the disc channel includes the cup
  (the ``FUNDUS`` codec's spec).
- ``"exclusive"`` -- prostate-MRI-like (spec 2.2): a grey slice with a body outline, muscles, rectum,
  sometimes a bladder, and one organ-like blob (irregular smooth boundary, brighter periphery and darker
  centre). Label: int64 ``(H, W)`` in {0, 1}. Slices come in "cases" of ``SLICES_PER_CASE`` consecutive
  slices through the same organ (its size follows the slice position), so a few percent of the slices,
  at the ends of a case, have no foreground -- as in the real prostate slice sets.

Domain styles (index 0-based = folder ``Domain1``...). Multi-label (fundus-like); the background and
vessel colours of the first four are calibrated so that each domain's per-channel image mean matches that
of the real ROI crops of the same domain in ``shared/data/samples/Fundus`` (2 images per domain) to within
0.02 (tested); the disc and cup stay bright, as in the real images:

1. *Drishti-like*: dark brown retina, yellow disc, near-white cup, mild blur, little noise.
2. *RIM-ONE-like*: red image (gamma 1.2), pale disc, strong blotchy texture, blurrier, slightly smaller
   discs.
3. *REFUGE/Zeiss-like*: olive-green tint (channel mixing), circular black field-of-view border, strong
   smooth illumination (bias) field, smaller discs.
4. *REFUGE/Canon-like*: bright orange-pink, washed-out image (gamma 0.8, channel mixing), sharp with
   strong sensor noise.
5. *red-free-like*: grey image (green channel copied to all channels), high contrast.
6. *blue-tinted*: cold channel mix, heavy blur.

Exclusive (prostate-MRI-like):

1. *BIDMC-like*: dark image with an endorectal-coil hot spot (strong local bias), moderate noise.
2. *HK/BMC-like*: mid grey, high contrast, fine texture.
3. *I2CVB-like*: bright, sharp and noisy (Rician-like noise), bright organ.
4. *UCL/RUNMC-like*: inverted tissue contrast (gamma 0.8) -- bright fat, dark organ periphery, bright
   organ centre, bright rectum.
5. *low-field-like*: very blurry, low contrast, heavy noise.
6. *gamma-compressed*: gamma 0.5, bright background, weak bias field.

With more than six domains, the extra styles are drawn at random from a fixed seed per domain index.

The split rule of ``build_synthetic_splits`` is the papers' (spec 1.2): labelled = the first ``lb_num``
training images of the labelled domain, unlabelled = the rest of that domain plus every training image of
the other domains, one test set per domain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medsemi.data.codecs import FUNDUS, PROSTATE
from medsemi.data.contract import DatasetInfo
from medsemi.data.datasets import Splits, TensorDataset2D

KINDS = ("multilabel", "exclusive")
SPLITS = ("train", "test")
SLICES_PER_CASE = 12
"""Exclusive kind: consecutive slices per synthetic "case" (file names ``CC_SS.png``)."""


@dataclass
class SyntheticConfig:
    """What to generate. ``train_per_domain``: one count for all domains or one per domain."""

    kind: str = "multilabel"
    num_domains: int = 4
    size: int = 64
    train_per_domain: tuple[int, ...] | int = 40
    test_per_domain: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"synthetic2d: kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.num_domains, int) or self.num_domains < 1:
            raise ValueError(f"synthetic2d: num_domains must be a positive int, got {self.num_domains!r}")
        if not isinstance(self.size, int) or not 16 <= self.size <= 1024:
            raise ValueError(f"synthetic2d: size must be an int in [16, 1024] (64-384 intended), "
                             f"got {self.size!r}")
        counts = self.train_counts()
        if any((not isinstance(c, int)) or c < 0 for c in counts) or self.test_per_domain < 0:
            raise ValueError(f"synthetic2d: image counts must be non-negative ints, got train "
                             f"{self.train_per_domain!r}, test {self.test_per_domain!r}")

    def train_counts(self) -> tuple[int, ...]:
        """Training images per domain, domain order."""
        if isinstance(self.train_per_domain, int):
            return (self.train_per_domain,) * self.num_domains
        counts = tuple(self.train_per_domain)
        if len(counts) != self.num_domains:
            raise ValueError(f"synthetic2d: train_per_domain has {len(counts)} entries but num_domains is "
                             f"{self.num_domains}")
        return counts

    def count(self, domain: int, split: str) -> int:
        return self.train_counts()[domain] if split == "train" else self.test_per_domain


# ---------------------------------------------------------------------------------------------------------
# Domain styles


@dataclass(frozen=True)
class FundusStyle:
    """Appearance of one fundus-like domain. Colours are RGB in [0, 1] before the global mapping."""

    description: str
    background: tuple[float, float, float]
    disc: tuple[float, float, float]
    cup: tuple[float, float, float]
    vessel: tuple[float, float, float]
    # channel mixing: out_c = sum_k mix[c][k] * in_k
    mix: tuple[tuple[float, float, float], ...] = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
    gamma: float = 1.0
    contrast: float = 1.0
    blur: float = 0.5  # Gaussian sigma in pixels at 64 px (scaled with the size)
    noise: float = 0.01
    bias: float = 0.1  # strength of the smooth multiplicative illumination field
    texture: float = 0.04
    texture_scale: float = 3.0  # correlation length in pixels at 64 px
    fov: bool = False  # circular field-of-view border (black outside)
    size_scale: float = 1.0  # mild shape statistics: disc radius multiplier


@dataclass(frozen=True)
class ProstateStyle:
    """Appearance of one MRI-like domain: tissue intensities in [0, 1] then the global mapping."""

    description: str
    air: float
    body: float
    muscle: float
    organ_periphery: float
    organ_centre: float
    rectum: float
    bladder: float
    gamma: float = 1.0
    contrast: float = 1.0
    blur: float = 0.5
    noise: float = 0.02
    rician: bool = False
    bias: float = 0.15
    coil: float = 0.0  # endorectal-coil hot spot strength
    texture: float = 0.04
    texture_scale: float = 2.0
    size_scale: float = 1.0


FUNDUS_STYLES: tuple[FundusStyle, ...] = (
    FundusStyle("Drishti-like: dark brown, yellow disc, mild blur, little noise",
                (0.26, 0.10, 0.03), (0.92, 0.70, 0.30), (1.0, 0.92, 0.60), (0.20, 0.04, 0.01),
                blur=0.5, noise=0.01, bias=0.10, texture=0.03),
    FundusStyle("RIM-ONE-like: red, pale disc, gamma 1.2, blotchy red texture, blurrier, smaller discs",
                (0.50, 0.19, 0.08), (0.95, 0.75, 0.50), (1.0, 0.92, 0.75), (0.32, 0.08, 0.03),
                gamma=1.2, blur=0.9, noise=0.015, bias=0.15, texture=0.06,
                texture_scale=5.0, size_scale=0.95),
    FundusStyle("REFUGE/Zeiss-like: olive-green mix, circular field of view, strong illumination field",
                (0.69, 0.08, 0.08), (0.90, 0.78, 0.40), (0.98, 0.92, 0.62), (0.49, 0.03, 0.03),
                mix=((0.55, 0.40, 0.05), (0.25, 0.70, 0.05), (0.05, 0.20, 0.75)),
                blur=0.7, noise=0.015, bias=0.35, texture=0.04, fov=True, size_scale=0.9),
    FundusStyle("REFUGE/Canon-like: bright orange-pink, washed out, sharp with strong sensor noise",
                (0.62, 0.30, 0.04), (0.96, 0.80, 0.66), (1.0, 0.93, 0.86), (0.48, 0.13, 0.02),
                mix=((0.85, 0.10, 0.05), (0.20, 0.70, 0.10), (0.20, 0.20, 0.60)),
                gamma=0.8, blur=0.2, noise=0.035, bias=0.10, texture=0.03,
                texture_scale=1.5, size_scale=0.95),
    FundusStyle("red-free-like: grey (green channel everywhere), high contrast",
                (0.55, 0.30, 0.10), (0.92, 0.70, 0.30), (1.0, 0.92, 0.60), (0.42, 0.12, 0.05),
                mix=((0, 1, 0), (0, 1, 0), (0, 1, 0)), contrast=1.4, blur=0.5, noise=0.02),
    FundusStyle("blue-tinted: cold channel mix, heavy blur",
                (0.55, 0.30, 0.10), (0.92, 0.70, 0.30), (1.0, 0.92, 0.60), (0.42, 0.12, 0.05),
                mix=((0.2, 0.3, 0.5), (0.3, 0.5, 0.2), (0.7, 0.2, 0.1)), blur=1.5, noise=0.02),
)

PROSTATE_STYLES: tuple[ProstateStyle, ...] = (
    ProstateStyle("BIDMC-like: dark, endorectal-coil hot spot, moderate noise",
                  0.0, 0.16, 0.08, 0.32, 0.20, 0.04, 0.45, gamma=1.1, blur=0.6, noise=0.02, coil=0.9,
                  bias=0.15, texture=0.03),
    ProstateStyle("HK/BMC-like: mid grey, high contrast, fine texture",
                  0.02, 0.45, 0.16, 0.62, 0.38, 0.08, 0.85, contrast=1.2, blur=0.4, noise=0.02,
                  texture=0.04, texture_scale=1.2, size_scale=1.03),
    ProstateStyle("I2CVB-like: bright, sharp, Rician-like noise, bright organ",
                  0.03, 0.58, 0.42, 0.85, 0.74, 0.20, 0.95, blur=0.2, noise=0.04, rician=True,
                  texture=0.03, size_scale=0.97),
    ProstateStyle("UCL/RUNMC-like: inverted contrast, bright fat, dark organ periphery, bright centre",
                  0.0, 0.85, 0.32, 0.12, 0.45, 0.85, 0.15, gamma=0.8, blur=0.5, noise=0.025, bias=0.2,
                  texture=0.04),
    ProstateStyle("low-field-like: very blurry, low contrast, heavy noise",
                  0.05, 0.40, 0.28, 0.55, 0.42, 0.15, 0.70, contrast=0.7, blur=1.6, noise=0.07),
    ProstateStyle("gamma-compressed: gamma 0.5, bright background, weak bias",
                  0.10, 0.35, 0.12, 0.45, 0.25, 0.05, 0.60, gamma=0.5, blur=0.5, noise=0.02, bias=0.05),
)


def _random_fundus_style(domain: int) -> FundusStyle:
    rng = np.random.default_rng((7919, domain))
    base = FUNDUS_STYLES[0]
    mix = rng.dirichlet(np.ones(3) * 2.0, size=3)
    return replace(base, description=f"random style #{domain + 1}",
                   mix=tuple(tuple(float(v) for v in row) for row in mix),
                   gamma=float(rng.uniform(0.6, 1.5)), contrast=float(rng.uniform(0.7, 1.3)),
                   blur=float(rng.uniform(0.2, 1.5)), noise=float(rng.uniform(0.005, 0.05)),
                   bias=float(rng.uniform(0.05, 0.35)), size_scale=float(rng.uniform(0.85, 1.05)))


def _random_prostate_style(domain: int) -> ProstateStyle:
    rng = np.random.default_rng((7927, domain))
    t = rng.uniform(0.0, 1.0, 7)
    return ProstateStyle(f"random style #{domain + 1}", 0.02, *(float(v) for v in t[:6]),
                         gamma=float(rng.uniform(0.6, 1.5)), blur=float(rng.uniform(0.2, 1.5)),
                         noise=float(rng.uniform(0.01, 0.06)), bias=float(rng.uniform(0.05, 0.3)),
                         size_scale=float(rng.uniform(0.9, 1.05)))


def domain_style(kind: str, domain: int) -> FundusStyle | ProstateStyle:
    """The style of domain ``domain`` (0-based): a preset for the first six, then a seeded random one."""
    if kind not in KINDS:
        raise ValueError(f"synthetic2d: kind must be one of {KINDS}, got {kind!r}")
    presets: tuple[Any, ...] = FUNDUS_STYLES if kind == "multilabel" else PROSTATE_STYLES
    if domain < len(presets):
        return presets[domain]
    return _random_fundus_style(domain) if kind == "multilabel" else _random_prostate_style(domain)


# ---------------------------------------------------------------------------------------------------------
# Shared vectorised helpers: torch float32 on the CPU, maps (N, H, W), per-image parameters (N, 1, 1)

Tensor = torch.Tensor


def _grid(size: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in [0, 1): y of shape (1, H, 1) and x of shape (1, 1, W)."""
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    return c.view(1, size, 1), c.view(1, 1, size)


def _col(values: Any) -> Tensor:
    return torch.as_tensor(np.asarray(values, np.float32)).view(-1, 1, 1)


def _blob_radius(y: Tensor, x: Tensor, cy: Tensor, cx: Tensor, ry: Tensor, rx: Tensor, rot: Tensor,
                 harm: np.ndarray, phase: np.ndarray) -> Tensor:
    """Normalised radius of a rotated ellipse with a smooth irregular boundary (< 1 inside).

    ``harm``/``phase``: (N, M) amplitudes/phases of boundary harmonics 2..M+1 (the boundary radius is
    multiplied by ``1 + sum_m a_m cos(m phi + p_m)``).
    """
    dy, dx = y - cy, x - cx
    c, s = torch.cos(rot), torch.sin(rot)
    u = (c * dx + s * dy) / rx
    v = (c * dy - s * dx) / ry
    phi = torch.atan2(v, u)
    boundary = torch.ones_like(phi)
    for m in range(harm.shape[1]):
        boundary = boundary + _col(harm[:, m]) * torch.cos((m + 2) * phi + _col(phase[:, m]))
    return torch.sqrt(u * u + v * v) / boundary


def _smooth_noise(noise: np.ndarray, sigma: float) -> Tensor:
    """White noise (N, H, W) smoothed by a periodic Gaussian of ``sigma`` px (FFT), unit std per image."""
    f = torch.fft.rfft2(torch.from_numpy(noise))
    h, w = noise.shape[-2:]
    fy = torch.fft.fftfreq(h).view(-1, 1)
    fx = torch.fft.rfftfreq(w).view(1, -1)
    f = f * torch.exp(-2 * math.pi ** 2 * sigma ** 2 * (fy * fy + fx * fx))
    out = torch.fft.irfft2(f, s=(h, w))
    return out / out.std(dim=(1, 2), keepdim=True).clamp_min(1e-6)


def _bias_field(coef: np.ndarray, y: Tensor, x: Tensor, strength: float) -> Tensor:
    """Smooth multiplicative field ``exp(strength * quadratic polynomial)``, coefficients (N, 5)."""
    yy, xx = y - 0.5, x - 0.5
    poly = (_col(coef[:, 0]) * xx + _col(coef[:, 1]) * yy + _col(coef[:, 2]) * xx * yy * 2
            + _col(coef[:, 3]) * (xx * xx * 2 - 0.17) + _col(coef[:, 4]) * (yy * yy * 2 - 0.17))
    return torch.exp(strength * poly)


def _gaussian_blur(img: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of (N, C, H, W) with replicated borders (padding by 3 sigma, then an FFT filter)."""
    if sigma <= 0:
        return img
    n, c, h, w = img.shape
    pad = min(int(math.ceil(3 * sigma)), h - 1, w - 1)
    z = F.pad(img.reshape(n * c, 1, h, w), (pad, pad, pad, pad), mode="replicate")[:, 0]
    hp, wp = z.shape[-2:]
    fy = torch.fft.fftfreq(hp).view(-1, 1)
    fx = torch.fft.rfftfreq(wp).view(1, -1)
    z = torch.fft.irfft2(torch.fft.rfft2(z) * torch.exp(-2 * math.pi ** 2 * sigma ** 2 * (fy * fy + fx * fx)),
                         s=(hp, wp))
    return z[:, pad:pad + h, pad:pad + w].reshape(n, c, h, w)


def _finish(img: Tensor, blur_px: float, noise: np.ndarray, noise_level: float, gamma: float,
            contrast: float, rician: np.ndarray | None = None) -> np.ndarray:
    """(N, C, H, W) in ~[0, 1]: gamma, contrast around 0.5, blur, additive (or Rician-like) noise, clip,
    8-bit quantisation."""
    img = img.clamp_min(0.0) ** gamma
    img = 0.5 + contrast * (img - 0.5)
    img = _gaussian_blur(img, blur_px)
    nz = torch.from_numpy(noise).view(img.shape)
    if rician is not None:
        nz2 = torch.from_numpy(rician).view(img.shape)
        img = torch.sqrt((img + noise_level * nz) ** 2 + (noise_level * nz2) ** 2)
    else:
        img = img + noise_level * nz
    return torch.round(img.clamp(0.0, 1.0) * 255.0).to(torch.uint8).numpy()


def _stack_rows(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}


# ---------------------------------------------------------------------------------------------------------
# Fundus-like (multi-label)

_N_VESSELS = 7


def _fundus_params(cfg: SyntheticConfig, domain: int, split: str, n: int) -> dict[str, np.ndarray]:
    """Per-image random draws, one generator per image (image i does not depend on n)."""
    size = cfg.size
    rows: list[dict[str, Any]] = []
    for i in range(n):
        rng = np.random.default_rng((cfg.seed, 0, domain, SPLITS.index(split), i))
        rows.append({
            "centre": rng.uniform(0.38, 0.62, 2),
            "radius": rng.uniform(0.14, 0.21),
            "aspect": rng.uniform(0.85, 1.15),
            "rot": rng.uniform(0, math.pi),
            "harm": rng.uniform(-0.05, 0.05, 3),
            "phase": rng.uniform(0, 2 * math.pi, 3),
            "cup_ratio": rng.uniform(0.35, 0.65),
            "cup_shift": rng.uniform(-0.15, 0.15, 2),
            "cup_aspect": rng.uniform(0.85, 1.15),
            "cup_harm": rng.uniform(-0.06, 0.06, 3),
            "cup_phase": rng.uniform(0, 2 * math.pi, 3),
            "v_angle": rng.uniform(0, 2 * math.pi) + np.arange(_N_VESSELS) * 2 * math.pi / _N_VESSELS
            + rng.uniform(-0.3, 0.3, _N_VESSELS),
            "v_curl": rng.uniform(-1.5, 1.5, _N_VESSELS),
            "v_wave": rng.uniform(-0.3, 0.3, _N_VESSELS),
            "v_freq": rng.uniform(4, 12, _N_VESSELS),
            "v_width": rng.uniform(0.6, 1.3, _N_VESSELS),
            "bias": rng.normal(0, 1, 5),
            "fov": np.concatenate([rng.uniform(-0.25, 0.25, 2), rng.uniform(0.55, 0.7, 1)]),
            "jitter": rng.normal(0, 0.03, 3),
            "texture": rng.standard_normal((size, size), dtype=np.float32),
            "noise": rng.standard_normal((3, size, size), dtype=np.float32),
        })
    return _stack_rows(rows)


def _render_fundus(cfg: SyntheticConfig, domain: int, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 3, H, W) and float32 labels (N, 2, H, W) (cup, disc)."""
    size = cfg.size
    if n == 0:
        return np.zeros((0, 3, size, size), np.uint8), np.zeros((0, 2, size, size), np.float32)
    st = domain_style("multilabel", domain)
    assert isinstance(st, FundusStyle)
    p = _fundus_params(cfg, domain, split, n)
    y, x = _grid(size)
    px = 1.0 / size  # one pixel in normalised units
    cy, cx = _col(p["centre"][:, 0]), _col(p["centre"][:, 1])
    r = _col(p["radius"]) * st.size_scale
    asp = _col(p["aspect"]).sqrt()
    rot = _col(p["rot"])
    rho_disc = _blob_radius(y, x, cy, cx, r * asp, r / asp, rot, p["harm"], p["phase"])
    ccy = cy + _col(p["cup_shift"][:, 0]) * r
    ccx = cx + _col(p["cup_shift"][:, 1]) * r
    cr = r * _col(p["cup_ratio"])
    casp = _col(p["cup_aspect"]).sqrt()
    rho_cup = _blob_radius(y, x, ccy, ccx, cr * casp, cr / casp, rot, p["cup_harm"], p["cup_phase"])
    disc = rho_disc <= 1.0
    cup = (rho_cup <= 1.0) & disc
    label = torch.stack([cup, disc], dim=1).to(torch.float32).numpy()

    # soft appearance layers: the disc edge is ~1 px wide, the cup edge (pallor) ~2 px
    soft_disc = torch.sigmoid((1.0 - rho_disc) * r / (0.8 * px))
    soft_cup = torch.sigmoid((1.0 - rho_cup) * cr / (1.5 * px)) * soft_disc

    # vessels: curves in polar coordinates around the disc centre, thinning outwards
    dy, dx = y - cy, x - cx
    rad = torch.sqrt(dy * dy + dx * dx)
    ang = torch.atan2(dy, dx)
    expo = torch.full_like(rad, -math.inf)  # max over vessels of the Gaussian profile's exponent
    inv_width = 1.0 / (px * (1.6 - rad) * max(1.0, size / 64) ** 0.5)
    for j in range(_N_VESSELS):
        theta = (_col(p["v_angle"][:, j]) + _col(p["v_curl"][:, j]) * rad
                 + _col(p["v_wave"][:, j]) * torch.sin(_col(p["v_freq"][:, j]) * rad))
        d = (torch.remainder(ang - theta + math.pi, 2 * math.pi) - math.pi) * rad * inv_width
        expo = torch.maximum(expo, -(d * d) * _col(1.0 / p["v_width"][:, j] ** 2))
    vessels = torch.exp(expo) * torch.sigmoid((rad - 0.3 * r) / (1.5 * px))

    tex = _smooth_noise(p["texture"], st.texture_scale * size / 64)
    bg, dc, cu, ve = (torch.tensor(c, dtype=torch.float32).view(1, 3, 1, 1)
                      for c in (st.background, st.disc, st.cup, st.vessel))
    sd, sc, sv = soft_disc[:, None], soft_cup[:, None], vessels[:, None]
    img = bg * (1 + st.texture * 4 * tex[:, None]) + sd * (dc - bg) + sc * (cu - dc)
    img = img * (1 - 0.85 * sv) + sv * 0.85 * ve
    img = img * (1 + torch.from_numpy(p["jitter"].astype(np.float32)).view(n, 3, 1, 1))
    img = torch.einsum("ck,nkhw->nchw", torch.tensor(st.mix, dtype=torch.float32), img)
    img = img * _bias_field(p["bias"], y, x, st.bias)[:, None]
    if st.fov:
        fy, fx, fr = (_col(p["fov"][:, k]) for k in range(3))
        dist = torch.sqrt((y - 0.5 - fy) ** 2 + (x - 0.5 - fx) ** 2)
        img = img * torch.sigmoid((fr - dist) / (1.5 * px))[:, None]
    out = _finish(img, st.blur * size / 64, p["noise"], st.noise, st.gamma, st.contrast)
    return out, label


# ---------------------------------------------------------------------------------------------------------
# Prostate-like (exclusive)


def _prostate_params(cfg: SyntheticConfig, domain: int, split: str, n: int) -> dict[str, np.ndarray]:
    """Per-case anatomy (``SLICES_PER_CASE`` consecutive slices) plus per-slice jitter and noise."""
    size = cfg.size
    rows: list[dict[str, Any]] = []
    c: dict[str, Any] = {}
    for i in range(n):
        case, t = divmod(i, SLICES_PER_CASE)
        if t == 0 or not c:
            crng = np.random.default_rng((cfg.seed, 1, domain, SPLITS.index(split), case, 0))
            c = {
                "centre": np.array([crng.uniform(0.42, 0.56), crng.uniform(0.42, 0.58)]),
                "radius": crng.uniform(0.12, 0.19),
                "aspect": crng.uniform(0.75, 1.1),
                "harm": crng.uniform(-0.07, 0.07, 3),
                "phase": crng.uniform(0, 2 * math.pi, 3),
                "extent": crng.uniform(0.85, 1.15),  # how far the organ reaches towards the case ends
                "body": np.array([crng.uniform(0.36, 0.42), crng.uniform(0.44, 0.49)]),
                "muscle": np.array([crng.uniform(0.2, 0.26), crng.uniform(0.07, 0.1),
                                    crng.uniform(0.1, 0.16)]),
            }
        rng = np.random.default_rng((cfg.seed, 1, domain, SPLITS.index(split), case, t + 1))
        # slice position in (-1, 1); the organ radius follows a rounded profile, zero near the case ends
        pos = (t + 0.5) / SLICES_PER_CASE * 2 - 1
        prof_arg = 1.0 - (pos / (c["extent"] * 0.97)) ** 2
        prof = prof_arg ** 0.25 if prof_arg > 0.06 else 0.0
        rows.append({
            "centre": c["centre"] + rng.normal(0, 0.01, 2),
            "radius": c["radius"] * prof * rng.uniform(0.95, 1.05),
            "aspect": c["aspect"],
            "rot": rng.uniform(-0.15, 0.15),
            "harm": c["harm"] + rng.normal(0, 0.01, 3),
            "phase": c["phase"],
            "body": c["body"],
            "muscle": c["muscle"] * rng.uniform(0.95, 1.05, 3),
            "bladder": rng.uniform(0.06, 0.12) * (pos < -0.2),
            "rectum": rng.uniform(0.05, 0.075),
            "bias": rng.normal(0, 1, 5),
            "jitter": rng.normal(0, 0.03),
            "texture": rng.standard_normal((size, size), dtype=np.float32),
            "noise": rng.standard_normal((2, size, size), dtype=np.float32),
        })
    return _stack_rows(rows)


def _render_prostate(cfg: SyntheticConfig, domain: int, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 1, H, W) and int64 labels (N, H, W)."""
    size = cfg.size
    if n == 0:
        return np.zeros((0, 1, size, size), np.uint8), np.zeros((0, size, size), np.int64)
    st = domain_style("exclusive", domain)
    assert isinstance(st, ProstateStyle)
    p = _prostate_params(cfg, domain, split, n)
    y, x = _grid(size)
    px = 1.0 / size
    cy, cx = _col(p["centre"][:, 0]), _col(p["centre"][:, 1])
    r = _col(p["radius"]) * st.size_scale
    present = (r > 0).to(torch.float32)
    r_safe = torch.where(r > 0, r, torch.full_like(r, 1e-3))
    ry = r_safe * _col(p["aspect"])
    rho = _blob_radius(y, x, cy, cx, ry, r_safe, _col(p["rot"]), p["harm"], p["phase"])
    label = ((rho <= 1.0) & (r > 0)).to(torch.int64).numpy()

    def ellipse(ey: Tensor | float, ex: Tensor | float, ary: Tensor, arx: Tensor,
                edge: float = 1.0) -> Tensor:
        rr = torch.sqrt(((y - ey) / ary) ** 2 + ((x - ex) / arx) ** 2)
        return torch.sigmoid((1.0 - rr) * torch.minimum(ary, arx) / (edge * px))

    body = ellipse(0.5, 0.5, _col(p["body"][:, 0]), _col(p["body"][:, 1]), 1.5)
    mr, mw, mo = (_col(p["muscle"][:, k]) for k in range(3))
    muscles = torch.maximum(ellipse(cy + 0.02, cx - mr, mo, mw), ellipse(cy + 0.02, cx + mr, mo, mw))
    # a gluteal band at the back of the body
    band = ellipse(0.83, 0.5, torch.full((n, 1, 1), 0.05), torch.full((n, 1, 1), 0.3))
    muscles = torch.maximum(muscles, band)
    rr_ = _col(p["rectum"])
    rectum_y = cy + torch.where(r > 0, ry, torch.full_like(ry, 0.08)) + rr_ * 0.9
    rectum = ellipse(rectum_y, cx, rr_, rr_ * 1.3)
    bl = _col(p["bladder"])
    bladder = ellipse(cy - 0.2, cx, bl.clamp_min(1e-3), bl.clamp_min(1e-3) * 1.5) * (bl > 0)
    soft_organ = torch.sigmoid((1.0 - rho) * r_safe / (0.8 * px)) * present
    centre_zone = torch.sigmoid((0.6 - rho) * r_safe / (1.5 * px)) * present

    tex = _smooth_noise(p["texture"], st.texture_scale * size / 64)
    img = torch.full((n, size, size), st.air)
    img = img + body * (st.body - st.air)
    img = img + muscles * body * (st.muscle - img)
    img = img + bladder * (st.bladder - img)
    img = img + rectum * (st.rectum - img)
    organ_val = st.organ_periphery + centre_zone * (st.organ_centre - st.organ_periphery)
    img = img + soft_organ * (organ_val - img)
    img = img * (1 + st.texture * 3 * tex * body) * (1 + _col(p["jitter"]))
    img = img * _bias_field(p["bias"], y, x, st.bias)
    if st.coil > 0:  # endorectal coil: bright spot decaying away from the rectum
        dist = torch.sqrt((y - rectum_y) ** 2 + (x - cx) ** 2)
        img = img * (1 + st.coil * torch.exp(-dist / 0.1))
    noise, second = p["noise"][:, :1], p["noise"][:, 1:]
    out = _finish(img[:, None], st.blur * size / 64, noise, st.noise, st.gamma, st.contrast,
                  rician=second if st.rician else None)
    return out, label


# ---------------------------------------------------------------------------------------------------------
# Public API


def synthetic_info(cfg: SyntheticConfig) -> DatasetInfo:
    """Channels, label spec (the FUNDUS / PROSTATE codecs' specs), domains ``domain1..K``, patch size."""
    spec = FUNDUS.label_spec if cfg.kind == "multilabel" else PROSTATE.label_spec
    styles = [domain_style(cfg.kind, d).description for d in range(cfg.num_domains)]
    return DatasetInfo(
        name="synthetic",
        in_channels=3 if cfg.kind == "multilabel" else 1,
        label_spec=spec,
        domains=tuple(f"domain{d + 1}" for d in range(cfg.num_domains)),
        patch_size=(cfg.size, cfg.size),
        extra={"kind": cfg.kind, "seed": cfg.seed, "styles": styles},
    )


def _check_domain_split(cfg: SyntheticConfig, domain: int, split: str) -> None:
    if not isinstance(domain, (int, np.integer)) or not 0 <= domain < cfg.num_domains:
        raise ValueError(f"synthetic2d: domain must be a 0-based index in [0, {cfg.num_domains}), "
                         f"got {domain!r}")
    if split not in SPLITS:
        raise ValueError(f"synthetic2d: split must be one of {SPLITS}, got {split!r}")


def generate_domain_uint8(cfg: SyntheticConfig, domain: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """8-bit images ``(N, C, H, W)`` and labels (multi-label float32 ``(N, 2, H, W)``, exclusive int64
    ``(N, H, W)``) of one domain (0-based) and split; deterministic given ``cfg.seed``."""
    _check_domain_split(cfg, domain, split)
    n = cfg.count(domain, split)
    render = _render_fundus if cfg.kind == "multilabel" else _render_prostate
    return render(cfg, int(domain), split, n)


def sample_names(cfg: SyntheticConfig, domain: int, split: str) -> list[str]:
    """File stems in generation order (sorted order == generation order)."""
    n = cfg.count(domain, split)
    if cfg.kind == "multilabel":
        width = max(3, len(str(max(n - 1, 0))))
        return [f"d{domain + 1}_{split}_{i:0{width}d}" for i in range(n)]
    width = max(2, len(str(max((n - 1) // SLICES_PER_CASE, 0))))
    return [f"{i // SLICES_PER_CASE:0{width}d}_{i % SLICES_PER_CASE:02d}" for i in range(n)]


def generate_domain(cfg: SyntheticConfig, domain: int, split: str) -> TensorDataset2D:
    """The images of one domain (0-based index, as in the data contract) and split ("train"/"test").

    Images float32 ``(C, H, W)`` = ``v / 127.5 - 1`` of 8-bit values (spec 2, ``Normalize_tf``), so the
    in-memory data equal what ``write_fundus_layout`` writes, read back. Deterministic given
    ``cfg.seed``, ``domain`` and ``split``; image ``i`` does not depend on how many images are drawn.
    """
    images, labels = generate_domain_uint8(cfg, domain, split)
    img_t = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)
    names = [f"domain{domain + 1}/{split}/{s}" for s in sample_names(cfg, domain, split)]
    return TensorDataset2D(img_t, torch.from_numpy(labels), [int(domain)] * len(names), names)


def _concat(parts: list[TensorDataset2D]) -> TensorDataset2D:
    labels = [q.labels for q in parts]
    return TensorDataset2D(
        torch.cat([q.images for q in parts]),
        None if any(lab is None for lab in labels) else torch.cat(labels),  # type: ignore[arg-type]
        torch.cat([q.domains for q in parts]),
        [nm for q in parts for nm in q.names],
    )


def build_synthetic_splits(cfg: SyntheticConfig, lb_domain: int, lb_num: int, val_fraction: float = 0.0,
                           split_seed: int = 0) -> Splits:
    """Splits with the papers' rule (spec ust-run.md 1.2); ``lb_domain`` is 1-based as in the papers.

    Labelled = the first ``lb_num`` training images of ``lb_domain``; unlabelled = the remaining training
    images of that domain plus all training images of the other domains (domain order; they keep their
    labels for diagnostics only); test = one set per domain. ``val_fraction > 0`` (our addition, the
    originals select on the test set): a random fraction (``split_seed``) of each domain's *unlabelled*
    training images is moved to ``validation[domain name]``.
    """
    if not 1 <= lb_domain <= cfg.num_domains:
        raise ValueError(f"synthetic2d: lb_domain is 1-based and must be in [1, {cfg.num_domains}], "
                         f"got {lb_domain}")
    n_lb_domain = cfg.train_counts()[lb_domain - 1]
    if not 1 <= lb_num <= n_lb_domain:
        raise ValueError(f"synthetic2d: lb_num must be in [1, {n_lb_domain}] (training images of domain "
                         f"{lb_domain}), got {lb_num}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"synthetic2d: val_fraction must be in [0, 1), got {val_fraction}")
    info = synthetic_info(cfg)
    labelled: TensorDataset2D | None = None
    unlabelled: list[TensorDataset2D] = []
    validation: dict[str, TensorDataset2D] = {}
    test: dict[str, TensorDataset2D] = {}
    for d in range(cfg.num_domains):
        train = generate_domain(cfg, d, "train")
        test[info.domains[d]] = generate_domain(cfg, d, "test")
        start = lb_num if d == lb_domain - 1 else 0
        if d == lb_domain - 1:
            labelled = train.subset(range(lb_num))
        rest = list(range(start, len(train)))
        if val_fraction > 0:
            rng = np.random.default_rng((split_seed, d))
            n_val = int(round(val_fraction * len(rest)))
            chosen = set(rng.choice(len(rest), size=n_val, replace=False).tolist())
            validation[info.domains[d]] = train.subset([rest[k] for k in sorted(chosen)])
            rest = [rest[k] for k in range(len(rest)) if k not in chosen]
        unlabelled.append(train.subset(rest))
    assert labelled is not None
    return Splits(info, labelled, _concat(unlabelled), test, validation)


PROSTATE_SITES = ("BIDMC", "BMC", "HK", "I2CVB", "RUNMC", "UCL")
"""The ProstateSlice site folders, in the prostate reader's order (``data/formats/prostate.py``)."""


def synth_layout(cfg: SyntheticConfig) -> str:
    """The reader that :func:`write_layout` writes for: ``fundus`` (multi-label, 4 domains), ``prostate``
    (exclusive, 6 domains: the reader wants every site) or ``generic`` (any other number of domains)."""
    if cfg.kind == "multilabel":
        return "fundus" if cfg.num_domains == 4 else "generic"
    return "prostate" if cfg.num_domains == len(PROSTATE_SITES) else "generic"


def write_layout(cfg: SyntheticConfig, out_dir: str | Path, overwrite: bool = False) -> str:
    """Write the dataset where a reader finds it; returns that reader's ``data.format``
    (:func:`synth_layout`). A folder that is not empty is refused unless ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose an empty or new folder, or pass --overwrite to write "
                              "the synthetic images over what is there")
    layout = synth_layout(cfg)
    if layout == "generic":
        write_generic_layout(cfg, out)
    else:
        write_fundus_layout(cfg, out)
    return layout


def write_generic_layout(cfg: SyntheticConfig, out_dir: str | Path) -> None:
    """The generic format (``data/formats/generic.py``): ``imagesTr/domainN_<stem>_0000.png``, labels as
    class indices (exclusive) or the multi-label bit code (cup = 1, disc = 2, so cup pixels hold 3), one
    domain per synthetic domain; no ``splits.json``, so ``data.lb_domain`` applies the papers' rule."""
    import json

    from PIL import Image

    out = Path(out_dir)
    multilabel = cfg.kind == "multilabel"
    spec = (FUNDUS if multilabel else PROSTATE).label_spec
    if multilabel:
        labels: dict[str, Any] = {"background": 0}
        labels.update({name: [v for v in range(1, 2 ** len(spec.class_names)) if v >> c & 1]
                       for c, name in enumerate(spec.class_names)})
    else:
        labels = {name: i for i, name in enumerate(spec.class_names)}
    domains: dict[str, str] = {}
    for d in range(cfg.num_domains):
        for split, (img_dir, lab_dir) in (("train", ("imagesTr", "labelsTr")), ("test", ("imagesTs", "labelsTs"))):
            (out / img_dir).mkdir(parents=True, exist_ok=True)
            (out / lab_dir).mkdir(parents=True, exist_ok=True)
            images, labs = generate_domain_uint8(cfg, d, split)
            for img, lab, stem in zip(images, labs, sample_names(cfg, d, split)):
                case = f"domain{d + 1}_{stem}" if split == "train" else f"domain{d + 1}_test_{stem}"
                domains[case] = f"domain{d + 1}"
                if multilabel:
                    Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)), mode="RGB").save(
                        out / img_dir / f"{case}_0000.png")
                    code = sum((lab[c] > 0).astype(np.uint8) << c for c in range(lab.shape[0]))
                else:
                    Image.fromarray(img[0], mode="L").save(out / img_dir / f"{case}_0000.png")
                    code = lab.astype(np.uint8)
                Image.fromarray(np.asarray(code, dtype=np.uint8), mode="L").save(out / lab_dir / f"{case}.png")
    meta = {
        "name": "synthetic",
        "channel_names": {"0": "R", "1": "G", "2": "B"} if multilabel else {"0": "grey"},
        "labels": labels,
        "file_ending": ".png",
        "numTraining": sum(cfg.train_counts()),
        "domain_names": [f"domain{d + 1}" for d in range(cfg.num_domains)],
        "domains": domains,
        "patch_size": [cfg.size, cfg.size],
        "resize": True,
        "image_resample": "lanczos" if multilabel else "bilinear",
        "normalization": "uint8",
        "source": {"format": "synthetic", "kind": cfg.kind, "seed": cfg.seed},
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))


def write_fundus_layout(cfg: SyntheticConfig, out_dir: str | Path) -> None:
    """Write the dataset in an on-disk layout of spec 2 (``medsemi data synth OUT_DIR``).

    ``multilabel``: the Fundus layout of spec 2.1, ``DomainN/{train,test}/ROIs/{image,mask}/*.png``, RGB
    images, grey masks 0 = cup / 128 = rim / 255 = background (``FUNDUS`` codec).
    ``exclusive``: the ProstateSlice layout of spec 2.2, ``<site>/{train,test}/{image,mask}/CC_SS.png`` with
    the prostate reader's site names (``BIDMC``, ``BMC``, ... for domains 1, 2, ...; six are needed for the
    reader, which wants every site; fewer are written for tests), grey
    images, masks 0 = organ / 255 = background (``PROSTATE`` codec).
    """
    from PIL import Image

    if cfg.kind == "exclusive" and cfg.num_domains > len(PROSTATE_SITES):
        raise ValueError(f"the ProstateSlice layout has {len(PROSTATE_SITES)} sites, not {cfg.num_domains}; "
                         "use write_generic_layout")
    out = Path(out_dir)
    for d in range(cfg.num_domains):
        for split in SPLITS:
            images, labels = generate_domain_uint8(cfg, d, split)
            if cfg.kind == "multilabel":
                base = out / f"Domain{d + 1}" / split / "ROIs"
                codec = FUNDUS
            else:
                base = out / PROSTATE_SITES[d] / split
                codec = PROSTATE
            (base / "image").mkdir(parents=True, exist_ok=True)
            (base / "mask").mkdir(parents=True, exist_ok=True)
            for img, lab, stem in zip(images, labels, sample_names(cfg, d, split)):
                if cfg.kind == "multilabel":
                    Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)), mode="RGB").save(
                        base / "image" / f"{stem}.png")
                else:
                    Image.fromarray(img[0], mode="L").save(base / "image" / f"{stem}.png")
                Image.fromarray(codec.encode(lab), mode="L").save(base / "mask" / f"{stem}.png")


__all__ = [
    "FUNDUS_STYLES", "PROSTATE_STYLES", "SLICES_PER_CASE", "FundusStyle", "ProstateStyle", "SyntheticConfig",
    "build_synthetic_splits", "domain_style", "generate_domain", "generate_domain_uint8", "sample_names",
    "synthetic_info", "synth_layout", "write_fundus_layout", "write_generic_layout", "write_layout",
]
