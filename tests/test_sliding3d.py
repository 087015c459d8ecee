"""Sliding-window evaluation (spec versemi.md 4.2, 4.4) against a slow reference of the original loop."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch

from medsemi.evaluation.sliding3d import (
    largest_connected_component,
    overlap_for_stride,
    save_prediction_nifti,
    sliding_window_predict,
    window_starts,
)


def _spec_starts(size: int, window: int, stride: int) -> list[int]:
    size = max(size, window)
    n = math.ceil((size - window) / stride) + 1
    return [min(stride * k, size - window) for k in range(n)]


@pytest.mark.parametrize("size", [50, 95, 96, 97, 111, 112, 113, 150, 200])
@pytest.mark.parametrize("stride", [16, 4])
def test_monai_scan_positions_match_spec(size: int, stride: int) -> None:
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    assert window_starts(size, 96, stride) == _spec_starts(size, 96, stride)
    padded = max(size, 96)
    interval = _get_scan_interval((padded,), (96,), 1, (overlap_for_stride(96, stride),))
    starts = [s[0].start for s in dense_patch_slices((padded,), (96,), interval)]
    assert starts == _spec_starts(size, 96, stride)
    # the nominal overlap would give a different grid (spec 4.2)
    assert _get_scan_interval((padded + 1,), (96,), 1, (1 - stride / 96,))[0] == stride - 1


def _reference(vol: np.ndarray, net: torch.nn.Module, window: int, strides: tuple[int, ...]) -> np.ndarray:
    """``test_util.py`` written out: pad to the window, loop windows, average softmax, argmax, crop back."""
    pads = [max(window - s, 0) for s in vol.shape]
    widths = [(p // 2, p - p // 2) for p in pads]
    x = np.pad(vol, widths)
    score = np.zeros((2, *x.shape))
    count = np.zeros(x.shape)
    for sx in _spec_starts(x.shape[0], window, strides[0]):
        for sy in _spec_starts(x.shape[1], window, strides[1]):
            for sz in _spec_starts(x.shape[2], window, strides[2]):
                patch = torch.from_numpy(x[sx:sx + window, sy:sy + window, sz:sz + window].copy())[None, None]
                with torch.no_grad():
                    p = torch.softmax(net(patch.float()), 1)[0].double().numpy()
                score[:, sx:sx + window, sy:sy + window, sz:sz + window] += p
                count[sx:sx + window, sy:sy + window, sz:sz + window] += 1
    mean = score / count
    label = mean.argmax(0)
    w, h, d = vol.shape
    return label[widths[0][0]:widths[0][0] + w, widths[1][0]:widths[1][0] + h, widths[2][0]:widths[2][0] + d]


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1))
    return net.eval()


@pytest.mark.parametrize("shape", [(20, 13, 17), (12, 12, 12), (9, 30, 14)])
def test_prediction_matches_reference_loop(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(1)
    vol = rng.standard_normal(shape).astype(np.float32)
    net = _net()
    pred = sliding_window_predict(vol, net, window=12, strides=(4, 4, 2))
    ref = _reference(vol, net, 12, (4, 4, 2))
    assert pred.shape == shape and pred.dtype == np.uint8
    np.testing.assert_array_equal(pred, ref)
    assert 0 < pred.mean() < 1  # non-trivial


def test_ties_go_to_background_and_gaussian_is_normalised() -> None:
    vol = torch.randn(14, 14, 14)
    zero = sliding_window_predict(vol, lambda x: torch.zeros(x.shape[0], 2, *x.shape[2:]), window=8,
                                  strides=(4, 4, 2))
    assert zero.sum() == 0

    def pointwise(x: torch.Tensor) -> torch.Tensor:  # window-independent: any normalised blend is exact
        return torch.cat([torch.zeros_like(x), x], 1)

    for blending in ("constant", "gaussian"):
        pred = sliding_window_predict(vol, pointwise, window=8, strides=(4, 4, 2), blending=blending)
        np.testing.assert_array_equal(pred, (vol > 0).numpy().astype(np.uint8))


def test_largest_connected_component() -> None:
    m = np.zeros((10, 10, 10), bool)
    m[0:2, 0:2, 0:2] = True  # 8 voxels
    m[5:8, 5:8, 5:8] = True  # 27 voxels
    m[8, 8, 8] = True  # touches the big block diagonally only
    out = largest_connected_component(m)
    assert out.sum() == 28 and not out[0, 0, 0]
    out6 = largest_connected_component(m, connectivity=1)
    assert out6.sum() == 27 and not out6[8, 8, 8]
    assert largest_connected_component(np.zeros((3, 3, 3))).sum() == 0
    vol = np.random.default_rng(0).standard_normal((14, 14, 14)).astype(np.float32)
    net = _net()
    pred = sliding_window_predict(vol, net, window=8, strides=(4, 4, 4), lcc=True)
    from scipy import ndimage

    assert ndimage.label(pred, ndimage.generate_binary_structure(3, 3))[1] <= 1


def test_nifti_writer_keeps_geometry(tmp_path) -> None:
    affine = np.array([[0.0, -0.7, 0, 10], [0.8, 0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    img = nib.Nifti1Image(np.random.default_rng(0).standard_normal((6, 7, 5)).astype(np.float32), affine)
    img.header.set_slope_inter(2.0, 1.0)
    img.header["descrip"] = b"test image"
    nib.save(img, str(tmp_path / "in.nii.gz"))
    mask = (np.arange(6 * 7 * 5).reshape(6, 7, 5) % 3 == 0).astype(np.uint8)
    out = save_prediction_nifti(mask, tmp_path / "in.nii.gz", tmp_path / "sub" / "pred.nii.gz")
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, affine)
    assert back.header.get_zooms() == nib.load(str(tmp_path / "in.nii.gz")).header.get_zooms()
    assert back.header["descrip"].tobytes().startswith(b"test image")
    np.testing.assert_array_equal(np.asarray(back.dataobj), mask)
    assert back.get_data_dtype() == np.uint8
    with pytest.raises(ValueError, match="pred2.nii.gz: array shape"):
        save_prediction_nifti(mask[:-1], tmp_path / "in.nii.gz", tmp_path / "pred2.nii.gz")
