"""The package layout as documented: checkpoints independent of module paths, README architecture = tree."""

from __future__ import annotations

import pickletools
import re
import zipfile
from pathlib import Path

from medsemi.config import load_config
from medsemi.engine.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "medsemi"


def pickled_modules(checkpoint: Path) -> set[str]:
    """Every module a ``torch.save`` file's pickle names (classes and functions it would import)."""
    with zipfile.ZipFile(checkpoint) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        data = archive.read(name)
    modules, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            modules.add(str(arg).split(" ")[0])
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(str(arg))
        elif op.name == "STACK_GLOBAL":
            modules.add(strings[-2])
    return modules


def test_checkpoints_name_no_medsemi_module(tmp_path, tiny_overrides):
    """Moving a module cannot break old checkpoints: they hold tensors and plain data, no medsemi class."""
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      [*tiny_overrides, "method.name=mean_teacher", "train.iterations=2", "train.eval_every=2"])
    Trainer(cfg, tmp_path / "run").fit()
    for file in ("last.pt", "best_test.pt"):
        modules = pickled_modules(tmp_path / "run" / "checkpoints" / file)
        assert "torch" in modules or "torch._utils" in modules  # the parser sees the pickle's globals
        assert not [m for m in modules if m.split(".")[0] == "medsemi"], (file, modules)


def test_readme_architecture_lists_every_package_and_module():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Architecture", 1)[1].split("```", 2)[1]
    names = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    names |= {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    names |= {p.name for p in (PACKAGE / "data").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    missing = sorted(n for n in names if not re.search(rf"(?<![\w/]){re.escape(n.removesuffix('.py'))}\b", block))
    assert not missing, f"README Architecture block does not mention {missing}"
