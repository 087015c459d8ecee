"""VerSemi: the shared-backbone path (one backbone pass, T task heads; spec versemi.md 2.3) against the
naive path of the released code (one full forward per task query), forward + backward, same run.

    python benchmarks/versemi_speed.py --size 96 --base-filters 16 --batch 4 --queries 5 --amp bf16 --out v.json
    python benchmarks/versemi_speed.py --size 32 --base-filters 4 --iters 3 --warmup 1        # CPU smoke run

Prints ms per step of each path and the speed-up, and writes JSON (device, torch version, settings).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

try:
    import medsemi  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from medsemi.device import autocast_for
from medsemi.nets.task_prompted import TaskPromptedVNet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--base-filters", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--queries", type=int, default=5, help="task queries per image (stage 2: 5)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (CPU only)")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _time(fn, iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - tic) / iters * 1000.0


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TaskPromptedVNet(base_filters=args.base_filters).to(device)
    image = torch.randn(args.batch, 1, args.size, args.size, args.size, device=device)
    queries = torch.arange(1, args.queries + 1, device=device) % 5 + 1

    def shared() -> None:
        model.zero_grad(set_to_none=True)
        with autocast_for(device, args.amp):
            out = model.forward_tasks(image, queries)
        out.float().square().mean().backward()

    def naive() -> None:
        model.zero_grad(set_to_none=True)
        with autocast_for(device, args.amp):
            outs = [model(image, queries[j].expand(args.batch)) for j in range(args.queries)]
        torch.stack(outs, 1).float().square().mean().backward()

    ms_shared = _time(shared, args.iters, args.warmup, device)
    ms_naive = _time(naive, args.iters, args.warmup, device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "settings": vars(args),
        "ms_shared": ms_shared,
        "ms_naive": ms_naive,
        "speedup": ms_naive / ms_shared,
    }
    print(f"{args.queries} task queries, batch {args.batch}, {args.size}^3, base {args.base_filters}, "
          f"amp {args.amp} on {result['device']}")
    print(f"  naive (one forward per query): {ms_naive:8.1f} ms/step")
    print(f"  shared backbone:               {ms_shared:8.1f} ms/step   speed-up {result['speedup']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
