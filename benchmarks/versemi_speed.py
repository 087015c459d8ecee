"""VerSemi speed: the full training step of each stage, and the shared-backbone path against the naive one.

* **stage 1 / stage 2 steps**: ``VerSemi.train_step`` (stage 1: supervised + synthetic CutMix with the
  ``[5, t_a, t_b]`` task queries; stage 2: plus the unlabelled composite queried with ``[5, 1, 2, 3, 4]``),
  backward and an Adam step, on random batches of ``--batch`` labelled (+ ``--batch`` unlabelled in
  stage 2) crops already on the device: what ``medsemi train`` runs per iteration minus the crop gather.
* **backbone**: the shared-backbone path (one backbone pass, T task heads; spec versemi.md 2.3) against
  the naive path of the released code (one full forward per task query), forward + backward.

Switches: ``--amp bf16`` (autocast), ``--channels-last`` (channels-last-3d memory format, as
``model.channels_last=true`` for a 3D network), ``--compile`` (``torch.compile`` of the network).

    python benchmarks/versemi_speed.py --size 96 --base-filters 16 --batch 8 --amp bf16 --out v.json
    python benchmarks/versemi_speed.py --size 32 --base-filters 4 --batch 2 --iters 3 --warmup 1   # CPU smoke run

Prints ms per step and writes JSON (device, torch version, settings, date).
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

from medsemi.data.contract import DatasetInfo, LabelSpec
from medsemi.device import autocast_for
from medsemi.methods.base import Progress
from medsemi.methods.versemi import VerSemi, VerSemiOptions
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
    p.add_argument("--channels-last", action="store_true", help="channels-last-3d memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the network for the stage steps")
    p.add_argument("--no-stages", action="store_true", help="skip the stage-1 / stage-2 step timing")
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


def stage_step_ms(args: argparse.Namespace, stage: str, device: torch.device) -> float:
    """ms per full VerSemi training step of ``stage`` (stage1 | stage2): step, backward, Adam."""
    if args.batch % 2:
        raise SystemExit("benchmarks/versemi_speed.py: VerSemi needs an even --batch (halves a/b)")
    torch.manual_seed(0)
    s = args.size
    info = DatasetInfo("bench", 1, LabelSpec("exclusive", ("background", "foreground")),
                       ("pancreas", "la", "spleen", "lung"), (s, s, s))
    net = TaskPromptedVNet(base_filters=args.base_filters).to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    pipeline = "stage1_only" if stage == "stage1" else "stage2_only"
    method = VerSemi(VerSemiOptions(pipeline=pipeline), net, None, info).to(device)
    method.generator = torch.Generator(device=device).manual_seed(1)
    if args.compile:
        method.student = torch.compile(net)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator(device=device).manual_seed(2)
    shape = (args.batch, 1, s, s, s)
    memory = torch.channels_last_3d if args.channels_last else torch.contiguous_format
    labelled = {"image": torch.randn(shape, generator=g, device=device).contiguous(memory_format=memory),
                "label": (torch.rand((args.batch, s, s, s), generator=g, device=device) > 0.7).long(),
                "task": torch.arange(args.batch, device=device) % 4 + 1}
    unlabelled = {"image": torch.randn(shape, generator=g, device=device).contiguous(memory_format=memory)}

    def step() -> None:
        with autocast_for(device, args.amp):
            out = method.train_step(labelled, unlabelled if stage == "stage2" else None, Progress(10, 100))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    return _time(step, args.iters, args.warmup, device)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    stages = {} if args.no_stages else {st: stage_step_ms(args, st, device) for st in ("stage1", "stage2")}
    torch.manual_seed(0)
    model = TaskPromptedVNet(base_filters=args.base_filters).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    image = torch.randn(args.batch, 1, args.size, args.size, args.size, device=device)
    if args.channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
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
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": vars(args),
        "ms_stage1": stages.get("stage1"),
        "ms_stage2": stages.get("stage2"),
        "it_per_s_stage1": 1000.0 / stages["stage1"] if stages else None,
        "it_per_s_stage2": 1000.0 / stages["stage2"] if stages else None,
        "ms_shared": ms_shared,
        "ms_naive": ms_naive,
        "speedup": ms_naive / ms_shared,
    }
    print(f"{args.queries} task queries, batch {args.batch}, {args.size}^3, base {args.base_filters}, "
          f"amp {args.amp}, channels_last_3d {args.channels_last}, compile {args.compile} on {result['device']}")
    for st, ms in stages.items():
        print(f"  {st} full step:                {ms:8.1f} ms/step   {1000.0 / ms:6.2f} it/s")
    print(f"  naive (one forward per query): {ms_naive:8.1f} ms/step")
    print(f"  shared backbone:               {ms_shared:8.1f} ms/step   speed-up {result['speedup']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
