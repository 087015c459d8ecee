"""``medsemi export``: a trained network as ONNX or TorchScript, with ``preprocessing.json`` and a README.

- ONNX: PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, opset 17). It
  needs the ``onnx`` package only; the newer ``torch.export``-based exporter would also need ``onnxscript``
  and handles the dynamic H/W of the 2D U-Net's pad-to-skip branch less simply.
- TorchScript: ``torch.jit.trace``.

Both are traces: shape-dependent Python branches are fixed at export time. The 2D U-Net therefore runs on
any batch size and on heights/widths that are multiples of 16 (its pad-to-skip branch is never taken
there); the 3D task-prompted VNet runs on any batch of windows of the training crop, with the task id
built in (``--task all``: one sub-folder per task). Every export is checked against the PyTorch model on
fixed inputs (onnxruntime / the loaded TorchScript file on the CPU); the largest difference is recorded
in ``preprocessing.json`` and an export that disagrees is refused.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medsemi.checkpoints import load_model_checkpoint
from medsemi.config import config_from_dict
from medsemi.workflows.export_readme import readme_text
from medsemi.workflows.export_spec import FORMAT_VERSION, INPUT_NAME, OUTPUT_NAME, spec_2d, spec_3d

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
OPSET = 17
CHECK_TOLERANCE = 1e-3  # largest |exported - PyTorch| accepted at export time (the tests ask 1e-4)


class ExportError(ValueError):
    """Bad input to ``medsemi export`` or a network the chosen format cannot hold."""


class SingleTask(nn.Module):
    """A task-prompted network with its task id built in: ``image (N, C, X, Y, Z) -> logits (N, 2, X, Y, Z)``."""

    def __init__(self, net: nn.Module, task: int) -> None:
        super().__init__()
        self.net = net
        self.task = int(task)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        ids = torch.full((image.shape[0],), self.task, dtype=torch.long, device=image.device)
        return self.net(image, ids)


# ----------------------------------------------------------------------------- the output folder
def prepare_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out}: folder is not empty; pass --overwrite to write the export into it "
                          "(files of the same names are replaced)")
    out.mkdir(parents=True, exist_ok=True)
    return out


# ----------------------------------------------------------------------------- the two formats
def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, dynamic: dict[int, str]) -> None:
    """``torch.onnx.export`` (TorchScript-based exporter); an unsupported operator is named in the error."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise ExportError("--format onnx needs the onnx package: pip install 'medsemi[export]' "
                          "(or export with --format torchscript)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (example,), str(path), dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: dynamic, OUTPUT_NAME: dynamic},
            )
    except torch.onnx.errors.UnsupportedOperatorError as err:
        found = re.search(r"operator '([^']+)'", str(err))
        op = found.group(1) if found else str(err).splitlines()[0]
        path.unlink(missing_ok=True)
        raise ExportError(f"ONNX (opset {OPSET}) cannot export the operator {op}; "
                          "export with --format torchscript instead") from err
    except Exception as err:  # noqa: BLE001 - the exporter raises many types; name the first line
        path.unlink(missing_ok=True)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ExportError(f"ONNX export failed ({first}); export with --format torchscript instead") from err


def export_torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (example,), check_trace=False)
    traced.save(str(path))


def run_exported(path: Path, x: torch.Tensor) -> torch.Tensor:
    """Outputs of an exported file on the CPU (onnxruntime or ``torch.jit.load``)."""
    if path.suffix == ".onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(sess.run(None, {INPUT_NAME: x.cpu().numpy()})[0])
    with torch.no_grad():
        return torch.jit.load(str(path), map_location="cpu")(x.cpu())


def check_export(module: nn.Module, path: Path, shapes: list[tuple[int, ...]]) -> dict[str, Any]:
    """Largest |exported - PyTorch| on fixed random inputs of ``shapes``; refuse a disagreeing export."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in shapes:
        x = torch.randn(*shape, generator=gen)
        with torch.no_grad():
            ref = module(x).float()
        try:
            out = run_exported(path, x)
        except ImportError:
            return {"checked": False, "note": "onnxruntime is not installed; install medsemi[export]"}
        worst = max(worst, float((out.float() - ref).abs().max()))
    if not worst <= CHECK_TOLERANCE:
        raise ExportError(f"{path}: the exported network differs from PyTorch by {worst:.3g} on a test input "
                          f"(shapes {shapes}); try the other --format")
    runtime = "onnxruntime CPU" if path.suffix == ".onnx" else "torch.jit CPU"
    return {"checked": True, "runtime": runtime, "input_shapes": [list(s) for s in shapes], "max_abs_diff": worst}


def write_export(module: nn.Module, folder: Path, fmt: str, spec: dict[str, Any], example_shape: tuple[int, ...],
                 check_shapes: list[tuple[int, ...]], dynamic: dict[int, str], source: str) -> Path:
    """One model file + ``preprocessing.json`` + ``README.md`` in ``folder``; returns the model file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FORMATS[fmt]
    example = torch.zeros(example_shape)
    if fmt == "onnx":
        export_onnx(module, example, path, dynamic)
    else:
        export_torchscript(module, example, path)
    spec = {
        "format_version": FORMAT_VERSION,
        "model": {"file": path.name, "format": fmt, "opset": OPSET if fmt == "onnx" else None,
                  "input": INPUT_NAME, "output": OUTPUT_NAME, "source": source,
                  "verification": check_export(module, path, check_shapes)},
        **spec,
    }
    (folder / "preprocessing.json").write_text(json.dumps(spec, indent=2) + "\n")
    (folder / "README.md").write_text(readme_text(fmt, spec, source))
    return path


# ----------------------------------------------------------------------------- the command
def _tasks(info: Any, task: str | int | None) -> list[tuple[int, str]]:
    from medsemi.workflows.predict3d import resolve_task

    names = {int(k): v for k, v in info.extra.get("tasks", {}).items()} or {
        i + 1: d for i, d in enumerate(info.domains)}
    if isinstance(task, str) and task.lower() == "all":
        return sorted(names.items())
    if isinstance(task, str):
        try:
            task = int(task)
        except ValueError:
            raise ExportError(f"--task must be a task id or 'all', got {task!r}") from None
    try:
        tid = resolve_task(info, task)
    except ValueError as err:
        raise ExportError(f"{err} or --task all") from None
    return [(tid, names[tid])]


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, fmt: str = "onnx",
                      task: str | int | None = None, overwrite: bool = False) -> list[Path]:
    """Export a model checkpoint to ``out_dir``; returns the written model file(s)."""
    from medsemi.nets.build import build_model
    from medsemi.workflows.predict import codec_for, info_from_checkpoint
    from medsemi.workflows.predict3d import sliding_options

    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    state = load_model_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"])
    info = info_from_checkpoint(state)
    ckpt = Path(checkpoint)
    source = f"{ckpt.name} (iteration {state.get('iteration', '?')}, selection score {state.get('score', '?')})"
    net = build_model(cfg.model, info)
    net.load_state_dict(state["model"])
    net.eval()
    if len(info.patch_size) == 2:
        if task is not None:
            raise ExportError(f"{ckpt}: --task is for task-prompted 3D models; this is a 2D model")
        tasks: list[tuple[int, str]] = []
    else:
        tasks = _tasks(info, task)  # before touching OUT_DIR: a bad --task leaves it as it was
    out = prepare_out_dir(out_dir, overwrite)
    targets = [out / f for f in FORMATS.values()]
    if ckpt.resolve() in {t.resolve() for t in targets}:
        raise ExportError(f"{ckpt}: the export would replace the checkpoint itself; choose another OUT_DIR")
    c = info.in_channels
    if not tasks:
        h, w = (int(s) for s in info.patch_size)
        spec = spec_2d(info, codec_for(info))
        return [write_export(net, out, fmt, spec, (1, c, h, w), [(1, c, h, w), (2, c, h + 16, w + 32)],
                             {0: "batch", 2: "height", 3: "width"}, source)]
    win = tuple(int(s) for s in info.patch_size)
    options = sliding_options(info, cfg)
    written = []
    for tid, name in tasks:
        folder = out / f"task{tid}-{name}" if len(tasks) > 1 else out
        spec = spec_3d(info, tid, name, options)
        written.append(write_export(SingleTask(net, tid).eval(), folder, fmt, spec, (1, c, *win), [(2, c, *win)],
                                    {0: "batch"}, source))
    return written
