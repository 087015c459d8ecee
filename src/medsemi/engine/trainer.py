"""The training loop (spec ust-run.md 1.5): iterations, SGD/Adam, poly LR, EMA, AMP, evaluation,
model selection, logs, atomic checkpoints and exact resume.

The loop is written once; a method only supplies ``train_step``. Everything a run needs to
continue (networks, teacher, method buffers, optimiser, scaler, batch sources, every RNG)
goes into ``checkpoints/last.pt``, so ``--resume`` continues at the same iteration and, on a
CPU, reaches bit-identical weights to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from medsemi import distributed as ddp
from medsemi.checkpoints import (
    CheckpointError,
    load_checkpoint,
    numpy_rng_from_plain,
    numpy_rng_to_plain,
    save_atomic,
)
from medsemi.config import Config, ConfigError, config_to_dict, save_config
from medsemi.data.datasets import Splits
from medsemi.device import autocast_for, resolve_amp, resolve_channels_last, resolve_device
from medsemi.engine.ema import ema_update
from medsemi.engine.nonfinite import (
    NONFINITE_MODES,
    any_nonfinite,
    first_nonfinite,
    interval_means,
    nonfinite_error,
)
from medsemi.engine.run_dir import check_run_dir
from medsemi.engine.step_guard import SkipNonFinite
from medsemi.families.base import DatasetFamily
from medsemi.families.images import ImageFamily
from medsemi.families.select import build_family, data_kind
from medsemi.methods.base import Method, Progress, check_method_fits
from medsemi.methods.registry import available_methods, get_method
from medsemi.nets.build import build_model
from medsemi.run_lock import RunLockedError, hold_run_lock, touch_lock
from medsemi.schedules import ema_alpha, poly_lr


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def default_threads() -> int:
    """Automatic ``train.threads``: half the CPUs this process may use, at least 1 and at most 4.

    Measured on a shared 2-core machine (load ~8, 2D U-Net at 64 px, UST-RUN): 1 thread ran 0.39-0.45 it/s,
    2 threads (torch's default there) 0.06-0.11 it/s, since each intra-op barrier waits for a descheduled
    thread. Half the CPUs leaves room for the data pipeline and other processes; small 2D networks gain
    little beyond 4 threads."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return min(4, max(1, cpus // 2))


def set_threads(requested: int) -> int:
    """Set torch's CPU thread count (``train.threads``; 0 = :func:`default_threads`); returns it."""
    threads = requested or default_threads()
    torch.set_num_threads(threads)
    return threads


def format_eta(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def build_optimizer(cfg: Config, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    tr = cfg.train
    if tr.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=tr.lr, momentum=tr.momentum, weight_decay=tr.weight_decay, nesterov=tr.nesterov
        )
    if tr.optimizer == "adam":
        # skip_step on a GPU: the step counter on the device too, so that masking it needs no host sync
        capturable = tr.nonfinite == "skip_step" and bool(params) and params[0].is_cuda
        return torch.optim.Adam(params, lr=tr.lr, betas=tuple(tr.betas), weight_decay=tr.weight_decay,
                                capturable=capturable)
    raise ValueError(f"train.optimizer must be sgd or adam, got {tr.optimizer!r}")


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def dataset_info_dict(family: DatasetFamily) -> dict:
    info = family.info
    return {
        "name": info.name,
        "in_channels": info.in_channels,
        "label_kind": info.label_spec.kind,
        "class_names": list(info.label_spec.class_names),
        "domains": list(info.domains),
        "patch_size": list(info.patch_size),
        "extra": dict(info.extra),
    }


class Trainer:
    """Train one method on one dataset into a run directory (see README "Run directory")."""

    def __init__(
        self, cfg: Config, run_dir: str | Path, resume: bool = False, family: DatasetFamily | Splits | None = None
    ):
        """``family``: the dataset, when already built (2D :class:`Splits` are taken as an image family)."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        if cfg.train.nonfinite not in NONFINITE_MODES:
            raise ConfigError(f"train.nonfinite must be one of {', '.join(NONFINITE_MODES)}, "
                              f"got {cfg.train.nonfinite!r}")
        self.rank_device = ddp.init_from_env()
        check_run_dir(self.run_dir, resume)
        self.device = self.rank_device or resolve_device(cfg.train.device)
        self.amp = resolve_amp(cfg.train.amp, self.device)
        self.main = ddp.is_main_process()
        self.threads = set_threads(cfg.train.threads) if self.device.type == "cpu" else torch.get_num_threads()
        seed = cfg.seed + 1000 * ddp.rank()
        seed_everything(seed, cfg.train.deterministic)

        method_cls: type[Method] = get_method(cfg.method.name)
        names = tuple(available_methods())
        if family is None:
            check_method_fits(method_cls, *data_kind(cfg), cfg.data.format, names)  # before reading any data
            family = build_family(cfg)
        elif isinstance(family, Splits):
            family = ImageFamily.of(family)
        self.family = family
        info = family.info
        check_method_fits(method_cls, len(info.patch_size), tuple(info.domains) if len(info.patch_size) == 3 else (),
                          cfg.data.format, names)
        student = build_model(cfg.model, info).to(self.device)
        if method_cls.single_task and getattr(student, "takes_task_ids", False):
            raise ConfigError(f"method {method_cls.name!r} trains a plain single-task network but "
                              f"model.name={cfg.model.name} takes task prompts; set model.name=vnet")
        teacher = None
        if method_cls.wants_teacher(cfg.method):
            teacher = build_model(cfg.model, info).to(self.device)  # independent init (spec 3.1)
            teacher.requires_grad_(False)
        peer = build_model(cfg.model, info).to(self.device) if method_cls.uses_peer else None  # trainable
        memory_format = resolve_channels_last(cfg.model.channels_last, self.device, student)
        if memory_format is not None:
            student = student.to(memory_format=memory_format)
            teacher = teacher.to(memory_format=memory_format) if teacher is not None else None
            peer = peer.to(memory_format=memory_format) if peer is not None else None
        if peer is not None:
            self.method = method_cls(cfg.method, student, teacher, info, peer=peer).to(self.device)
        else:
            self.method = method_cls(cfg.method, student, teacher, info).to(self.device)
        self.method.generator = torch.Generator(device=self.device).manual_seed(seed + 1)
        self.student = self.method.student  # the evaluated network (a method may swap its networks' roles)
        if cfg.train.compile:
            blocker = self.method.compile_blocker()
            if blocker:
                raise ConfigError(f"train.compile=true does not work with method {cfg.method.name}: {blocker}")
            self.method.student = torch.compile(self.student)
            if self.method.peer is not None:
                self.method.peer = torch.compile(self.method.peer)
        self._broadcast_from_main()
        self.optimizer = build_optimizer(cfg, self.method.trainable_parameters())
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")

        self.labelled, self.unlabelled = family.make_sources(
            cfg, self.device, seed, method_cls.uses_unlabelled, ddp.rank(), ddp.world_size()
        )

        self.iteration = 0
        self.best: dict[str, dict[str, Any]] = {
            "test": {"score": -math.inf, "iteration": -1},
            "val": {"score": -math.inf, "iteration": -1},
        }
        self._stop = False
        self._lock: Path | None = None  # run.lock while fit() trains (main process)
        self.writer = None
        self.last_checkpoint: int | None = None  # iteration of the newest last.pt written or resumed from
        self.guard = SkipNonFinite(self.method) if cfg.train.nonfinite == "skip_step" else None
        if resume:
            self._resume()
        if self.main:
            self._prepare_run_dir(resume)
            self._say(f"device: {self.device}, {self.threads} CPU thread(s) (train.threads), amp: {self.amp}")
            if resume:
                self._say(f"resumed at iteration {self.iteration} of {cfg.train.iterations}")

    def _say(self, line: str) -> None:
        """A line for the person watching (stdout) and for the run's log (``run_dir/train.log``)."""
        print(line, flush=True)
        with open(self.run_dir / "train.log", "a") as handle:
            handle.write(line + "\n")

    # ------------------------------------------------------------------ run directory, logs
    def _prepare_run_dir(self, resume: bool) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "checkpoints").mkdir(exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        (self.run_dir / "splits.json").write_text(json.dumps(self.family.summary(), indent=2))
        metrics_path = self.run_dir / "metrics.jsonl"
        if resume and metrics_path.exists():  # drop records written after the checkpoint
            keep = [
                line for line in metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("iteration", 0) <= self.iteration
            ]
            metrics_path.write_text("".join(line + "\n" for line in keep))
        if self.cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.iteration)
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self.writer = None

    def _log(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        touch_lock(self._lock)  # the run's last sign of life, for `medsemi runs`
        if self.writer is not None:
            step = record["iteration"]
            for key, value in record.items():
                if key not in ("iteration", "kind") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, step)

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {
            "iteration": self.iteration,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method_generator": self.method.generator.get_state(),
            "labelled": self.labelled.state_dict(),
            "unlabelled": self.unlabelled.state_dict() if self.unlabelled else None,
            "rng": {
                "python": random.getstate(),
                "numpy": numpy_rng_to_plain(np.random.get_state()),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            "best": self.best,
            "config": config_to_dict(self.cfg),
            "info": dataset_info_dict(self.family),
        }

    def save_checkpoint(self) -> None:
        """``last.pt``; the one it replaces is kept as ``last.prev.pt`` (the resume fallback)."""
        if self.main:
            ckpt = self.run_dir / "checkpoints"
            save_atomic(self._state(), ckpt / "last.pt", keep_previous=ckpt / "last.prev.pt")
        self.last_checkpoint = self.iteration

    def _save_model(self, name: str, score: float | None) -> None:
        if self.main:
            save_atomic(
                {
                    "model": unwrap(self.student).state_dict(),
                    "iteration": self.iteration,
                    "score": None if score is None else float(score),
                    "config": config_to_dict(self.cfg),
                    "info": dataset_info_dict(self.family),
                },
                self.run_dir / "checkpoints" / name,
            )

    def _resume(self) -> None:
        """Load ``last.pt``; when it is unreadable, fall back to ``last.prev.pt`` with a message."""
        ckpt = self.run_dir / "checkpoints"
        try:
            self._load(ckpt / "last.pt")
            return
        except (CheckpointError, FileNotFoundError) as err:
            if not (ckpt / "last.prev.pt").is_file():
                raise CheckpointError(f"{err}; no checkpoints/last.prev.pt to fall back to, so this run cannot be "
                                      "resumed: start a new one with another --run-dir") from None
            problem = err
        try:
            self._load(ckpt / "last.prev.pt")
        except CheckpointError as err:
            raise CheckpointError(f"{problem}; the fallback failed too: {err}") from None
        if self.main:
            print(f"{problem}\nresuming from the previous checkpoint {ckpt / 'last.prev.pt'} "
                  f"(iteration {self.iteration}) instead", file=sys.stderr)

    def _load(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.method.generator.set_state(state["method_generator"])
        self.labelled.load_state_dict(state["labelled"])
        if self.unlabelled is not None and state["unlabelled"] is not None:
            self.unlabelled.load_state_dict(state["unlabelled"])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(numpy_rng_from_plain(rng["numpy"]))
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        self.best = state["best"]
        self.iteration = int(state["iteration"])
        self.last_checkpoint = self.iteration

    # ------------------------------------------------------------------ the loop
    def _request_stop(self, signum: int, frame: Any) -> None:
        self._stop = True

    def _broadcast_from_main(self) -> None:
        """Every rank starts from rank 0's networks (as DDP does at construction)."""
        if ddp.world_size() == 1:
            return
        with torch.no_grad():
            for tensor in [*self.method.parameters(), *self.method.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def _sync_gradients(self) -> None:
        """Average gradients over ranks (works with any number of forward calls per step)."""
        world = ddp.world_size()
        if world == 1:
            return
        grads = [p.grad for p in self.method.trainable_parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def train_step(self, progress: Progress) -> dict[str, torch.Tensor]:
        tr = self.cfg.train
        if self.method.on_stage_start(progress):
            self.optimizer = build_optimizer(self.cfg, self.method.trainable_parameters())
        labelled = self.labelled.next()
        draw = self.unlabelled is not None and self.method.uses_unlabelled_at(progress)
        unlabelled = self.unlabelled.next() if draw else None
        if self.guard is not None:
            self.guard.before(self.optimizer)
        with autocast_for(self.device, self.amp):
            out = self.method.train_step(labelled, unlabelled, progress)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        self._sync_gradients()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        k = progress.iteration
        if self.method.teacher is not None:
            ema_update(self.method.teacher, unwrap(self.method.student), ema_alpha(k, tr.ema_decay),
                       buffers=not self.method.teacher_keeps_own_bn_stats)
        if self.guard is not None:  # a non-finite loss: undo this step on the device (no host sync)
            finite = torch.isfinite(out.loss.detach())
            if ddp.world_size() > 1:  # every rank skips when one does (the gradients were averaged)
                flag = finite.to(torch.int32)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                finite = flag.bool()
            self.guard.after(self.optimizer, finite)
            skipped = (~finite).float()
        if tr.schedule == "poly":  # set after step k: steps 0 and 1 both use the base LR (spec 1.5)
            lr = poly_lr(tr.lr, k, tr.iterations, tr.poly_power)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        logs = dict(out.logs)
        logs["loss"] = out.loss.detach()
        if self.guard is not None:
            logs["skipped"] = skipped  # on every rank alike (a step skipped on one rank is skipped on all)
        return logs

    def evaluate(self, surface: bool = False) -> dict:
        nets = {"student": unwrap(self.student)}
        if self.method.teacher is not None and self.cfg.eval.evaluate_teacher:
            nets["teacher"] = self.method.teacher
        amp = self.amp if self.cfg.eval.amp == "train" else "off"  # fp32 by default, as the originals
        return self.family.evaluate(nets, self.cfg, self.device, surface=surface, amp=amp)

    def _periodic_eval(self) -> None:
        surface = self.cfg.eval.surface_metrics == "every"
        result = self.evaluate(surface=surface)
        record: dict[str, Any] = {"kind": "eval", "iteration": self.iteration}
        for split, roles in result.items():
            for role, agg in roles.items():
                record[f"{split}_{role}_dice"] = agg["mean_dice"]
                for domain, classes in agg["per_domain"].items():
                    record[f"{split}_{role}_dice_{domain}"] = float(
                        np.nanmean([v["dice"] for v in classes.values()])
                    )
        # the model evaluated here was trained by steps 0 .. iteration-1: its stage is that of the last step
        suffix = self.method.best_suffix(Progress(self.iteration - 1, self.cfg.train.iterations,
                                                  self.cfg.train.eval_every))
        for split in ("test", "val"):  # the papers' best-on-test, and best-on-validation
            if split in result:
                key = split + suffix
                best = self.best.setdefault(key, {"score": -math.inf, "iteration": -1})
                score = result[split]["student"]["mean_dice"]
                if score > best["score"]:
                    self.best[key] = best = {"score": score, "iteration": self.iteration}
                    self._save_model(f"best_{key}.pt", score)
                record[f"best_{key}_dice"] = best["score"]
        self._log(record)

    def fit(self, stop_after: int | None = None) -> None:
        """Train until ``train.iterations`` (or for ``stop_after`` more steps, as if interrupted)."""
        tr = self.cfg.train
        old_handlers = {}
        if self.main:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(ValueError):  # not the main thread
                    old_handlers[sig] = signal.signal(sig, self._request_stop)
        bar = None
        plain = self.main and not (tr.progress_bar and sys.stdout.isatty())
        if self.main and not plain:
            from tqdm.auto import tqdm

            bar = tqdm(total=tr.iterations, initial=self.iteration, desc=self.cfg.method.name, dynamic_ncols=True)
        pending: list[dict[str, torch.Tensor]] = []
        steps_done = 0
        tic = time.perf_counter()
        lock = contextlib.ExitStack()
        try:
            if self.main:  # run.lock while training: no second trainer here, and `medsemi runs` sees it running
                try:
                    self._lock = lock.enter_context(hold_run_lock(self.run_dir))
                except RunLockedError as err:
                    raise ConfigError(str(err)) from None
            while self.iteration < tr.iterations and not self._stop:
                progress = Progress(self.iteration, tr.iterations, tr.eval_every)
                pending.append(self.train_step(progress))
                self.iteration += 1
                steps_done += 1
                if bar is not None:
                    bar.update(1)
                if len(pending) >= tr.log_every or self.iteration == tr.iterations:
                    values = interval_means(pending, self.guard is not None)  # one sync; counts non-finite losses
                    self._check_finite(values, pending)
                    elapsed = time.perf_counter() - tic
                    values["it_per_s"] = len(pending) / max(elapsed, 1e-9)
                    values["lr"] = self.optimizer.param_groups[0]["lr"]
                    self._log({"kind": "train", "iteration": self.iteration, **values})
                    shown = {k: v for k, v in values.items() if k == "loss" or k.startswith("loss_")}
                    if bar is not None:
                        bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})  # tqdm shows it/s itself
                    elif plain:
                        self._say(self._plain_line(values["it_per_s"], shown))
                    pending, tic = [], time.perf_counter()
                at_eval = self.iteration % tr.eval_every == 0 or self.iteration == tr.iterations
                at_ckpt = self.iteration % tr.checkpoint_every == 0 or self.iteration == tr.iterations
                if (at_eval or at_ckpt) and pending and self.guard is None:
                    self._check_unlogged(pending)  # never save a model from a step with a non-finite loss
                if at_eval:
                    self._periodic_eval()
                if at_ckpt:
                    self.save_checkpoint()
                if tr.keep_every > 0 and self.iteration % tr.keep_every == 0:  # numbered model checkpoints
                    self._save_model(f"iter_{self.iteration}.pt", None)
                if stop_after is not None and steps_done >= stop_after:
                    self._stop = True
            if self._stop and self.iteration < tr.iterations and self.last_checkpoint != self.iteration:
                self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            if self.writer is not None:
                self.writer.flush()
            lock.close()
            self._lock = None

    def _check_finite(self, values: dict[str, float], pending: list[dict[str, torch.Tensor]]) -> None:
        bad = int(values.pop("nonfinite_steps"))
        if self.guard is not None:
            values["skipped_steps"] = int(values["skipped_steps"])
            if values["skipped_steps"] < len(pending):
                return
        elif bad == 0:
            return
        self._log({"kind": "train", "iteration": self.iteration, **values})
        raise nonfinite_error(self.run_dir, first_nonfinite(pending, self.iteration), self.iteration,
                              self.last_checkpoint, all_skipped=self.guard is not None)

    def _check_unlogged(self, pending: list[dict[str, torch.Tensor]]) -> None:
        if any_nonfinite(pending):  # rare: only when a checkpoint is due mid-interval
            raise nonfinite_error(self.run_dir, first_nonfinite(pending, self.iteration), self.iteration,
                                  self.last_checkpoint, all_skipped=False)

    def _plain_line(self, it_per_s: float, losses: dict[str, float]) -> str:
        """One log-interval line without a progress bar: iteration/total, losses, it/s, ETA."""
        total = self.cfg.train.iterations
        width = len(str(total))
        eta = format_eta((total - self.iteration) / it_per_s if it_per_s > 0 else math.inf)
        loss_text = " ".join(f"{k} {v:.4g}" for k, v in losses.items())
        return f"iteration {self.iteration:>{width}}/{total} {loss_text} {it_per_s:.2f} it/s ETA {eta}"

    @property
    def finished(self) -> bool:
        return self.iteration >= self.cfg.train.iterations
