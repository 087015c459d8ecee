"""The 2D on-disk formats by name: ``open_format("fundus", root)``.

One module per format in this folder; each subclasses :class:`~medsemi.data.formats.base.Format2D`.
This registry imports them; they never import it back. To add a format, write its module and add
one line to ``FORMATS``.
"""

from __future__ import annotations

from pathlib import Path

from medsemi.data.formats.base import Format2D
from medsemi.data.formats.busi import BusiFormat
from medsemi.data.formats.fundus import FundusFormat
from medsemi.data.formats.generic import GenericFormat
from medsemi.data.formats.mnms import MnmsFormat
from medsemi.data.formats.prostate import ProstateFormat

FORMATS: dict[str, type[Format2D]] = {
    "fundus": FundusFormat,
    "prostate": ProstateFormat,
    "mnms": MnmsFormat,
    "busi": BusiFormat,
    "generic": GenericFormat,
}
FORMAT_NAMES = tuple(FORMATS)


def open_format(fmt: str | Format2D, root: str | Path | None = None) -> Format2D:
    """The :class:`Format2D` called ``fmt`` bound to ``root`` (an instance is returned as is)."""
    if isinstance(fmt, Format2D):
        return fmt
    if root is None:
        raise ValueError("a root folder is needed")
    name = fmt.lower().replace("&", "n")
    if name not in FORMATS:
        raise ValueError(f"unknown 2D format {fmt!r}; known: {FORMAT_NAMES}")
    return FORMATS[name](root)
