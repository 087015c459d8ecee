"""The run directory before training starts: may this run write there (``check_run_dir``)?

A new run needs a new or empty directory, ``--resume`` needs a checkpoint to resume from, and neither may
start while another trainer on this machine is writing there (``run_lock``).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from medsemi import distributed as ddp
from medsemi.config import ConfigError
from medsemi.run_lock import LOCK_NAME, RunLockedError, check_not_running

RUN_FILES = {"config.yaml", "splits.json", "metrics.jsonl", "train.log", "tensorboard", "checkpoints", "curves.png",
             LOCK_NAME}
"""What a run writes before its first checkpoint (a directory holding only these may be cleared)."""


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """A new run needs a new (or empty) directory. One left by a run that died before its first
    checkpoint (only the files a run writes first) is cleared with a message, so that its logs do not
    mix with the new run's; a directory with a checkpoint or with other files is refused."""
    try:
        check_not_running(run_dir)
    except RunLockedError as err:
        raise ConfigError(str(err)) from None
    ckpt = run_dir / "checkpoints"
    if resume:
        if not any((ckpt / n).is_file() for n in ("last.pt", "last.prev.pt")):
            raise ConfigError(
                f"{run_dir}: no checkpoint to resume from (checkpoints/last.pt is missing; the run stopped "
                f"before its first checkpoint); start it again with `medsemi train CONFIG --run-dir "
                f"{run_dir}`"
            )
        return
    if (ckpt / "last.pt").exists() or (ckpt / "last.prev.pt").exists():
        raise ConfigError(
            f"{run_dir} already holds a run (checkpoints/last.pt); continue it with "
            f"`medsemi train --resume {run_dir}` or choose another --run-dir"
        )
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    names = {p.name for p in run_dir.iterdir()}
    foreign = sorted(names - RUN_FILES)
    stale = [p for p in ckpt.iterdir() if not p.name.startswith(".")] if ckpt.is_dir() else []
    if foreign or stale:
        raise ConfigError(
            f"{run_dir} is not empty ({', '.join(foreign or [p.name for p in stale])}) and holds no "
            "resumable run; choose another --run-dir or empty it"
        )
    if ddp.is_main_process():
        print(f"{run_dir}: a run stopped there before its first checkpoint; clearing its "
              f"{', '.join(sorted(names))} and starting again", file=sys.stderr)
        for name in names:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    ddp.barrier()
