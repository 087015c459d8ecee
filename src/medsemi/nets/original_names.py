"""Parameter names of the original VerSemi network (``vnet_odod_mix.py``) mapped onto
:class:`~medsemi.nets.task_prompted.TaskPromptedVNet` (spec versemi.md 2.1-2.2, note N20).

The original saves ``nn.DataParallel`` state dicts, so every name starts with ``module.``. Its blocks wrap
their layers in a ``conv`` Sequential with the same layer order as ours (conv, InstanceNorm, ReLU per
stage), so only the names move:

=====================================  =========================================
original (after ``module.``)           ours
=====================================  =========================================
``block_<k>.conv.<i>.<param>``         ``backbone.block_<k>.<i>.<param>``
``block_<k>_dw`` / ``block_<k>_up``    ``backbone.block_<k>_dw`` / ``_up`` (same rule)
``GAP.<i>.<param>`` (BatchNorm3d)      ``gap.<i>.<param>``
``controller.<param>``                 ``controller.<param>``
``precls_conv.<i>.<param>``            ``precls_conv.<i>.<param>``
=====================================  =========================================

InstanceNorm3d (no affine, no running statistics) and Dropout3d have no entries.
"""

from __future__ import annotations

import re

import torch

_BLOCK = re.compile(r"^(block_[a-z]+(?:_dw|_up)?)\.conv\.(\d+)\.(.+)$")
_SAME = re.compile(r"^(controller|precls_conv)\.(.+)$")
_GAP = re.compile(r"^GAP\.(.+)$")


def versemi_name(original: str) -> str | None:
    """Our name for one original parameter / buffer name (without ``module.``), or None if unknown."""
    m = _BLOCK.match(original)
    if m:
        return f"backbone.{m.group(1)}.{m.group(2)}.{m.group(3)}"
    m = _GAP.match(original)
    if m:
        return f"gap.{m.group(1)}"
    if _SAME.match(original):
        return original
    return None


def versemi_state_from_original(state: dict[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename an original VerSemi state dict (DataParallel ``module.`` prefix or none) to our names.

    Raises ``ValueError`` naming ``source`` and the first unknown names when a key has no counterpart.
    """
    keys = list(state)
    prefixed = [k.startswith("module.") for k in keys]
    if any(prefixed) and not all(prefixed):
        raise ValueError(f"{source}: some names have the DataParallel 'module.' prefix and some do not")
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key in keys:
        name = key[len("module."):] if key.startswith("module.") else key
        ours = versemi_name(name)
        if ours is None:
            unknown.append(key)
        else:
            out[ours] = state[key]
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} name(s) that the VerSemi network does not have, "
                         f"e.g. {unknown[:5]}")
    return out
