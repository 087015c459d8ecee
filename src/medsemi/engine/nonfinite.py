"""Non-finite losses during training: the per-interval means that detect them, and the error that stops.

The engine keeps each step's logged tensors on the device and reads them once per log interval
(:func:`interval_means`: one host sync). ``train.nonfinite=stop`` (default) raises
:class:`NonFiniteLossError` naming the first bad iteration and the last good checkpoint;
``skip_step`` (``engine/step_guard.py``) undoes such steps and stops only when a whole interval was skipped.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from medsemi import distributed as ddp

NONFINITE_MODES = ("stop", "skip_step")


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss (``train.nonfinite=stop``); the message says where and what next."""


def over_ranks(count: torch.Tensor) -> torch.Tensor:
    """A count summed over ranks, so that every rank stops together (one collective per log interval)."""
    if ddp.world_size() > 1:
        dist.all_reduce(count)
    return count


def interval_means(pending: list[dict[str, torch.Tensor]], skipping: bool) -> dict[str, float]:
    """Mean of each logged value over a log interval, plus ``nonfinite_steps`` (summed over ranks) and,
    when ``skipping`` (``skip_step``), ``skipped_steps``, in one host sync. With ``skipping`` the means
    are over the steps that were not skipped."""
    ok = [torch.isfinite(p["loss"]) for p in pending]
    means: dict[str, torch.Tensor] = {}
    for k in [k for k in pending[-1] if k != "skipped"]:
        vals = torch.stack([p[k].float() for p in pending if k in p])
        if not skipping:
            means[k] = vals.mean()
        else:
            keep = torch.stack([o for o, p in zip(ok, pending) if k in p])
            means[k] = torch.where(keep, vals, torch.zeros_like(vals)).sum() / keep.sum()
    means["nonfinite_steps"] = over_ranks((~torch.stack(ok)).sum().float())
    if skipping:
        means["skipped_steps"] = torch.stack([p["skipped"] for p in pending]).sum()
    return dict(zip(means, torch.stack(list(means.values())).tolist()))


def first_nonfinite(pending: list[dict[str, torch.Tensor]], iteration: int) -> int:
    """The 1-based iteration of the interval's first non-finite loss on this rank (the interval ends at
    ``iteration``; its first iteration when only another rank had one)."""
    flags = torch.stack([torch.isfinite(p["loss"]) for p in pending]).tolist()
    first = iteration - len(pending) + 1
    return first + (flags.index(False) if False in flags else 0)


def any_nonfinite(pending: list[dict[str, torch.Tensor]]) -> bool:
    """Whether any rank had a non-finite loss in ``pending`` (one sync; used before a checkpoint is written
    in the middle of a log interval)."""
    bad = ~torch.stack([torch.isfinite(p["loss"]) for p in pending])
    return over_ranks(bad.sum().float()).item() > 0


def nonfinite_error(run_dir: Path, first: int, last: int, last_checkpoint: int | None,
                    all_skipped: bool) -> NonFiniteLossError:
    """The error that stops training: what happened (from iteration ``first``, up to ``last`` when every
    step was skipped) and how to continue from the last good checkpoint."""
    ckpt = run_dir / "checkpoints" / "last.pt"
    good = (f"the last good checkpoint is {ckpt} (iteration {last_checkpoint}); continue from it with "
            f"`medsemi train --resume {run_dir} train.lr=<lower>`" if last_checkpoint is not None
            else "no checkpoint was written before it")
    what = (f"every step from iteration {first} to {last} had a non-finite loss and was skipped"
            if all_skipped else f"the loss became non-finite (NaN or inf) at iteration {first}")
    return NonFiniteLossError(
        f"{run_dir}: {what}; training stopped ({good}). Lower train.lr, check the data, or set "
        "train.nonfinite=skip_step to skip such steps"
    )
