"""Read checkpoints without running code: ``torch.load(weights_only=True)``.

``weights_only`` unpickles tensors and plain Python containers only. A run's ``last.pt`` also holds
NumPy's random-generator state, so the few NumPy types an array needs are allow-listed (the
allow-list PyTorch documents for NumPy arrays); nothing else can be constructed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not the kind of checkpoint asked for."""


def _numpy_globals() -> list:
    try:
        from numpy._core import multiarray  # NumPy 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import multiarray

    types = [multiarray._reconstruct, np.ndarray, np.dtype]
    types += [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.float32)]
    return types


def load_weights_only(path: str | Path, mmap: bool = False) -> dict:
    """The checkpoint's dict, loaded on the CPU without executing code; one-sentence errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is reported with the file name
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable medsemi checkpoint ({first[:200]})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a medsemi checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


def load_model_checkpoint(path: str | Path) -> dict:
    """A model checkpoint (``best_test.pt``, ``best_val.pt``) with its config and dataset info."""
    path = Path(path)
    state = load_weights_only(path)
    if "model" not in state:
        models = sorted(p.name for p in path.parent.glob("*.pt") if p.name != "last.pt")
        hint = ", ".join(models) if models else "best_test.pt or best_val.pt"
        if "optimizer" in state or "method" in state:
            raise CheckpointError(f"{path}: this is the training state for resuming, not a model; "
                                  f"use a model checkpoint from the same folder ({hint})")
        raise CheckpointError(f"{path}: holds no 'model' weights; use a model checkpoint ({hint})")
    missing = [k for k in ("config", "info") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: model checkpoint without {', '.join(missing)}; it was not written by "
                              "medsemi train")
    return state
