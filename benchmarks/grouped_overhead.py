"""What ``forward_mode=grouped`` costs over ``fused``: both steps timed interleaved, in the same process.

The two differ only in the BatchNorms (per-call statistics, ``nets/grouped_norm.py``), so the ratio
grouped / fused is the price of exact per-call semantics. On a shared machine, timing one variant after
the other mixes that price with the machine's load, which drifts by more than the difference. Here one real
``Trainer`` per variant (as in ``train_speed.py``: fixed random batches already on the device, steps from
the middle of a long schedule) takes one step in turn, round after round, the order alternating each
round; the report gives each variant's median step time and the median of the per-round ratios.

    python benchmarks/grouped_overhead.py --size 32 --base-channels 2 --rounds 200   # the CPU check
    python benchmarks/grouped_overhead.py --size 256 --base-channels 64 --amp bf16 --out grouped.json

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_speed.py, beside this file

import torch  # noqa: E402
import train_speed as ts  # noqa: E402

from medsemi.device import resolve_amp, resolve_device  # noqa: E402
from medsemi.engine.trainer import Trainer  # noqa: E402
from medsemi.families.select import build_family  # noqa: E402
from medsemi.methods.base import Progress  # noqa: E402

VARIANTS = ("fused", "grouped/interleaved", "grouped/loop", "grouped/one_pass")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=32, help="image side in pixels (multiple of 16)")
    p.add_argument("--base-channels", type=int, default=2, help="U-Net width b")
    p.add_argument("--batch", type=int, default=4, help="labelled and unlabelled batch size B")
    p.add_argument("--rounds", type=int, default=200, help="timed rounds (one step of every variant each)")
    p.add_argument("--warmup", type=int, default=10, help="untimed rounds first")
    p.add_argument("--methods", default="ustrun,midss", help="comma list of midss, ustrun")
    p.add_argument("--kinds", default=",".join(ts.KINDS), help="comma list of label kinds")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--amp", choices=("auto", "off", "bf16"), default="auto")
    p.add_argument("--channels-last", default="auto", choices=("auto", "true", "false"))
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU devices; 0: torch's default)")
    p.add_argument("--clock", choices=("wall", "process"), default="process",
                   help="process (default on a CPU): this process's CPU time; wall: elapsed (used on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON to this path")
    return p.parse_args(argv)


def build(args: argparse.Namespace, method: str, kind: str, label: str, device: torch.device, amp: str,
          family: object, run_dir: str) -> Trainer:
    mode, _, norm = label.partition("/")
    settings = ts.parse_args(["--size", str(args.size), "--base-channels", str(args.base_channels),
                              "--batch", str(args.batch), "--channels-last", args.channels_last,
                              "--device", args.device, "--seed", str(args.seed)])
    cfg = ts.make_config(settings, kind, ts.Variant(method, mode, norm or None), amp)
    trainer = Trainer(cfg, run_dir, family=family or build_family(cfg))
    labelled, unlabelled = ts.random_batches(trainer, args.batch, args.size, device, args.seed)
    trainer.labelled, trainer.unlabelled = ts.FixedSource(labelled), ts.FixedSource(unlabelled)
    return trainer


def compare(args: argparse.Namespace, method: str, kind: str, labels: list[str], device: torch.device,
            amp: str, clock) -> dict:
    """Interleaved rounds for one (method, kind): medians per variant and median per-round ratios to fused."""
    with tempfile.TemporaryDirectory(prefix="medsemi_grouped_") as tmp:
        trainers, family = {}, None
        for i, label in enumerate(labels):
            trainers[label] = build(args, method, kind, label, device, amp, family, f"{tmp}/{i}")
            family = trainers[label].family
        start = ts.MAX_ITERATIONS // 2 + 1
        times: dict[str, list[float]] = {label: [] for label in labels}
        for r in range(args.warmup + args.rounds):
            order = labels if r % 2 == 0 else labels[::-1]
            for label in order:
                ts.sync(device)
                tic = clock()
                trainer = trainers[label]
                trainer.train_step(Progress(start + r, ts.MAX_ITERATIONS, trainer.cfg.train.eval_every))
                ts.sync(device)
                if r >= args.warmup:
                    times[label].append(clock() - tic)
    out = {"method": method, "kind": kind, "ms": {k: 1000 * statistics.median(v) for k, v in times.items()}}
    if "fused" in times:
        out["ratio_to_fused"] = {
            k: statistics.median(b / a for a, b in zip(times["fused"], v)) for k, v in times.items() if k != "fused"}
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    labels = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in labels if v not in VARIANTS]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if bad or not labels:
        raise SystemExit(f"benchmarks/grouped_overhead.py: --variants must be a comma list of {VARIANTS}")
    if not methods or any(m not in ts.MODE_METHODS for m in methods):
        raise SystemExit(f"benchmarks/grouped_overhead.py: --methods must be a comma list of {ts.MODE_METHODS}")
    if args.rounds < 1 or args.size < 16 or args.size % 16:
        raise SystemExit("benchmarks/grouped_overhead.py: --rounds >= 1 and --size a multiple of 16 are needed")
    device = resolve_device(args.device)
    channels_last = args.channels_last == "true" or (args.channels_last == "auto" and device.type == "cuda")
    if channels_last and "grouped/interleaved" in labels:  # it needs NCHW activations (nets/interleaved_norm.py)
        labels.remove("grouped/interleaved")
        print("grouped/interleaved skipped: it needs NCHW activations; run it with --channels-last false")
    if args.clock == "process" and device.type != "cpu":
        args.clock = "wall"  # CPU time does not count the GPU's work
    clock = time.process_time if args.clock == "process" else time.perf_counter
    previous_threads = torch.get_num_threads()
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, labels, methods, device, clock)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace, labels: list[str], methods: list[str], device: torch.device, clock) -> dict:
    amp = resolve_amp(args.amp, device)
    results = []
    for method in methods:
        for kind in (k.strip() for k in args.kinds.split(",") if k.strip()):
            res = compare(args, method, kind, labels, device, amp, clock)
            results.append(res)
            ratios = "  ".join(f"{k} {v:.3f}x" for k, v in res.get("ratio_to_fused", {}).items())
            print(f"{method:<7} {kind:<10} " + "  ".join(f"{k} {v:.2f} ms" for k, v in res["ms"].items())
                  + (f"  | per-round median ratio to fused: {ratios}" if ratios else ""), flush=True)
    report = {
        "device": ts.device_name(device), "device_type": device.type, "torch": torch.__version__,
        "python": platform.python_version(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": vars(args) | {"amp_resolved": amp, "torch_threads": torch.get_num_threads()},
        "results": results,
    }
    print(f"{report['device']} | torch {report['torch']} | size {args.size} b={args.base_channels} "
          f"B={args.batch} amp={amp} clock={args.clock} rounds={args.rounds}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
