"""``medsemi import-checkpoint versemi ORIGINAL.pth OUT.pt``: an original VerSemi checkpoint as a medsemi
model checkpoint, usable by ``medsemi predict`` and ``medsemi evaluate OUT.pt``.

The original saves ``{'net': DataParallel state dict, 'opt': Adam state, 'epoch': e}`` (spec versemi.md
N20; ``best.pth``, ``<e>.pth``, ``best_ema.pth``); a bare state dict is accepted too. The file is read with
``torch.load(weights_only=True)`` (tensors and plain containers only, no code runs). Names are mapped by
:mod:`medsemi.nets.original_names`; the network width and input channels are read from the weights.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from medsemi.checkpoints import save_atomic
from medsemi.config import Config, ConfigError, config_from_dict, config_to_dict
from medsemi.engine.trainer import dataset_info_dict
from medsemi.families.volumes import volume_info
from medsemi.nets.build import build_model
from medsemi.nets.original_names import versemi_state_from_original

KINDS = ("versemi",)


def default_versemi_config(base_channels: int) -> Config:
    """The paper's VerSemi setting (96^3 patches, release data layout) for an imported network."""
    return config_from_dict({
        "name": "imported-versemi",
        "data": {"format": "versemi", "root": "data/versemi", "patch_size": 96},
        "model": {"name": "versemi_vnet", "base_channels": base_channels},
        "train": {"amp": "off"},
        "method": {"name": "versemi"},
    })


def _read_original(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"{path}: cannot read as a weights-only PyTorch checkpoint ({err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict (state dict or {{'net': ...}}), got {type(state).__name__}")
    epoch = state.get("epoch", 0) if "net" in state else 0
    weights = state["net"] if "net" in state else state
    bad = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: not a state dict of tensors (entries {bad[:3]} are not tensors)")
    return weights, int(epoch) if isinstance(epoch, int) else 0


def import_checkpoint(kind: str, original: str | Path, out: str | Path, cfg: Config | None = None) -> Path:
    """Write ``out`` (a model checkpoint: ``model``, ``config``, ``info``) from the original ``.pth``.

    ``cfg``: the experiment config the model belongs to (default: :func:`default_versemi_config`); its
    ``model.base_channels`` must match the weights.
    """
    if kind not in KINDS:
        raise ValueError(f"import-checkpoint: unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    src, dst = Path(original), Path(out)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: file not found")
    if dst.exists():
        raise FileExistsError(f"{dst} exists; choose another output file (nothing is overwritten)")
    weights, epoch = _read_original(src)
    mapped = versemi_state_from_original(weights, str(src))
    first = mapped.get("backbone.block_one.0.weight")
    if first is None or first.dim() != 5:
        raise ValueError(f"{src}: no 'block_one.conv.0.weight' 3D convolution: not a VerSemi network")
    base, in_channels = int(first.shape[0]), int(first.shape[1])
    cfg = cfg or default_versemi_config(base)
    if cfg.model.name != "versemi_vnet" or cfg.model.base_channels != base:
        raise ConfigError(f"{src}: the weights are a VerSemi VNet with {base} base filters; the config has "
                          f"model.name={cfg.model.name}, model.base_channels={cfg.model.base_channels}")
    name = cfg.data.format if cfg.data.format in ("versemi", "synthetic3d") else "versemi"
    strides = (cfg.data.options or {}).get("strides", (16, 16, 4))
    info = volume_info(name, cfg.data.patch_size, strides, bool((cfg.data.options or {}).get("lcc", False)),
                       in_channels=in_channels)
    model = build_model(cfg.model, info)
    try:
        model.load_state_dict(mapped)
    except RuntimeError as err:
        raise ValueError(f"{src}: the weights do not fit the VerSemi network ({err})") from err
    info_dict = dataset_info_dict(SimpleNamespace(info=info))  # type: ignore[arg-type]  # reads only .info
    save_atomic({"model": model.state_dict(), "iteration": epoch, "score": None, "config": config_to_dict(cfg),
                 "info": info_dict, "imported_from": str(src)}, dst)
    return dst
