"""Atomic, safely loaded checkpoints.

Writing: to a temporary file in the same folder, fsync, then rename. A crash or a kill during a write
leaves the previous checkpoint intact: ``os.replace`` is atomic on POSIX file systems, so readers see
either the old file or the new one. The file gets the permissions a plain ``open()`` would give it
(``0o666`` less the umask), not the ``0o600`` of :func:`tempfile.mkstemp`. ``keep_previous`` also keeps
the file being replaced under that name (``last.pt`` -> ``last.prev.pt``), for resuming when the newest
checkpoint is unreadable.

Reading: ``torch.load(weights_only=True)``, so a file cannot run code while it is unpickled. medsemi's
checkpoints hold tensors and plain Python data; checkpoints written before this rule also hold NumPy's
RNG state (an array) and NumPy scalars, which the short allow-list :data:`ALLOWED_GLOBALS` admits.
Anything else (a pickled function call, an unknown class) is refused with :class:`CheckpointError`.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint file that cannot (or must not) be loaded; the message names the file and what to do."""


def _numpy_globals() -> list[Any]:
    """NumPy types that old checkpoints hold (``np.random.get_state()``, ``np.float64`` scores)."""
    try:
        from numpy._core import multiarray  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: list[Any] = [np.ndarray, np.dtype]
    for fn in (multiarray._reconstruct, multiarray.scalar):
        allowed += [fn, (fn, f"numpy.core.multiarray.{fn.__name__}"), (fn, f"numpy._core.multiarray.{fn.__name__}")]
    allowed += [type(np.dtype(t)) for t in ("uint32", "int64", "int32", "float64", "float32", "bool")]
    return allowed


ALLOWED_GLOBALS = _numpy_globals()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_atomic(obj: Any, path: str | Path, keep_previous: str | Path | None = None) -> None:
    """Write ``obj`` with ``torch.save`` atomically; ``keep_previous``: keep the replaced file under that path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous is not None and path.is_file():
            _keep_copy(path, Path(keep_previous))
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename is None:
            err.filename = str(path)  # "no space left on device while writing <path>"
        raise


def _keep_copy(path: Path, previous: Path) -> None:
    """``previous`` becomes the current ``path`` (a hard link renamed into place: both names stay valid)."""
    link = previous.with_name(f".{previous.name}.link")
    try:
        if link.exists():
            link.unlink()
        os.link(path, link)
        os.replace(link, previous)
    except OSError:  # no hard links on this file system: move it (a kill now leaves only `previous`)
        os.replace(path, previous)


def _unsafe_global(message: str) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", message)
    return found.group(1) if found else "an object that is not a tensor or plain data"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """Load a medsemi checkpoint without running code; :class:`CheckpointError` names the file and the problem
    (``mmap``: map the tensors from the file instead of reading them, for a quick look at a large one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the checkpoint file is empty (a run killed while creating it?); "
                              "use another checkpoint or train again")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: it holds {_unsafe_global(str(err))}, which a medsemi checkpoint never "
            "holds and which could run code; load only checkpoints written by medsemi"
        ) from None
    except Exception as err:  # noqa: BLE001 - a damaged file fails in many ways inside torch.load
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated, or not written by torch.save: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}); "
            "use another checkpoint (checkpoints/last.prev.pt, best_*.pt) or train again"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a medsemi checkpoint (it holds a {type(state).__name__}, not a dict)")
    return state


def load_model_checkpoint(path: str | Path) -> dict:
    """A model checkpoint (``best_test.pt``, ``best_val.pt``, ``iter_<k>.pt``) with its config and dataset
    info, read on the CPU; the training state ``last.pt`` is refused with the model files to use instead."""
    path = Path(path)
    state = load_checkpoint(path)
    if "model" not in state:
        models = sorted(p.name for p in path.parent.glob("*.pt") if not p.name.startswith("last."))
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


def numpy_rng_to_plain(state: tuple) -> dict[str, Any]:
    """``np.random.get_state()`` as plain data (a tensor and numbers), loadable with ``weights_only``."""
    kind, keys, pos, has_gauss, cached = state
    return {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def numpy_rng_from_plain(state: Any) -> tuple:
    """The inverse of :func:`numpy_rng_to_plain`; a tuple from an older checkpoint is returned as it is."""
    if not isinstance(state, dict):
        return tuple(state)
    keys = state["keys"].cpu().numpy().astype(np.uint32)
    return (state["kind"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"])
