"""The README.md written into an export folder: what the files are and a short Python example that runs
the exported network with numpy + Pillow (2D) or nibabel (3D) and onnxruntime or ``torch.jit.load`` only."""

from __future__ import annotations

from typing import Any

RUNNERS = {
    "onnx": ("import onnxruntime as ort",
             'sess = ort.InferenceSession("model.onnx"); run = lambda x: sess.run(None, {"image": x})[0]'),
    "torchscript": ("import torch",
                    'net = torch.jit.load("model.pt"); run = lambda x: net(torch.from_numpy(x)).detach().numpy()'),
}


def example_2d(fmt: str, spec: dict[str, Any]) -> str:
    """Image file -> mask file in the dataset's encoding (``python example.py IMAGE MASK.png`` in OUT_DIR)."""
    imp, run = RUNNERS[fmt]
    resample = spec["input"]["resize"]["filter"].upper()
    if spec["input"]["intensity"].get("normalization") == "minmax":
        normalise = "x = np.asarray(img, np.float32); x = (x - x.min()) / max(x.max() - x.min(), 1e-12) * 2 - 1"
    else:
        normalise = "x = np.asarray(img, np.float32) / 127.5 - 1.0"
    if spec["labels"]["kind"] == "multilabel":
        decide = "code = ((logits >= 0) * 2 ** np.arange(len(logits))[:, None, None]).sum(0)"
    else:
        decide = "code = logits.argmax(0)"
    return "\n".join([
        "import json, sys",
        "import numpy as np",
        "from PIL import Image",
        imp,
        "",
        'spec = json.load(open("preprocessing.json"))',
        run,
        'src = Image.open(sys.argv[1]).convert(spec["input"]["colour"])',
        f'img = src.resize(spec["input"]["size"][::-1], Image.Resampling.{resample})',
        normalise,
        "x = (x[None] if x.ndim == 2 else x.transpose(2, 0, 1))[None]",
        "logits = run(x)[0]",
        "up = lambda c: np.asarray(Image.fromarray(c).resize(src.size, Image.Resampling.BILINEAR))",
        "logits = np.stack([up(c) for c in logits])",
        decide,
        'Image.fromarray(np.asarray(spec["mask_encoding"]["lut"], np.uint8)[code]).save(sys.argv[2])',
    ])


def _normalise_line(intensity: dict[str, Any]) -> list[str]:
    if intensity["kind"] == "clip_minmax":
        lo, hi = intensity["hu_window"]
        return [f"x = np.clip(x, {lo}, {hi}); x = (x - x.min()) / (x.max() - x.min())"]
    if intensity["kind"] == "zscore":
        return ["x = (x - x.mean()) / x.std()"]
    return []


def example_3d(fmt: str, spec: dict[str, Any]) -> str:
    """NIfTI volume -> NIfTI mask (``python example.py IMAGE.nii.gz MASK.nii.gz`` in OUT_DIR): the training
    recipe's resampling and intensity normalisation, the sliding window, the largest connected component
    when the run used it, and the mask back on the input grid, as ``medsemi predict`` does."""
    imp, run = RUNNERS[fmt]
    resample, back = [], []
    target = spec["input"]["resample"]["target_spacing"]
    if target:
        src = "(sp[0], sp[1], sp[0])" if spec["input"]["resample"]["pancreas_z_quirk"] else "sp"
        resample = [
            f"sp = nii.header.get_zooms()[:3]; f = [a / b for a, b in zip({src}, {list(target)})]",
            "if any(abs(v - 1) > 1e-6 for v in f): x = ndimage.zoom(x, f, order=1).astype(np.float32)",
        ]
        back = [
            "if fg.shape != nii.shape[:3]:  # back to the input grid (nearest neighbour)",
            "    m = ndimage.zoom(fg.astype(np.uint8), [a / b for a, b in zip(nii.shape[:3], fg.shape)], order=0)",
            "    fg = np.zeros(nii.shape[:3], np.uint8)",
            "    c = tuple(slice(0, min(a, b)) for a, b in zip(m.shape, fg.shape)); fg[c] = m[c]",
        ]
    lcc = []
    if spec["sliding_window"]["largest_connected_component"]:
        lcc = [
            "lab, n = ndimage.label(fg, np.ones((3, 3, 3)))  # largest connected component (26-connected)",
            "if n > 1: sizes = np.bincount(lab.ravel()); sizes[0] = 0; fg = lab == sizes.argmax()",
        ]
    uses_scipy = bool(resample or lcc)
    return "\n".join([
        "import itertools, json, sys",
        "import nibabel as nib",
        "import numpy as np",
        *(["from scipy import ndimage"] if uses_scipy else []),
        imp,
        "",
        'spec = json.load(open("preprocessing.json"))',
        run,
        'w, s = spec["sliding_window"]["window"], spec["sliding_window"]["strides"]',
        "nii = nib.load(sys.argv[1]); x = nii.get_fdata().astype(np.float32)",
        *resample,
        *_normalise_line(spec["input"]["intensity"]),
        "shape = x.shape",
        "pad = [(max(a - n, 0) // 2, max(a - n, 0) - max(a - n, 0) // 2) for n, a in zip(x.shape, w)]",
        "x = np.pad(x, pad); prob = np.zeros((2, *x.shape), np.float32)",
        "starts = [sorted({min(k, n - a) for k in range(0, n - a + b, b)}) for n, a, b in zip(x.shape, w, s)]",
        "for corner in itertools.product(*starts):",
        "    box = tuple(slice(i, i + a) for i, a in zip(corner, w))",
        "    z = run(x[box][None, None].astype(np.float32))[0]",
        "    e = np.exp(z - z.max(0)); prob[(slice(None), *box)] += e / e.sum(0)",
        "fg = (prob[1] > prob[0])[tuple(slice(p, p + n) for (p, _), n in zip(pad, shape))]",
        *lcc,
        *back,
        "nib.save(nib.Nifti1Image(fg.astype(np.uint8), nii.affine, nii.header), sys.argv[2])",
    ])


def readme_text(fmt: str, spec: dict[str, Any], source: str) -> str:
    model_file = "model.onnx" if fmt == "onnx" else "model.pt"
    runtime = "runs with onnxruntime" if fmt == "onnx" else "runs with `torch.jit.load`"
    labels = spec["labels"]
    if spec["dims"] == 2:
        code, usage = example_2d(fmt, spec), "python example.py IMAGE.png MASK.png"
        inp = spec["input"]
        shape = (f"`(N, {inp['channels']}, H, W)` float32; N, H and W are free, H and W must be multiples of "
                 f"{inp['size_multiple']} (training size {inp['size'][0]}x{inp['size'][1]})")
        caveat = ("This example writes the masks `medsemi predict` writes for images at least as large as the "
                  "training size (logits resized bilinearly, then the decision); for smaller images Pillow "
                  "smooths while shrinking, so a few border pixels can differ.")
    else:
        code, usage = example_3d(fmt, spec), "python example.py IMAGE.nii.gz MASK.nii.gz"
        win = spec["input"]["window"]
        shape = f"`(N, 1, {win[0]}, {win[1]}, {win[2]})` float32 (one window); N is free"
        caveat = (f"Task {spec['task']['id']} ({spec['task']['name']}) is built into this file. The example "
                  "follows preprocessing.json: the training spacing (resampled there and the mask back), the "
                  "intensity rule, the sliding window and the largest-connected-component option, as "
                  "`medsemi predict EXPORT_DIR` does.")
    window = ", sliding window" if spec["dims"] == 3 else ""
    io = (f"image -> input (channels, resizing, intensity normalisation{window})"
          f", output -> mask (labels: {labels['kind']}, {labels['activation']}; classes "
          f"{', '.join(labels['class_names'])}; mask encoding `{spec['mask_encoding']['name']}`)")
    return f"""# Exported medsemi model

Exported from `{source}` by `medsemi export` as {fmt}; {runtime}, without medsemi.

| file | what |
|---|---|
| `{model_file}` | the network: input `image` {shape}; output `logits` ({len(labels['class_names'])} channels) |
| `preprocessing.json` | {io} |

## Example

Save as `example.py` in this folder and run `{usage}`:

```python
{code}
```

{caveat}
With medsemi installed, `medsemi predict THIS_FOLDER INPUT_DIR OUTPUT_DIR` writes the same masks as the
checkpoint it came from.
"""


def example_code(readme: str) -> str:
    """The Python example of an export README (what the tests run)."""
    return readme.split("```python\n", 1)[1].split("```", 1)[0]
