"""Training-step speed of each 2D method against the network's own cost (the "model floor").

For every method (and, for MiDSS / UST-RUN, every ``method.forward_mode``) a real ``Trainer`` is built on
the synthetic dataset at the requested size, its batch sources are replaced by fixed random batches
already on the device, and ``Trainer.train_step`` (method step under autocast, backward, optimiser step,
EMA teacher update, LR schedule) is timed. The *floor* replays, with copies of the same networks in the
same run, exactly the network calls the step made (recorded by forward hooks during a warm-up step: who
was called, with which batch shape, with or without gradient), then one backward, the same optimiser
step and the EMA update. ``ratio = step time / floor time`` is what the method adds on top of the network.

On CUDA the timing is bracketed by ``torch.cuda.synchronize`` and one extra step per method runs under
``torch.cuda.set_sync_debug_mode("error")`` to report whether the step synchronises with the host.

    python benchmarks/train_speed.py --size 256 --base-channels 64 --batch 4 --iters 50 --warmup 10 \
        --amp bf16 --out bench.json
    python benchmarks/train_speed.py --size 64 --base-channels 8 --iters 3 --warmup 1   # CPU smoke run

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import medsemi  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
from torch import nn

from medsemi.config import config_from_dict
from medsemi.device import autocast_for, resolve_amp, resolve_device
from medsemi.engine.ema import ema_update
from medsemi.engine.trainer import Trainer, build_optimizer, unwrap
from medsemi.methods.base import Progress
from medsemi.methods.intermediate import GROUPED_NORMS

METHODS = ("supervised", "mean_teacher", "fixmatch", "unimatch", "bcp", "midss", "ustrun")
MODE_METHODS = ("midss", "ustrun")  # methods with method.forward_mode
KINDS = ("multilabel", "exclusive")  # fundus-like 3-channel cup/disc, and a 1-channel exclusive organ
MAX_ITERATIONS = 100_000  # the schedule the steps pretend to be in; steps run from its middle


@dataclass
class Variant:
    method: str
    forward_mode: str | None = None
    grouped_norm: str | None = None  # method.grouped_norm of a grouped variant (None: the method's default)

    @property
    def label(self) -> str:
        if self.forward_mode is None:
            return self.method
        norm = f"/{self.grouped_norm}" if self.grouped_norm and self.forward_mode == "grouped" else ""
        return f"{self.method}[{self.forward_mode}{norm}]"


@dataclass
class Call:
    """One network call of a step: ``role`` (student / teacher / student_fp), input shape, with grad."""

    role: str
    shape: tuple[int, ...]
    grad: bool


@dataclass
class Result:
    method: str
    variant: str
    kind: str
    forward_mode: str | None
    ms_per_iter: float | None = None
    it_per_s: float | None = None
    floor_ms_per_iter: float | None = None
    floor_it_per_s: float | None = None
    ratio_to_floor: float | None = None
    calls: list[dict] = field(default_factory=list)
    sync_free: bool | None = None  # None: not checked (not CUDA)
    sync_error: str | None = None
    peak_memory_mb: float | None = None
    data_ms_per_iter: float | None = None  # --data pool: drawing + augmenting the step's batches alone
    data_fraction: float | None = None  # data_ms_per_iter / ms_per_iter
    error: str | None = None


# ---------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--base-channels", type=int, default=64, help="U-Net width b")
    p.add_argument("--batch", type=int, default=4, help="labelled and unlabelled batch size B")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per method")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations before timing")
    p.add_argument("--amp", choices=("auto", "off", "bf16"), default="auto",
                   help="autocast; auto = bf16 on CUDA, off on CPU (as train.amp=auto)")
    p.add_argument("--channels-last", nargs="?", const="true", default="auto", choices=("auto", "true", "false"),
                   help="model.channels_last (default auto: on for CUDA, off on a CPU); the bare flag means true")
    p.add_argument("--compile", action="store_true", help="torch.compile the student (and the floor)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma list; midss/ustrun run every forward mode, or name one as ustrun:grouped")
    p.add_argument("--forward-modes", default=None,
                   help="comma list of forward modes for midss/ustrun (default: all)")
    p.add_argument("--grouped-norm", choices=GROUPED_NORMS, default=None,
                   help="method.grouped_norm of the grouped forward mode (default: the method's, auto)")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma list of label kinds: multilabel,exclusive")
    p.add_argument("--data", choices=("random", "pool"), default="random",
                   help="random: fixed random batches on the device (default); pool: the trainer's own "
                        "sampling and GPU augmentation, included in the time")
    p.add_argument("--no-floor", action="store_true", help="skip the model floor")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=-1,
                   help="torch CPU threads; -1 (default): 1 on a CPU device (oversubscribed threads make a "
                        "shared CPU many times slower), torch's default on CUDA; 0: torch's default")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="wall: elapsed time (default); process: this process's CPU time, steadier on a shared "
                        "CPU (CPU devices only: it does not count GPU time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON to this path")
    return p.parse_args(argv)


def variants(args: argparse.Namespace) -> list[Variant]:
    from medsemi.methods.intermediate import FORWARD_MODES
    from medsemi.methods.registry import available_methods

    known = available_methods()
    modes = FORWARD_MODES if args.forward_modes is None else tuple(
        m.strip() for m in args.forward_modes.split(",") if m.strip())
    bad_modes = [m for m in modes if m not in FORWARD_MODES]
    if bad_modes:
        raise SystemExit(f"benchmarks/train_speed.py: unknown forward mode(s) {bad_modes}; "
                         f"valid: {FORWARD_MODES}")
    out = []
    for item in (s.strip() for s in args.methods.split(",") if s.strip()):
        name, _, mode = item.partition(":")
        if name not in known:
            raise SystemExit(f"benchmarks/train_speed.py: unknown method {name!r}; "
                             f"available: {', '.join(known)}")
        if mode and (name not in MODE_METHODS or mode not in FORWARD_MODES):
            raise SystemExit(f"benchmarks/train_speed.py: {item!r}: forward modes exist only for "
                             f"{MODE_METHODS}, one of {FORWARD_MODES}")
        if mode:
            out.append(Variant(name, mode, args.grouped_norm))
        elif name in MODE_METHODS:
            out.extend(Variant(name, m, args.grouped_norm) for m in modes)
        else:
            out.append(Variant(name))
    return out


# ---------------------------------------------------------------------------------------- set-up
def make_config(args: argparse.Namespace, kind: str, variant: Variant, amp: str) -> Any:
    """A Trainer config on small synthetic splits at the requested size (data are replaced anyway)."""
    b = args.batch
    method: dict[str, Any] = {"name": variant.method}
    if variant.forward_mode is not None:
        method["forward_mode"] = variant.forward_mode
    if variant.grouped_norm is not None and variant.forward_mode == "grouped":
        method["grouped_norm"] = variant.grouped_norm
    return config_from_dict({
        "name": f"bench_{variant.label}_{kind}",
        "seed": args.seed,
        "data": {"format": "synthetic", "patch_size": args.size, "lb_domain": 1, "lb_num": b,
                 "synthetic": {"kind": kind, "num_domains": 2, "train_per_domain": 2 * b,
                               "test_per_domain": 1, "seed": 0}},
        "model": {"name": "unet2d", "base_channels": args.base_channels, "channels_last": args.channels_last},
        "train": {"iterations": MAX_ITERATIONS, "batch_size": b, "unlabelled_batch_size": b,
                  "amp": amp, "compile": False, "device": args.device, "progress_bar": False,
                  "tensorboard": False},
        "method": method,
    })


class FixedSource:
    """A batch source that returns the same device batch every time (no sampling cost)."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def next(self) -> dict[str, torch.Tensor]:
        return self.batch


def random_batches(trainer: Trainer, batch: int, size: int, device: torch.device, seed: int
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Random labelled / unlabelled batches with the dataset's shapes and dtypes (spec: data/contract.py)."""
    info = trainer.family.info
    spec = info.label_spec
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, info.in_channels, size, size)

    def image() -> torch.Tensor:
        return torch.rand(shape, generator=g, device=device) * 2 - 1

    if spec.multilabel:
        label = (torch.rand((batch, spec.num_outputs, size, size), generator=g, device=device) > 0.5).float()
    else:
        label = torch.randint(spec.num_outputs, (batch, size, size), generator=g, device=device)
    domain = torch.zeros(batch, dtype=torch.long, device=device)
    index = torch.arange(batch, device=device)
    labelled = {"image": image(), "label": label, "domain": domain, "index": index}
    u = image()
    unlabelled = {"image": u, "strong": (u * 0.8 + 0.1 * image()).clamp(-1, 1), "domain": domain + 1,
                  "index": index}
    return labelled, unlabelled


@contextlib.contextmanager
def record_calls(method: nn.Module) -> Any:
    """Record the network calls of one step: top-level student / teacher calls, plus UniMatch-style
    partial passes that enter the student's ``inc`` block directly (feature perturbation)."""
    calls: list[Call] = []
    depth = [0]
    handles = []

    def top(role: str) -> tuple[Callable, Callable]:
        def pre(module: nn.Module, inputs: tuple) -> None:
            if depth[0] == 0:
                calls.append(Call(role, tuple(inputs[0].shape), torch.is_grad_enabled()))
            depth[0] += 1

        def post(module: nn.Module, inputs: tuple, output: Any) -> None:
            depth[0] -= 1

        return pre, post

    for role, net in (("student", method.student), ("teacher", method.teacher)):
        if net is None:
            continue
        pre, post = top(role)
        handles += [net.register_forward_pre_hook(pre), net.register_forward_hook(post)]
    inc = getattr(unwrap(method.student), "inc", None)
    if inc is not None:
        def fp_pre(module: nn.Module, inputs: tuple) -> None:
            if depth[0] == 0:
                calls.append(Call("student_fp", tuple(inputs[0].shape), torch.is_grad_enabled()))

        handles.append(inc.register_forward_pre_hook(fp_pre))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def floor_step_fn(trainer: Trainer, calls: list[Call], device: torch.device, amp: str, compile_: bool,
                  seed: int) -> Callable[[], None]:
    """The network alone: the recorded calls on random inputs, one backward of their summed means,
    the Trainer's optimiser step and, with a teacher, the EMA update."""
    from medsemi.methods.unimatch import unet_forward_fp

    student = copy.deepcopy(unwrap(trainer.student))
    teacher = copy.deepcopy(trainer.method.teacher) if trainer.method.teacher is not None else None
    for net in (student, teacher):
        if net is not None:  # a plain layout: grouped norms (if any) act as BatchNorm2d
            for m in net.modules():
                if hasattr(m, "group_sizes"):
                    m.group_sizes = None
    run_student = torch.compile(student) if compile_ else student
    nets = {"student": run_student, "teacher": teacher, "student_fp": student}
    optimizer = build_optimizer(trainer.cfg, [p for p in student.parameters() if p.requires_grad])
    g = torch.Generator(device=device).manual_seed(seed)
    inputs = [torch.rand(c.shape, generator=g, device=device) * 2 - 1 for c in calls]
    fp_gen = torch.Generator(device=device).manual_seed(seed + 1)

    def step() -> None:
        losses = []
        with autocast_for(device, amp):
            for call, x in zip(calls, inputs):
                with torch.set_grad_enabled(call.grad):
                    if call.role == "student_fp":
                        clean, pert = unet_forward_fp(nets[call.role], x, 0.5, fp_gen)
                        out = clean.float().mean() + pert.float().mean()
                    else:
                        out = nets[call.role](x).float().mean()
                if call.grad:
                    losses.append(out)
        optimizer.zero_grad(set_to_none=True)
        if losses:
            torch.stack(losses).sum().backward()
        optimizer.step()
        if teacher is not None:
            ema_update(teacher, student, 0.99)

    return step


CLOCK: Callable[[], float] = time.perf_counter


def time_loop(fn: Callable[[int], Any], iters: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``fn(i)`` after ``warmup`` untimed calls."""
    for i in range(warmup):
        fn(i)
    sync(device)
    tic = CLOCK()
    for i in range(iters):
        fn(warmup + i)
    sync(device)
    return (CLOCK() - tic) / max(iters, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_sync_free(step: Callable[[], Any], device: torch.device) -> tuple[bool | None, str | None]:
    """Run one step with CUDA sync debug mode "error": (True, None) or (False, first line of the error)."""
    if device.type != "cuda":
        return None, None
    sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return True, None
    except RuntimeError as err:
        return False, str(err).strip().splitlines()[0][:300]
    finally:
        torch.cuda.set_sync_debug_mode(0)
        sync(device)


# ---------------------------------------------------------------------------------------- one variant
def bench_variant(args: argparse.Namespace, kind: str, variant: Variant, device: torch.device, amp: str,
                  splits_cache: dict) -> Result:
    res = Result(variant.method, variant.label, kind, variant.forward_mode)
    cfg = make_config(args, kind, variant, amp)
    if kind not in splits_cache:
        from medsemi.families.select import build_family

        splits_cache[kind] = build_family(cfg)
    with tempfile.TemporaryDirectory(prefix="medsemi_bench_") as run_dir:
        trainer = Trainer(cfg, run_dir, family=splits_cache[kind])
        if args.data == "random":
            labelled, unlabelled = random_batches(trainer, args.batch, args.size, device, args.seed)
            trainer.labelled = FixedSource(labelled)
            if trainer.unlabelled is not None:
                trainer.unlabelled = FixedSource(unlabelled)
        start = MAX_ITERATIONS // 2 + 1  # mid-schedule (past any warm-up phase; not an epoch boundary)

        def method_step(i: int) -> None:
            trainer.train_step(Progress(start + i, MAX_ITERATIONS, cfg.train.eval_every))

        with record_calls(trainer.method) as calls:  # eager first step (converts grouped norms too)
            method_step(0)
        res.calls = [c.__dict__ | {"shape": list(c.shape)} for c in calls]
        if args.compile and trainer.method.compile_blocker():  # as Trainer refuses train.compile=true
            raise RuntimeError(f"train.compile does not work here: {trainer.method.compile_blocker()}")
        if args.compile:  # as Trainer does with train.compile=true, after the eager step
            trainer.method.student = torch.compile(trainer.student)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sec = time_loop(method_step, args.iters, args.warmup, device)
        res.ms_per_iter, res.it_per_s = 1000 * sec, 1.0 / sec
        if device.type == "cuda":
            res.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
        res.sync_free, res.sync_error = check_sync_free(lambda: method_step(args.warmup + args.iters), device)
        if args.data == "pool":  # what sampling + on-device augmentation cost inside that step time
            def draw(i: int) -> None:
                trainer.labelled.next()
                if trainer.unlabelled is not None:
                    trainer.unlabelled.next()

            dsec = time_loop(draw, args.iters, args.warmup, device)
            res.data_ms_per_iter, res.data_fraction = 1000 * dsec, dsec / sec
        if not args.no_floor:
            floor = floor_step_fn(trainer, calls, device, amp, args.compile, args.seed + 7)
            fsec = time_loop(lambda i: floor(), args.iters, args.warmup, device)
            res.floor_ms_per_iter, res.floor_it_per_s = 1000 * fsec, 1.0 / fsec
            res.ratio_to_floor = sec / fsec
    return res


# ---------------------------------------------------------------------------------------- report
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(results: list[dict]) -> str:
    head = (f"{'kind':<10} {'method':<20} {'ms/iter':>9} {'it/s':>8} {'floor ms':>9} {'ratio':>6} {'sync':>5} "
            f"{'data ms':>8} {'data %':>6}")
    lines = [head, "-" * len(head)]

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in results:
        if r["error"]:
            lines.append(f"{r['kind']:<10} {r['variant']:<20} ERROR {r['error']}")
            continue
        sync_txt = {None: "-", True: "ok", False: "SYNC"}[r["sync_free"]]
        lines.append(f"{r['kind']:<10} {r['variant']:<20} {num(r['ms_per_iter'], '9.2f')} "
                     f"{num(r['it_per_s'], '8.2f')} {num(r['floor_ms_per_iter'], '9.2f')} "
                     f"{num(r['ratio_to_floor'], '6.2f')} {sync_txt:>5} {num(r['data_ms_per_iter'], '8.2f')} "
                     f"{num(None if r['data_fraction'] is None else 100 * r['data_fraction'], '6.1f')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    for key in ("size", "base_channels", "batch", "iters"):
        if getattr(args, key) < 1:
            raise SystemExit(f"benchmarks/train_speed.py: --{key.replace('_', '-')} must be >= 1")
    if args.size < 16 or args.size % 16:
        raise SystemExit("benchmarks/train_speed.py: --size must be a multiple of 16 (four 2x2 poolings)")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        raise SystemExit(f"benchmarks/train_speed.py: --kinds must be a comma list of {KINDS}")
    device = resolve_device(args.device)
    if args.clock == "process" and device.type != "cpu":
        raise SystemExit("benchmarks/train_speed.py: --clock process measures CPU time; use it with a CPU device")
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    threads = (1 if device.type == "cpu" else 0) if args.threads < 0 else args.threads
    previous_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace, device: torch.device) -> dict:
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    amp = resolve_amp(args.amp, device)
    todo = variants(args)
    splits_cache: dict = {}
    results = []
    for kind in kinds:
        for variant in todo:
            try:
                res = bench_variant(args, kind, variant, device, amp, splits_cache)
            except Exception as err:  # report and go on with the other methods
                res = Result(variant.method, variant.label, kind, variant.forward_mode,
                             error=f"{type(err).__name__}: {err}"[:500])
            results.append(res.__dict__)
            r = results[-1]
            print(f"[{kind}] {variant.label}: "
                  + (r["error"] if r["error"] else f"{r['ms_per_iter']:.2f} ms/iter"), flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": vars(args) | {"amp_resolved": amp, "kinds": kinds, "device_resolved": str(device),
                                  "torch_threads": torch.get_num_threads()},
        "results": results,
    }
    print(f"\n{report['device']} | torch {report['torch']} | size {args.size} b={args.base_channels} "
          f"B={args.batch} amp={amp} channels_last={args.channels_last} compile={args.compile} "
          f"data={args.data}")
    print(format_table(results))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
