"""The one entry point: ``medsemi train | evaluate | predict | export | runs | import-checkpoint | score | data |
methods | bench | demo``."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
from datetime import datetime
from pathlib import Path

EPILOG = "Every command has its own --help. Configs: YAML files under configs/; dotted overrides a.b=value."


def _run_dir(cfg, explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output_dir) / f"{cfg.name}-{cfg.method.name}-{stamp}"


def cmd_train(args: argparse.Namespace) -> int:
    from medsemi import distributed as ddp
    from medsemi.config import find_config, load_config
    from medsemi.engine.nonfinite import NonFiniteLossError
    from medsemi.engine.trainer import Trainer
    from medsemi.workflows.evaluate_run import evaluate_run

    if args.resume:
        run_dir = Path(args.resume)
        cfg = load_config(run_dir / "config.yaml", args.overrides)
    else:
        if not args.config:
            args.parser.error("give a CONFIG file (or --resume RUN_DIR)")
        notes: list[str] = []
        cfg = load_config(find_config(args.config), args.overrides, notes)
        for note in notes:
            print(f"note: {note}")
        run_dir = _run_dir(cfg, args.run_dir)
    trainer = Trainer(cfg, run_dir, resume=bool(args.resume))
    if ddp.is_main_process():
        print(f"run directory: {run_dir}")
        print(f"data: {trainer.family.info.name} {trainer.family.summary()}")
    try:
        trainer.fit()
    except NonFiniteLossError as err:
        print(f"medsemi train: error: {err}", file=sys.stderr)
        return 3
    if not trainer.finished:
        print(f"stopped at iteration {trainer.iteration}; continue with: medsemi train --resume {run_dir}")
        return 130
    if ddp.is_main_process() and not args.no_eval:
        evaluate_run(run_dir, cfg=cfg, family=trainer.family, device=str(trainer.device))
        print((run_dir / "report.md").read_text().split("\n## ")[0])
        print(f"report: {run_dir / 'report.md'}")
    ddp.cleanup()
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medsemi.config import load_config
    from medsemi.evaluation.report import CHECKPOINTS
    from medsemi.workflows.evaluate_run import default_out_dir, evaluate_run

    if Path(args.run_dir).is_file():  # one model checkpoint (iter_<k>.pt, an imported one, ...)
        from medsemi.workflows.evaluate_run import evaluate_model_file

        out_file = args.out or str(Path(args.run_dir).with_name(Path(args.run_dir).stem + "_eval"))
        evaluate_model_file(args.run_dir, args.overrides, device=args.device, out_dir=out_file)
        print((Path(out_file) / "report.md").read_text())
        return 0
    which = tuple(args.checkpoint) if args.checkpoint else tuple(CHECKPOINTS)
    cfg = load_config(Path(args.run_dir) / "config.yaml", args.overrides)
    out = args.out
    if not out:
        out, diffs = default_out_dir(args.run_dir, cfg, which)
        if diffs:
            print(f"this evaluation differs from training's ({', '.join(diffs)}): writing to {out}; "
                  f"the run's own report.md is unchanged (--out chooses another folder)", file=sys.stderr)
    evaluate_run(args.run_dir, which=which, device=args.device, cfg=cfg, out_dir=out)
    print((Path(out) / "report.md").read_text())
    return 0


def cmd_import_checkpoint(args: argparse.Namespace) -> int:
    from medsemi.config import load_config
    from medsemi.workflows.import_checkpoint import import_checkpoint

    cfg = load_config(args.config, args.overrides) if args.config else None
    out = import_checkpoint(args.kind, args.original, args.out, cfg)
    print(f"wrote {out}; use it with `medsemi predict {out} ...` or `medsemi evaluate {out} data.root=...`")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from medsemi.workflows.predict_export import is_export_dir

    if is_export_dir(args.checkpoint):
        from medsemi.workflows.predict_export import predict_from_export as predict
    else:
        from medsemi.workflows.predict import predict_folder as predict
    written = predict(args.checkpoint, args.input_dir, args.output_dir, device=args.device, task=args.task,
                      overwrite=args.overwrite)
    print(f"wrote {len(written)} mask(s) to {args.output_dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from medsemi.workflows.export import export_checkpoint

    written = export_checkpoint(args.checkpoint, args.out_dir, fmt=args.format, task=args.task,
                                overwrite=args.overwrite)
    for path in written:
        print(f"wrote {path} (+ preprocessing.json, README.md)")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from medsemi.workflows.runs import list_runs, runs_json, runs_table

    runs = list_runs(args.dir)
    print(runs_json(runs) if args.json else (runs_table(runs) if runs else f"no run directories under {args.dir}"))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from medsemi.data.codecs import CODECS, index_codec
    from medsemi.data.contract import LabelSpec
    from medsemi.evaluation.score_folder import score_folders

    if args.format == "index":
        names = ("background",) + tuple(f"class{i}" for i in range(1, args.num_classes))
        codec = index_codec(LabelSpec("exclusive", names))
    else:
        codec = CODECS[args.format]
    spacing = tuple(float(v) for v in args.spacing.split(",")) if args.spacing else None
    out = args.out or args.pred_dir
    score_folders(args.pred_dir, args.gt_dir, codec, out_dir=out, spacing=spacing)
    print(Path(out, "scores.md").read_text())
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from medsemi.data.synthetic.images2d import SyntheticConfig, synth_layout, write_layout

    domains = args.domains or (4 if args.kind == "multilabel" else 6)
    size = args.size
    if size is None:  # the reader's native size: the prostate reader does not resize (384), fundus 256
        size = 384 if synth_layout(SyntheticConfig(kind=args.kind, num_domains=domains)) == "prostate" else 256
    cfg = SyntheticConfig(kind=args.kind, num_domains=domains, size=size,
                          train_per_domain=args.train_per_domain, test_per_domain=args.test_per_domain,
                          seed=args.seed)
    try:
        layout = write_layout(cfg, args.out_dir, overwrite=args.overwrite)
    except FileExistsError as err:
        raise ValueError(str(err)) from None
    print(f"wrote the synthetic {args.kind} dataset ({domains} domains) in the {layout} layout to "
          f"{args.out_dir}; train on it with data.format={layout} data.root={args.out_dir}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    if args.format in ("versemi", "h5"):
        from medsemi.data.tools.check3d import check_volumes, summarise_volumes, summary_text

        problems = check_volumes(args.root)
        summary = summarise_volumes(args.root)
        if args.json:
            print(json.dumps({"root": str(args.root), "format": args.format, "ok": not problems, "tasks": summary,
                              "errors": problems, "warnings": []}, indent=1))
        else:
            print(summary_text(args.root, summary, problems))
        return 1 if problems else 0
    from medsemi.data.tools.check2d import check_dataset

    report = check_dataset(args.root, args.format)
    print(json.dumps(report.to_dict(), indent=1, default=str) if args.json else report.to_text())
    return 1 if report.errors else 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from medsemi.data.tools.convert2d import convert_to_generic

    convert_to_generic(args.format, args.root, args.out_dir, lb_domain=args.lb_domain, lb_num=args.lb_num,
                       overwrite=args.overwrite)
    print(f"converted {args.root} ({args.format}) to the generic format in {args.out_dir}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from medsemi.data.tools.prepare3d import prepare_dataset

    foreground = None
    if args.foreground:
        try:
            foreground = tuple(int(v) for v in args.foreground.split(","))
        except ValueError:
            raise ValueError(f"--foreground must be label values like 1,2, got {args.foreground!r}") from None
    report = prepare_dataset(args.kind, args.src_dir, args.out_dir, overwrite=args.overwrite, foreground=foreground)
    print(report.summary(args.out_dir))
    return 1 if report.problems else 0


def cmd_methods(args: argparse.Namespace) -> int:
    from medsemi.methods.describe import describe_methods

    print(describe_methods())
    return 0


def cmd_bench_compare(args: argparse.Namespace) -> int:
    from medsemi.workflows.compare import compare_methods

    compare_methods(args.config, args.methods.split(","), args.seeds, args.out, args.overrides, args.references)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from medsemi.workflows.compare import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from medsemi import __version__

    parser = argparse.ArgumentParser(prog="medsemi", description=__doc__, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"medsemi {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    overrides_help = "dotted overrides a.b=value, before or after the options (e.g. model.base_channels=16)"
    config_help = "YAML experiment config: a path, or one relative to the repository or its configs/ folder"
    device_help = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N"

    p = sub.add_parser("train", help="train a method from a YAML config",
                       description="Train a method. Example: medsemi train configs/demo.yaml train.iterations=200")
    p.add_argument("config", nargs="?", help=config_help)
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--run-dir", help="run directory (default: <output_dir>/<name>-<method>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run where it stopped")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation and report")
    p.set_defaults(func=cmd_train, parser=p)

    p = sub.add_parser("evaluate", help="evaluate a run's checkpoints per domain, write report.md + eval.json")
    p.add_argument("run_dir", help="a run directory, or one model checkpoint file (iter_<k>.pt, an imported "
                   "checkpoint; its stored config plus the overrides; report in <file>_eval/ unless --out)")
    p.add_argument("overrides", nargs="*", help="eval.* overrides, e.g. eval.bn_adaptation=true eval.hd95=max_directed")
    p.add_argument("--out", help="where to write report.md / eval.json (default: RUN_DIR when the options are "
                   "training's, else RUN_DIR/evaluations/<what differs>)")
    p.add_argument("--checkpoint", action="append",
                   choices=["best_test", "best_test_stage1", "best_val", "last_student", "last_teacher"],
                   help="which checkpoint(s) (default: all present)")
    p.add_argument("--device", default="auto", help=device_help)
    p.set_defaults(func=cmd_evaluate, parser=p)

    p = sub.add_parser("predict", help="segment new images with a checkpoint; masks in the dataset's encoding")
    p.add_argument("checkpoint", help="a .pt file from a run's checkpoints/ (best_test.pt, best_val.pt), "
                   "or a folder written by medsemi export")
    p.add_argument("input_dir", help="folder of images (PNG/JPG for 2D models, NIfTI for 3D models)")
    p.add_argument("output_dir", help="folder for the predicted masks")
    p.add_argument("--device", default="auto", help=device_help + " (ONNX exports run on the CPU)")
    p.add_argument("--task", type=int, default=None, help="task id for task-prompted 3D models")
    p.add_argument("--overwrite", action="store_true",
                   help="allow replacing existing masks in OUTPUT_DIR, or writing inside INPUT_DIR (never an input)")
    p.set_defaults(func=cmd_predict, parser=p)

    p = sub.add_parser("import-checkpoint", help="convert an original method's checkpoint into a medsemi model "
                       "checkpoint (for predict / evaluate)")
    p.add_argument("kind", choices=["versemi"], help="whose checkpoint: versemi (train.py's <epoch>.pth / best.pth)")
    p.add_argument("original", help="the original .pth (read with torch.load(weights_only=True))")
    p.add_argument("out", help="the medsemi checkpoint to write (must not exist)")
    p.add_argument("--config", help="experiment config the model belongs to (default: the paper's VerSemi setting)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of --config")
    p.set_defaults(func=cmd_import_checkpoint, parser=p)

    p = sub.add_parser("export", help="export a model checkpoint to ONNX or TorchScript (+ preprocessing.json)",
                       description="Write OUT_DIR/model.onnx or model.pt, preprocessing.json and a README with "
                       "a runnable example. Example: medsemi export runs/x/checkpoints/best_test.pt exported/")
    p.add_argument("checkpoint", help="a model checkpoint (best_test.pt, best_val.pt; not last.pt)")
    p.add_argument("out_dir", help="folder for the exported model, preprocessing.json and README.md")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"],
                   help="onnx (onnxruntime; needs the export extra) or torchscript (torch.jit.load)")
    p.add_argument("--task", help="3D task-prompted models: a task id, or 'all' for one sub-folder per task")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    p.set_defaults(func=cmd_export, parser=p)

    p = sub.add_parser("runs", help="list run directories: method, dataset, progress, scores, status")
    p.add_argument("dir", nargs="?", default="runs", help="folder to search (default: runs)")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=cmd_runs, parser=p)

    p = sub.add_parser("score", help="score a folder of predicted masks against ground truth (evaluate_folder)")
    p.add_argument("pred_dir", help="folder of predicted masks")
    p.add_argument("gt_dir", help="folder of ground-truth masks with the same file names")
    p.add_argument("--format", default="index", choices=["fundus", "prostate", "busi", "mnms", "index"],
                   help="mask encoding (index: pixel value = class index)")
    p.add_argument("--num-classes", type=int, default=2, help="classes incl. background for --format index")
    p.add_argument("--spacing", help="pixel spacing, e.g. 0.5,0.5 (default: pixels, or the NIfTI header)")
    p.add_argument("--out", help="where to write scores.json / scores.md (default: PRED_DIR)")
    p.set_defaults(func=cmd_score, parser=p)

    data = sub.add_parser("data", help="dataset tools: synth, check, convert, prepare")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("synth", help="write the embedded synthetic dataset in the Fundus (or ProstateSlice) layout",
                        description="Write the synthetic dataset: multilabel with 4 domains in the Fundus layout, "
                                    "exclusive with up to 6 in the ProstateSlice layout, any other number of "
                                    "domains in the generic format.")
    p.add_argument("out_dir", help="folder to write the dataset into")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    p.add_argument("--kind", default="multilabel", choices=["multilabel", "exclusive"],
                   help="multilabel: fundus-like cup inside disc; exclusive: one organ")
    p.add_argument("--domains", type=_positive_int, default=None,
                   help="number of domains (default: 4 for multilabel, the Fundus layout; 6 for exclusive, the "
                        "ProstateSlice sites); other numbers are written in the generic format")
    p.add_argument("--size", type=_positive_int, default=None,
                   help="image side (default: the reader's native size, 384 for ProstateSlice, else 256)")
    p.add_argument("--train-per-domain", type=_positive_int, default=40, help="training images per domain")
    p.add_argument("--test-per-domain", type=_positive_int, default=16, help="test images per domain")
    p.add_argument("--seed", type=int, default=0, help="random seed of the generator")
    p.set_defaults(func=cmd_data_synth, parser=p)
    p = dsub.add_parser("check", help="report counts, sizes, label values and every problem, per domain/split")
    p.add_argument("root", help="the dataset folder")
    p.add_argument("--format", required=True, choices=["fundus", "prostate", "mnms", "busi", "generic", "versemi"],
                   help="the dataset's layout (README, Datasets)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    p.set_defaults(func=cmd_data_check, parser=p)
    p = dsub.add_parser("convert", help="convert a dataset to the generic (nnU-Net-like) multi-domain format")
    p.add_argument("root", help="the dataset folder")
    p.add_argument("out_dir", help="an empty (or new) folder for the generic-format copy")
    p.add_argument("--format", required=True, choices=["fundus", "prostate", "mnms", "busi"],
                   help="the source dataset's layout")
    p.add_argument("--lb-domain", type=int, default=1, help="labelled domain (1-based) written into splits.json")
    p.add_argument("--lb-num", type=int, default=20, help="number of labelled images written into splits.json")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty OUT_DIR, replacing its imagesTr/labelsTr/imagesTs/labelsTs")
    p.set_defaults(func=cmd_data_convert, parser=p)
    p = dsub.add_parser("prepare", help="prepare a 3D dataset (NIfTI) into VerSemi's HDF5 layout")
    p.add_argument("kind", choices=["pancreas", "la", "spleen", "lung"], help="which dataset the NIfTI files are")
    p.add_argument("src_dir", help="folder of the downloaded NIfTI dataset")
    p.add_argument("out_dir", help="folder for the HDF5 cases")
    p.add_argument("--foreground", metavar="V[,V...]",
                   help="label values that are foreground (default: 1; la: any non-zero); e.g. 1,2 merges MSD "
                        "pancreas tumour (2) into the pancreas")
    p.add_argument("--overwrite", action="store_true", help="replace cases already prepared in OUT_DIR")
    p.set_defaults(func=cmd_data_prepare, parser=p)

    p = sub.add_parser("methods", help="list the registered methods and their options")
    p.set_defaults(func=cmd_methods, parser=p)

    bench = sub.add_parser("bench", help="benchmarks: compare methods over seeds")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    p = bsub.add_parser("compare", help="train several methods over several seeds; table (MD, CSV) + bar chart")
    p.add_argument("config", help=config_help)
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--methods", default="supervised,ustrun",
                   help="comma-separated method names or variants name:key=value (see `medsemi methods`)")
    p.add_argument("--seeds", type=_positive_int, default=3, help="seeds per method (config seed + 0..N-1)")
    p.add_argument("--out", default="runs/compare", help="folder for the runs and the comparison files")
    p.add_argument("--references", help="published numbers to print beside ours when the setting matches "
                   "(default: benchmarks/reference_results.yaml of the checkout)")
    p.set_defaults(func=cmd_bench_compare, parser=p)

    p = sub.add_parser("demo", help="supervised vs UST-RUN on the embedded synthetic data (CPU, a few minutes)")
    p.add_argument("--out", default=None, help="run folder (default: runs/demo, or runs/demo-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    p.set_defaults(func=cmd_demo, parser=p)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse with options and ``a.b=value`` overrides in any order (``train CFG --run-dir X a.b=1``); a
    parse error shows the sub-command's usage."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    sub = getattr(args, "parser", parser)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    rest = [a for a in extra if a not in overrides]
    if rest:
        sub.error(f"unrecognized arguments: {' '.join(rest)}")
    if overrides:
        if not hasattr(args, "overrides"):
            sub.error(f"this command takes no overrides: {' '.join(overrides)}")
        args.overrides = [*args.overrides, *overrides]
    if getattr(args, "config", None) and "=" in args.config and getattr(args, "resume", None):
        args.overrides, args.config = [args.config, *args.overrides], None  # train --resume DIR a.b=1
    return args


def describe_os_error(err: OSError) -> str:
    """One sentence for a failed file operation: what, which file, and what to do."""
    name = err.filename or "the output"
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"no space left on device while writing {name}; free some space (or choose another folder) and run again"
    if err.errno == errno.EROFS:
        return f"cannot write {name}: the file system is read-only; choose a writable output folder"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"cannot write {name}: permission denied; choose a writable output folder"
    if err.errno is None or err.strerror is None:
        return str(err)
    return f"{name}: {err.strerror.lower()}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from medsemi.config import ConfigError

    prog = args.parser.prog  # "medsemi data convert"
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # the reader went away (`medsemi ... | head`): as Python's docs on SIGPIPE advise, point stdout at
        # devnull so the interpreter's final flush does not fail again, and exit quietly
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{prog}: error: {describe_os_error(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
