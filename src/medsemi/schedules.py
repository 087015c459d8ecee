"""Learning-rate, EMA and consistency-weight schedules (spec ust-run.md 1.5)."""

from __future__ import annotations

import math


def poly_lr(base_lr: float, step: int, max_steps: int, power: float = 0.9) -> float:
    """LR set after step ``step`` (0-based): ``base * (1 - step/max)^power``.

    The original sets the LR after the optimiser step, so steps 0 and 1 both use ``base``;
    the engine reproduces this by calling ``poly_lr(base, k)`` for the step *after* ``k``.
    """
    return base_lr * max(0.0, 1.0 - step / max_steps) ** power


def ema_alpha(step: int, decay: float = 0.99) -> float:
    """EMA factor ``min(1 - 1/(k+1), decay)``; ``k = 0`` copies the student (spec 1.5)."""
    return min(1.0 - 1.0 / (step + 1), decay)


def sigmoid_rampup(current: float, length: float) -> float:
    """``exp(-5 (1 - c/length)^2)`` with ``c`` clipped to ``[0, length]`` (Laine & Aila, 2017)."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(current, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


def consistency_weight(step: int, max_steps: int, ramp_epochs: int = 200) -> float:
    """UST/MiDSS weight ``w``: ``e = floor(k / (max/200))`` clipped to [0, 200], ``w = rampup(e)``.

    Values: 0.0067 at k = 0, 0.287 at mid-training, 0.9999 at the last step (spec 1.5).
    """
    epoch = math.floor(step / (max_steps / ramp_epochs))
    return sigmoid_rampup(min(max(epoch, 0), ramp_epochs), ramp_epochs)
