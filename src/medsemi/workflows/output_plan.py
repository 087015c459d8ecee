"""Where ``medsemi predict`` writes each mask, decided before anything is written, so that no input and
no existing file is replaced by accident (issue 11, item 1).

- The output folder may not be the input folder or lie inside it, and may not hold a file that a mask
  would replace, unless ``overwrite``; even then, a mask never replaces one of the input images.
- Inputs that share a stem (``a.png`` and ``a.jpg``) get distinct mask names (``a_png.png``, ``a_jpg.png``);
  inputs whose stem is unique keep ``<stem><suffix>``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path


class OutputError(ValueError):
    """Writing the masks would replace files; the message names them and says what to do."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def plan_outputs(inputs: Sequence[Path], input_dir: str | Path, output_dir: str | Path, stem: Callable[[Path], str],
                 out_suffix: str, overwrite: bool = False) -> list[Path]:
    """The mask path of each input (same order); raises :class:`OutputError` before anything is written."""
    src, out = Path(input_dir).resolve(), Path(output_dir).resolve()
    if _inside(out, src) and not overwrite:
        where = "is the input folder" if out == src else f"lies inside the input folder {input_dir}"
        raise OutputError(f"{output_dir} {where}; choose another OUTPUT_DIR (or pass --overwrite to write there "
                          "anyway; input images are never replaced)")
    stems = [stem(p) for p in inputs]
    shared = {s for s, n in Counter(stems).items() if n > 1}
    names = []
    for path, s in zip(inputs, stems):
        if s in shared:
            tag = path.name[len(s):].lstrip(".").replace(".", "-")
            s = f"{s}_{tag}"
        names.append(f"{s}{out_suffix}")
    clashes = [n for n, k in Counter(names).items() if k > 1]
    if clashes:
        raise OutputError(f"{input_dir}: several inputs would write the same mask {clashes[0]}; rename them")
    targets = [Path(output_dir) / n for n in names]
    inputs_resolved = {p.resolve() for p in inputs}
    replaced_inputs = [t for t in targets if t.resolve() in inputs_resolved]
    if replaced_inputs:
        raise OutputError(f"the mask {replaced_inputs[0]} would replace the input image of the same name; "
                          "choose another OUTPUT_DIR")
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise OutputError(f"{output_dir} already holds {existing[0].name}{more}, which this predict would "
                          "overwrite; choose another OUTPUT_DIR or pass --overwrite")
    return targets
