"""Prostate MRI slices, 6 sites (spec ust-run.md 2.2, 1.4).

Layout ``ProstateSlice/{BIDMC,BMC,HK,I2CVB,RUNMC,UCL}/{train,test}/{image,mask}/CC_SS.png``; 384x384 grey.
Images are used at native size (no resize, P = 384) unless a patch size is given (then BILINEAR, a
deviation the original never needs). Masks: 0 = prostate, 255 = background (``codecs.PROSTATE``).
Sample names are prefixed with the site (``BIDMC/00_00.png``). The shipped sample pairs
``I2CVB/train/image/00_01.png`` with ``mask/00_00.png``; a labelled or test use of that image raises
``MissingMaskError`` (spec 6 item 23).
"""

from __future__ import annotations

from medsemi.data.codecs import PROSTATE
from medsemi.data.formats.base import FolderFormat


class ProstateFormat(FolderFormat):
    name = "prostate"
    domains = ("BIDMC", "BMC", "HK", "I2CVB", "RUNMC", "UCL")
    domain_titles = domains
    codec = PROSTATE
    native_patch = 384
    resize = False
    image_mode = "L"
    accepted_image_modes = ("L",)
    image_resample = "bilinear"
    mask_mode = "L"
    max_iter = 60000
    strong_range = (0.1, 2.0)
    mask_fill = 255
    default_lb_num = 40
