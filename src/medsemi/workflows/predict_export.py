"""``medsemi predict EXPORT_DIR``: segment with an exported model, following its ``preprocessing.json``.

The steps are those of ``medsemi predict CHECKPOINT`` (same image reading, same sliding window, same mask
encoding); only the network is the exported file, run by onnxruntime (CPU) or ``torch.jit.load``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsemi.data.contract import LabelSpec
from medsemi.workflows.export_spec import INPUT_NAME, codec_from_spec

Net = Callable[[torch.Tensor], torch.Tensor]


def is_export_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (
        (path / "preprocessing.json").is_file() or any(path.glob("task*/preprocessing.json")))


def open_export(folder: str | Path, task: int | None = None) -> tuple[Path, dict[str, Any]]:
    """The export folder to use (a ``--task all`` export holds one sub-folder per task) and its spec."""
    folder = Path(folder)
    if not (folder / "preprocessing.json").is_file():
        specs = sorted(folder.glob("task*/preprocessing.json"))
        subs = {json.loads(p.read_text())["task"]["id"]: p.parent for p in specs}
        names = ", ".join(f"{k} = {p.name}" for k, p in sorted(subs.items()))
        if not subs:
            raise FileNotFoundError(f"{folder}: no preprocessing.json (not a medsemi export folder)")
        if task is None or int(task) not in subs:
            raise ValueError(f"{folder}: holds one model per task; pass --task ({names})")
        folder = subs[int(task)]
    spec_path = folder / "preprocessing.json"
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{spec_path}: cannot read ({err})") from err
    if spec.get("dims") == 3 and task is not None and int(task) != spec["task"]["id"]:
        raise ValueError(f"{folder}: exported for task {spec['task']['id']} ({spec['task']['name']}), "
                         f"not --task {task}")
    return folder, spec


def load_exported(folder: Path, spec: dict[str, Any], device: str = "auto") -> tuple[Net, torch.device]:
    """A callable ``input -> logits`` (float32 torch tensors) for the export's model file."""
    path = folder / spec["model"]["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file named in preprocessing.json is missing")
    if spec["model"]["format"] == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run_onnx(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(sess.run(None, {INPUT_NAME: x.detach().cpu().numpy()})[0])

        return run_onnx, torch.device("cpu")
    from medsemi.device import resolve_device

    dev = resolve_device(device)
    module = torch.jit.load(str(path), map_location=dev)
    return (lambda x: module(x.to(dev)).float()), dev


def predict_from_export(folder: str | Path, input_dir: str | Path, output_dir: str | Path,
                        device: str = "auto", task: int | None = None, overwrite: bool = False) -> list[Path]:
    """Masks for every image/volume of ``input_dir``, as ``medsemi predict`` writes them from a checkpoint
    (``overwrite``: replace existing masks; an input is never replaced)."""
    folder, spec = open_export(folder, task)
    net, dev = load_exported(folder, spec, device)
    labels = LabelSpec(spec["labels"]["kind"], tuple(spec["labels"]["class_names"]))
    if spec["dims"] == 2:
        from medsemi.workflows.predict import segment_images

        codec = codec_from_spec(spec["mask_encoding"], labels)
        inp = spec["input"]
        return segment_images(net, dev, labels, codec, inp["channels"], inp["size"][-1], input_dir, output_dir,
                              normalization=inp["intensity"].get("normalization"),
                              resample=inp["resize"]["filter"], overwrite=overwrite)
    from medsemi.evaluation.sliding3d import sliding_window_predict
    from medsemi.workflows.predict3d import segment_volumes

    sw = spec["sliding_window"]

    def predict_mask(image: np.ndarray) -> np.ndarray:
        return sliding_window_predict(image, net, window=tuple(sw["window"]), strides=tuple(sw["strides"]),
                                      lcc=bool(sw["largest_connected_component"]),
                                      sw_batch_size=int(sw["sw_batch_size"]), device=dev)

    return segment_volumes(predict_mask, spec["input"]["recipe"], input_dir, output_dir, overwrite)
