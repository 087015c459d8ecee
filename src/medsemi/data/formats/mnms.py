"""M&Ms cardiac MRI 2D ROI slices, 4 vendors (spec ust-run.md 2.3, 1.4).

Layout ``mnms/{vendorA..vendorD}/{train,test}/{image,mask}/*.png``. Images: grey (converted to L), resized
to P (288) BILINEAR. Masks: RGB, resized NEAREST, decoded by ``codecs.MNMS`` (class 1 where R == 255, then
2 where G == 255, then 3 where B == 255, a later channel overwriting; classes lv, myo, rv).
"""

from __future__ import annotations

from medsemi.data.codecs import MNMS
from medsemi.data.formats.base import FolderFormat


class MnmsFormat(FolderFormat):
    name = "mnms"
    domains = ("vendorA", "vendorB", "vendorC", "vendorD")
    domain_titles = domains
    codec = MNMS
    native_patch = 288
    image_mode = "L"
    accepted_image_modes = ("L", "RGB")
    image_resample = "bilinear"
    mask_mode = "RGB"
    max_iter = 60000
    strong_range = (0.1, 2.0)
    mask_fill = 0
    default_lb_num = 20
