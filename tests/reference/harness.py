"""What the reference tests share: the stand-in for the Trainer around a method, and the tolerance check.

``Trainer.train_step`` is called on the stand-in (``Trainer.train_step(engine, progress)``), so the
step under test is the engine's own: autocast, backward, optimiser, EMA, LR schedule.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from medsemi.engine.trainer import build_optimizer


def stand_in_engine(method, **train) -> SimpleNamespace:
    """The attributes ``Trainer.train_step`` reads, around ``method`` with the ``train`` settings given
    (CPU, no AMP, no guard, one process). Set ``labelled`` / ``unlabelled`` sources before stepping."""
    cfg = SimpleNamespace(train=SimpleNamespace(nonfinite="stop", **train))
    engine = SimpleNamespace(cfg=cfg, method=method, device=torch.device("cpu"), amp="off",
                             scaler=torch.amp.GradScaler("cpu", enabled=False), _sync_gradients=lambda: None,
                             guard=None)
    engine.optimizer = build_optimizer(cfg, method.trainable_parameters())
    return engine


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float) -> None:
    """Integers equal; floats within ``rtol`` of the larger magnitude of ``a`` (at least 1e-3)."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if not a.is_floating_point():
        assert torch.equal(a, b.to(a.dtype)), f"{what}: {a.tolist()} != {b.tolist()}"
        return
    b = b.to(a.dtype)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(a.abs().max().item() if a.numel() else 0.0, 1e-3)
    assert err <= rtol * scale, f"{what}: max abs diff {err:.3e} (scale {scale:.3e})"
