"""Fundus optic cup / disc, 4 domains (spec ust-run.md 2.1, 1.4).

Layout ``Fundus/Domain{1..4}/{train,test}/ROIs/{image,mask}/*.png``. Images: RGB, resized to P (256) with
LANCZOS. Masks: converted to 8-bit grey, resized NEAREST, decoded by ``codecs.FUNDUS`` (0 = cup,
128 = disc rim, 255 = background; multi-label cup, disc with the disc containing the cup).
Order: sorted file names (the originals used an unsorted glob or unpublished list files, spec 6 item 15);
``list_dir`` with ``Domain{i}_train.txt`` reproduces a given order.
"""

from __future__ import annotations

from medsemi.data.codecs import FUNDUS
from medsemi.data.formats.base import FolderFormat


class FundusFormat(FolderFormat):
    name = "fundus"
    domains = ("Domain1", "Domain2", "Domain3", "Domain4")
    domain_titles = ("Drishti-GS", "RIM-ONE-r3", "REFUGE-train", "REFUGE-val")
    codec = FUNDUS
    native_patch = 256
    image_mode = "RGB"
    accepted_image_modes = ("RGB",)
    image_resample = "lanczos"
    mask_mode = "L"
    sub = "ROIs"
    max_iter = 30000
    strong_range = (0.5, 1.5)
    mask_fill = 255
    default_lb_num = 20
