"""``medsemi predict`` never replaces its inputs or existing files, keeps same-stem inputs apart, and reads
16-bit / float images at their real depth or refuses them (issue 11, items 1 and 2)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsemi.cli import main
from medsemi.workflows.predict import load_image

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def grey_checkpoint(tmp_path_factory) -> Path:
    """A 2-iteration model on the exclusive (grey, prostate-like) synthetic data."""
    from conftest import TINY

    run = tmp_path_factory.mktemp("grey") / "run"
    assert main(["train", str(DEMO), *TINY, "data.synthetic.kind=exclusive", "train.iterations=2",
                 "train.eval_every=2", "--run-dir", str(run), "--no-eval"]) == 0
    return run / "checkpoints" / "best_test.pt"


def _images(folder: Path, n: int = 2, suffix: str = ".png") -> dict[Path, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), "L").save(folder / f"img{i}{suffix}")
    return {p: p.read_bytes() for p in sorted(folder.iterdir())}


def test_output_folder_equal_to_input_is_refused_and_inputs_kept(tmp_path, grey_checkpoint, capsys):
    before = _images(tmp_path / "images")
    assert main(["predict", str(grey_checkpoint), str(tmp_path / "images"), str(tmp_path / "images")]) == 2
    err = capsys.readouterr().err
    assert "input folder" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in sorted((tmp_path / "images").iterdir())} == before
    # even with --overwrite an input image is never replaced by its mask
    assert main(["predict", str(grey_checkpoint), str(tmp_path / "images"), str(tmp_path / "images"),
                 "--overwrite"]) == 2
    assert "replace the input image" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in sorted((tmp_path / "images").iterdir())} == before


def test_output_inside_the_input_folder_is_refused(tmp_path, grey_checkpoint, capsys):
    _images(tmp_path / "images")
    assert main(["predict", str(grey_checkpoint), str(tmp_path / "images"),
                 str(tmp_path / "images" / "pred")]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert not (tmp_path / "images" / "pred").exists()


def test_a_mask_folder_is_not_overwritten_without_overwrite(tmp_path, grey_checkpoint, capsys):
    _images(tmp_path / "images")
    masks = _images(tmp_path / "masks")  # ground truth with the same file names
    assert main(["predict", str(grey_checkpoint), str(tmp_path / "images"), str(tmp_path / "masks")]) == 2
    err = capsys.readouterr().err
    assert "img0.png" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in sorted((tmp_path / "masks").iterdir())} == masks
    assert main(["predict", str(grey_checkpoint), str(tmp_path / "images"), str(tmp_path / "masks"),
                 "--overwrite"]) == 0
    assert {p: p.read_bytes() for p in sorted((tmp_path / "masks").iterdir())} != masks


def test_inputs_with_the_same_stem_get_distinct_masks(tmp_path, grey_checkpoint):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 40), np.uint8), "L").save(folder / "a.png")
    Image.fromarray(np.full((40, 40), 200, np.uint8), "L").save(folder / "a.jpg")
    Image.fromarray(np.full((40, 40), 90, np.uint8), "L").save(folder / "b.png")
    assert main(["predict", str(grey_checkpoint), str(folder), str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_jpg.png", "a_png.png", "b.png"]


def test_16_bit_png_within_8_bit_range_reads_exactly(tmp_path):
    values = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 256
    Image.fromarray(values.astype(np.uint8), "L").save(tmp_path / "a8.png")
    Image.fromarray(values).save(tmp_path / "a16.png")
    assert Image.open(tmp_path / "a16.png").mode == "I;16"
    x8, _ = load_image(tmp_path / "a8.png", 1, 32)
    x16, _ = load_image(tmp_path / "a16.png", 1, 32)
    assert torch.equal(x8, x16)


def test_16_bit_png_beyond_8_bit_is_refused_with_a_sentence(tmp_path, grey_checkpoint, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    ramp = (np.arange(40 * 40).reshape(40, 40) * 2).astype(np.uint16)  # 0..3198, 12-bit-like
    Image.fromarray(ramp).save(folder / "deep.png")
    assert main(["predict", str(grey_checkpoint), str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "deep.png" in err and "16-bit" in err and "8-bit" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "deep.png").exists()


def test_deep_images_follow_the_generic_normalisation(tmp_path):
    ramp = (np.arange(16 * 16).reshape(16, 16) * 16).astype(np.uint16)  # 0..4080
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "deep.tif")
    for name in ("deep.png", "deep.tif"):
        raw, _ = load_image(tmp_path / name, 1, 16, normalization="uint8")  # the generic reader: no clipping
        assert torch.allclose(raw[0], torch.from_numpy(ramp.astype(np.float32) / 127.5 - 1))
        mm, _ = load_image(tmp_path / name, 1, 16, normalization="minmax")
        assert mm.min().item() == -1.0 and mm.max().item() == 1.0
        expected = ramp.astype(np.float32) / ramp.max() * 2 - 1
        assert torch.allclose(mm[0], torch.from_numpy(expected), atol=1e-6)
