"""``medsemi export`` (ONNX, TorchScript), prediction from an export folder and the export README example.

References: the PyTorch model itself on fixed inputs (within 1e-4), ``medsemi predict`` from the
checkpoint (same masks), and the dataset codecs (the mask look-up table)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsemi.checkpoints import CheckpointError
from medsemi.cli import main
from medsemi.config import config_to_dict, load_config
from medsemi.data.codecs import CODECS, index_codec
from medsemi.data.contract import LabelSpec
from medsemi.nets.task_prompted import TaskPromptedVNet
from medsemi.nets.unet2d import UNet2D
from medsemi.workflows.export import ExportError, export_checkpoint, export_onnx
from medsemi.workflows.export_readme import example_code
from medsemi.workflows.export_spec import mask_lut

ort = pytest.importorskip("onnxruntime")
nib = pytest.importorskip("nibabel")

REPO = Path(__file__).resolve().parents[1]
FORMATS = ["onnx", "torchscript"]
TASKS = {"1": "pancreas", "2": "la", "3": "spleen", "4": "lung"}


def _randomise_bn(net: torch.nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics, so that eval-mode normalisation is part of what is compared."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def make_2d_checkpoint(path: Path, kind: str = "multilabel") -> UNet2D:
    cfg = load_config(REPO / "configs" / "demo.yaml", ["model.base_channels=4", "data.patch_size=32"])
    names = ["cup", "disc"] if kind == "multilabel" else ["background", "prostate"]
    info = {"name": "synthetic", "in_channels": 3, "label_kind": kind, "class_names": names,
            "domains": ["Domain1", "Domain2"], "patch_size": [32, 32], "extra": {}}
    torch.manual_seed(0)
    net = UNet2D(3, 2, base_channels=4)
    _randomise_bn(net, 1)
    net.eval()
    with torch.no_grad():  # centre the head so that the masks hold every class (a non-trivial comparison)
        logits = net(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1)
        if kind == "multilabel":
            net.outc.bias -= logits.transpose(0, 1).flatten(1).median(dim=1).values
        else:
            net.outc.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict(), "iteration": 4, "score": 0.5, "config": config_to_dict(cfg),
                "info": info}, path)
    return net


def make_3d_checkpoint(path: Path, lcc: bool = False) -> TaskPromptedVNet:
    from medsemi.families.volumes import _preprocessing_extra

    cfg = load_config(REPO / "configs" / "versemi" / "synthetic3d_cpu.yaml",
                      ["data.options.strides=[16,16,16]", f"data.options.lcc={str(lcc).lower()}"])
    info = {"name": "versemi", "in_channels": 1, "label_kind": "exclusive",
            "class_names": ["background", "foreground"], "domains": list(TASKS.values()),
            "patch_size": [32, 32, 32],
            "extra": {"tasks": TASKS, "synthetic_task": 5, "strides": [16, 16, 16], "lcc": lcc,
                      "preprocessing": _preprocessing_extra("versemi")}}
    torch.manual_seed(0)
    net = TaskPromptedVNet(1, base_filters=4)
    _randomise_bn(net, 2)
    net.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict(), "iteration": 6, "score": 0.4, "config": config_to_dict(cfg),
                "info": info}, path)
    return net


def run_file(path: Path, x: torch.Tensor) -> np.ndarray:
    if path.suffix == ".onnx":
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    return torch.jit.load(str(path))(x).detach().numpy()


def write_images(folder: Path, sizes=((40, 52), (32, 32), (37, 29))) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        arr[h // 4: 3 * h // 4, w // 4: 3 * w // 4] //= 3  # some structure
        Image.fromarray(arr).save(folder / f"img{i}.png")
    return folder


def write_volume(path: Path, shape=(40, 36, 33)) -> np.ndarray:
    rng = np.random.default_rng(1)
    vol = rng.normal(100.0, 30.0, size=shape).astype(np.float32)
    vol[10:30, 8:28, 5:25] += 80.0
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol, affine), str(path))
    return vol


# ----------------------------------------------------------------------------- exported == PyTorch
@pytest.mark.parametrize("fmt", FORMATS)
def test_2d_export_matches_pytorch_with_dynamic_batch_and_size(tmp_path, fmt):
    net = make_2d_checkpoint(tmp_path / "ckpt" / "best_test.pt")
    [path] = export_checkpoint(tmp_path / "ckpt" / "best_test.pt", tmp_path / "out", fmt=fmt)
    assert path.name == ("model.onnx" if fmt == "onnx" else "model.pt")
    g = torch.Generator().manual_seed(3)
    for shape in [(1, 3, 32, 32), (3, 3, 48, 64), (2, 3, 64, 32)]:
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            ref = net(x).numpy()
        out = run_file(path, x)
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() < 1e-4
    spec = json.loads((tmp_path / "out" / "preprocessing.json").read_text())
    assert spec["model"]["verification"]["checked"] and spec["model"]["verification"]["max_abs_diff"] < 1e-4
    assert spec["input"]["channels"] == 3 and spec["input"]["size"] == [32, 32]
    assert spec["labels"]["kind"] == "multilabel" and spec["labels"]["class_names"] == ["cup", "disc"]
    assert spec["mask_encoding"]["name"] == "fundus"
    with pytest.raises(ExportError, match="--task is for task-prompted 3D models"):
        export_checkpoint(tmp_path / "ckpt" / "best_test.pt", tmp_path / "out2", fmt=fmt, task="1")


@pytest.mark.parametrize("fmt", FORMATS)
def test_3d_task_export_matches_pytorch(tmp_path, fmt):
    net = make_3d_checkpoint(tmp_path / "ckpt" / "best_val.pt")
    [path] = export_checkpoint(tmp_path / "ckpt" / "best_val.pt", tmp_path / "out", fmt=fmt, task="3")
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = net(x, torch.tensor([3, 3])).numpy()
        other = net(x, torch.tensor([1, 1])).numpy()
    out = run_file(path, x)
    assert np.abs(out - ref).max() < 1e-4
    assert np.abs(out - other).max() > 1e-3, "the task prompt must be the one asked for"
    spec = json.loads((tmp_path / "out" / "preprocessing.json").read_text())
    assert spec["task"] == {"id": 3, "name": "spleen", "note": spec["task"]["note"]}
    assert spec["sliding_window"]["window"] == [32, 32, 32] and spec["sliding_window"]["strides"] == [16, 16, 16]
    assert spec["input"]["intensity"]["kind"] == "clip_minmax" and spec["input"]["intensity"]["hu_window"] == [
        -125.0, 275.0]


def test_3d_model_needs_a_task(tmp_path):
    make_3d_checkpoint(tmp_path / "ckpt" / "best_test.pt")
    with pytest.raises(ExportError, match="--task"):
        export_checkpoint(tmp_path / "ckpt" / "best_test.pt", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    with pytest.raises(ExportError, match="task id or 'all'"):
        export_checkpoint(tmp_path / "ckpt" / "best_test.pt", tmp_path / "out2", task="spleen")


# ----------------------------------------------------------------------------- mask encoding
@pytest.mark.parametrize("name", ["fundus", "prostate", "busi", "mnms", "index"])
def test_mask_lut_reproduces_the_codec(name):
    codec = CODECS.get(name) or index_codec(LabelSpec("exclusive", ("background", "a", "b")))
    spec = codec.label_spec
    rng = np.random.default_rng(0)
    lut = np.asarray(mask_lut(codec), np.uint8)
    if spec.multilabel:
        label = (rng.random((spec.num_outputs, 9, 7)) > 0.5).astype(np.float32)
        code = (label.astype(int) * (2 ** np.arange(spec.num_outputs))[:, None, None]).sum(0)
    else:
        label = code = rng.integers(0, spec.num_outputs, size=(9, 7))
    assert np.array_equal(lut[code], codec.encode(label))


# ----------------------------------------------------------------------------- predict from the export
def assert_same_masks(a: np.ndarray, b: np.ndarray, margin: np.ndarray, exact: bool) -> None:
    """Equal masks; ONNX may flip only where PyTorch itself is undecided (|margin| < 1e-4)."""
    differ = a != b if a.ndim == margin.ndim else (a != b).any(-1)
    if exact:
        assert not differ.any(), f"{int(differ.sum())} elements differ"
    else:
        assert not (differ & (np.abs(margin) >= 1e-4)).any()
        assert differ.mean() < 1e-3


def margin_2d(net: UNet2D, path: Path) -> np.ndarray:
    """PyTorch's decision margin per pixel of ``medsemi predict`` (exclusive: logit 1 - logit 0)."""
    from medsemi.workflows.predict import load_image

    x, (w, h) = load_image(path, 3, 32)
    with torch.no_grad():
        logits = torch.nn.functional.interpolate(net(x[None]), size=(h, w), mode="bilinear", align_corners=False)
    return (logits[0, 1] - logits[0, 0]).numpy()


def margin_3d(net: TaskPromptedVNet, path: Path, task: int) -> np.ndarray:
    from medsemi.evaluation.sliding3d import sliding_window_probs
    from medsemi.workflows.predict3d import preprocess

    vol = nib.load(str(path))
    image = preprocess(np.asarray(vol.dataobj, np.float32), vol.header.get_zooms(), {"intensity": "zscore"})
    with torch.no_grad():
        probs = sliding_window_probs(torch.from_numpy(image), lambda x: net(x, torch.full((x.shape[0],), task)),
                                     window=32, strides=(16, 16, 16))
    return (probs[0, 1] - probs[0, 0]).numpy()


@pytest.mark.parametrize("fmt", FORMATS)
def test_predict_from_2d_export_writes_the_checkpoint_masks(tmp_path, fmt):
    ckpt = tmp_path / "ckpt" / "best_test.pt"
    net = make_2d_checkpoint(ckpt, kind="exclusive")
    images = write_images(tmp_path / "images")
    assert main(["export", str(ckpt), str(tmp_path / "exp"), "--format", fmt]) == 0
    assert main(["predict", str(ckpt), str(images), str(tmp_path / "from_ckpt"), "--device", "cpu"]) == 0
    assert main(["predict", str(tmp_path / "exp"), str(images), str(tmp_path / "from_export")]) == 0
    names = sorted(p.name for p in (tmp_path / "from_ckpt").iterdir())
    assert names == ["img0.png", "img1.png", "img2.png"]
    assert sorted(p.name for p in (tmp_path / "from_export").iterdir()) == names
    for name in names:
        a = np.asarray(Image.open(tmp_path / "from_ckpt" / name))
        b = np.asarray(Image.open(tmp_path / "from_export" / name))
        assert a.shape == b.shape and set(np.unique(a)) == {0, 255}  # ProstateSlice encoding, both classes
        assert_same_masks(a, b, margin_2d(net, images / name), exact=fmt == "torchscript")


@pytest.mark.parametrize("fmt", FORMATS)
def test_predict_from_3d_export_writes_the_checkpoint_masks(tmp_path, fmt):
    ckpt = tmp_path / "ckpt" / "best_test.pt"
    net = make_3d_checkpoint(ckpt)
    write_volume(tmp_path / "in" / "case.nii.gz")
    task = "all" if fmt == "torchscript" else "2"  # --task all: one sub-folder per task (4 exports, slower)
    assert main(["export", str(ckpt), str(tmp_path / "exp"), "--format", fmt, "--task", task]) == 0
    if task == "all":
        folders = sorted(p.name for p in (tmp_path / "exp").iterdir())
        assert folders == ["task1-pancreas", "task2-la", "task3-spleen", "task4-lung"]
        ids = [json.loads((tmp_path / "exp" / f / "preprocessing.json").read_text())["task"]["id"] for f in folders]
        assert ids == [1, 2, 3, 4]
    assert main(["predict", str(ckpt), str(tmp_path / "in"), str(tmp_path / "a"), "--task", "2",
                 "--device", "cpu"]) == 0
    assert main(["predict", str(tmp_path / "exp"), str(tmp_path / "in"), str(tmp_path / "b"), "--task", "2"]) == 0
    a = np.asarray(nib.load(str(tmp_path / "a" / "case.nii.gz")).dataobj)
    b = nib.load(str(tmp_path / "b" / "case.nii.gz"))
    assert a.shape == (40, 36, 33) and 0 < a.sum() < a.size
    assert np.allclose(b.affine, np.diag([0.8, 0.8, 2.5, 1.0]))
    assert_same_masks(a, np.asarray(b.dataobj), margin_3d(net, tmp_path / "in" / "case.nii.gz", 2),
                      exact=fmt == "torchscript")
    # a task-per-folder export needs --task; a single-task export refuses another task
    assert main(["predict", str(tmp_path / "exp"), str(tmp_path / "in"), str(tmp_path / "c"),
                 *([] if task == "all" else ["--task", "3"])]) == 2


# ----------------------------------------------------------------------------- the README example
@pytest.mark.parametrize("fmt", FORMATS)
def test_readme_example_runs_as_written_2d(tmp_path, fmt):
    ckpt = tmp_path / "ckpt" / "best_test.pt"
    make_2d_checkpoint(ckpt)
    images = write_images(tmp_path / "images", sizes=((48, 64),))
    export_checkpoint(ckpt, tmp_path / "exp", fmt=fmt)
    code = example_code((tmp_path / "exp" / "README.md").read_text())
    assert len(code.strip().splitlines()) <= 16
    (tmp_path / "exp" / "example.py").write_text(code)
    subprocess.run([sys.executable, "example.py", str(images / "img0.png"), str(tmp_path / "mask.png")],
                   cwd=tmp_path / "exp", check=True, capture_output=True)
    main(["predict", str(ckpt), str(images), str(tmp_path / "pred"), "--device", "cpu"])
    mine = np.asarray(Image.open(tmp_path / "mask.png"))
    ref = np.asarray(Image.open(tmp_path / "pred" / "img0.png"))
    assert mine.shape == ref.shape == (48, 64) and set(np.unique(ref)) == {0, 128, 255}
    assert (mine == ref).mean() > 0.999  # bilinear logits as predict does; float rounding only


@pytest.mark.parametrize("task,lcc", [("2", False), ("1", True)])
def test_readme_example_runs_as_written_3d(tmp_path, task, lcc):
    """LA (task 2): z-score, no resampling. Pancreas (task 1): resampled to 1 mm with the z-spacing quirk
    (0.8 x 0.8 x 2.5 mm in, a smaller grid), HU clip + min-max, the largest connected component, the mask
    back on the input grid."""
    ckpt = tmp_path / "ckpt" / "best_test.pt"
    make_3d_checkpoint(ckpt, lcc=lcc)
    write_volume(tmp_path / "in" / "case.nii.gz")
    export_checkpoint(ckpt, tmp_path / "exp", fmt="onnx", task=task)
    code = example_code((tmp_path / "exp" / "README.md").read_text())
    assert ("ndimage.zoom" in code) == (task == "1") and ("ndimage.label" in code) == lcc
    (tmp_path / "exp" / "example.py").write_text(code)
    subprocess.run([sys.executable, "example.py", str(tmp_path / "in" / "case.nii.gz"), str(tmp_path / "m.nii.gz")],
                   cwd=tmp_path / "exp", check=True, capture_output=True)
    main(["predict", str(ckpt), str(tmp_path / "in"), str(tmp_path / "pred"), "--task", task, "--device", "cpu"])
    mine = np.asarray(nib.load(str(tmp_path / "m.nii.gz")).dataobj)
    ref = np.asarray(nib.load(str(tmp_path / "pred" / "case.nii.gz")).dataobj)
    assert mine.shape == ref.shape and 0 < ref.sum() < ref.size
    # same resampling, windows and averaging: float rounding may flip a voxel on a decision boundary
    assert (mine != ref).sum() <= max(2, 0.01 * ref.sum())


# ----------------------------------------------------------------------------- bad input
def test_exporting_training_state_names_the_model_checkpoints(tmp_path, capsys):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    make_2d_checkpoint(ckpt_dir / "best_test.pt")
    torch.save({"iteration": 3, "method": {}, "optimizer": {}, "rng": {"numpy": np.random.get_state()}},
               ckpt_dir / "last.pt")
    assert main(["export", str(ckpt_dir / "last.pt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "last.pt" in err and "training state" in err and "best_test.pt" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_corrupt_checkpoint_is_one_sentence(tmp_path, capsys):
    bad = tmp_path / "best_test.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["export", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "best_test.pt" in err and "not a readable checkpoint" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))

    torch.save({"model": {}, "config": {}, "info": {}, "x": Evil()}, tmp_path / "best_test.pt")
    with pytest.raises(CheckpointError, match="best_test.pt: refused to load: it holds print"):
        export_checkpoint(tmp_path / "best_test.pt", tmp_path / "out")


def test_non_empty_out_dir_needs_overwrite(tmp_path, capsys):
    ckpt = tmp_path / "ckpt" / "best_test.pt"
    make_2d_checkpoint(ckpt)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(ckpt), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and not (out / "model.onnx").exists()
    assert main(["export", str(ckpt), str(out), "--overwrite"]) == 0
    assert (out / "model.onnx").exists() and (out / "notes.txt").read_text() == "mine"


def test_unsupported_onnx_operator_is_named_and_torchscript_suggested(tmp_path):
    class Bessel(torch.nn.Module):
        def forward(self, x):
            return torch.special.bessel_j0(x)

    with pytest.raises(ExportError, match=r"bessel_j0.*--format torchscript"):
        export_onnx(Bessel(), torch.zeros(1, 1, 4, 4), tmp_path / "m.onnx", {0: "batch"})
    assert not (tmp_path / "m.onnx").exists()


def test_generic_dataset_normalisation_and_filter_reach_the_spec_and_example():
    """A generic dataset with per-image min-max intensities and its own resize filter: preprocessing.json
    and the README example say so (not the 8-bit formula and default filter)."""
    from medsemi.data.codecs import index_codec
    from medsemi.data.contract import DatasetInfo, LabelSpec
    from medsemi.workflows.export_readme import example_2d
    from medsemi.workflows.export_spec import spec_2d

    labels = LabelSpec("exclusive", ("background", "organ"))
    info = DatasetInfo("generic", 1, labels, ("a",), (32, 32),
                       extra={"normalization": "minmax", "image_resample": "nearest"})
    spec = spec_2d(info, index_codec(labels))
    assert spec["input"]["intensity"]["normalization"] == "minmax"
    assert spec["input"]["resize"]["filter"] == "nearest"
    code = example_2d("onnx", spec)
    assert "x.min()" in code and "127.5" not in code and "Image.Resampling.NEAREST" in code
    plain = spec_2d(DatasetInfo("generic", 1, labels, ("a",), (32, 32)), index_codec(labels))
    assert plain["input"]["intensity"]["normalization"] == "uint8" and "127.5" in example_2d("onnx", plain)
