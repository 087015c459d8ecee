"""``medsemi data synth`` never writes into a folder that holds data, and always writes a layout that a
reader accepts: ProstateSlice for ``--kind exclusive``, the generic format for other domain counts
(issue 11, item 8)."""

import json

import numpy as np
import pytest
from PIL import Image

from medsemi.cli import main
from medsemi.data.formats.registry import open_format
from medsemi.data.tools.check2d import check_dataset

SMALL = ["--size", "32", "--train-per-domain", "4", "--test-per-domain", "2"]


def test_a_non_empty_folder_is_refused_without_overwrite(tmp_path, capsys):
    real = tmp_path / "Fundus" / "Domain1" / "train" / "ROIs" / "image"
    real.mkdir(parents=True)
    Image.fromarray(np.full((80, 80, 3), 7, np.uint8), "RGB").save(real / "d1_train_000.png")
    before = {p: p.read_bytes() for p in (tmp_path / "Fundus").rglob("*") if p.is_file()}
    assert main(["data", "synth", str(tmp_path / "Fundus"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    after = {p: p.read_bytes() for p in (tmp_path / "Fundus").rglob("*") if p.is_file()}
    assert after == before
    assert main(["data", "synth", str(tmp_path / "Fundus"), *SMALL, "--overwrite"]) == 0


def test_exclusive_writes_a_layout_the_prostate_reader_reads(tmp_path, capsys):
    out = tmp_path / "ProstateSlice"
    assert main(["data", "synth", str(out), "--kind", "exclusive", *SMALL]) == 0
    assert "data.format=prostate" in capsys.readouterr().out
    report = check_dataset(out, "prostate", patch_size=32)  # as training checks it (data.patch_size=32)
    assert not report.errors, report.to_text()
    fmt = open_format("prostate", out)
    assert [len(fmt.list_split(d, "train")) for d in range(6)] == [4] * 6
    assert [len(fmt.list_split(d, "test")) for d in range(6)] == [2] * 6


@pytest.mark.parametrize(("kind", "domains"), [("multilabel", 3), ("multilabel", 5), ("exclusive", 4)])
def test_other_domain_counts_write_the_generic_format(tmp_path, capsys, kind, domains):
    out = tmp_path / "data"
    assert main(["data", "synth", str(out), "--kind", kind, "--domains", str(domains), *SMALL]) == 0
    assert "data.format=generic" in capsys.readouterr().out
    assert main(["data", "check", str(out), "--format", "generic"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert len(meta["domain_names"]) == domains
    fmt = open_format("generic", out)
    assert fmt.domains == tuple(f"domain{d + 1}" for d in range(domains))


def test_generic_synth_decodes_to_the_in_memory_data(tmp_path):
    """The generic files decode to exactly the labels and images the embedded generator makes."""
    from medsemi.data.formats.splits import build_splits
    from medsemi.data.synthetic.images2d import SyntheticConfig, generate_domain

    out = tmp_path / "data"
    assert main(["data", "synth", str(out), "--domains", "3", *SMALL]) == 0
    splits = build_splits("generic", out, lb_domain=1, lb_num=2)
    test = splits.test["domain2"].cache()
    ref = generate_domain(SyntheticConfig(num_domains=3, size=32, train_per_domain=4, test_per_domain=2), 1, "test")
    assert np.array_equal(test.labels.numpy(), ref.labels.numpy())
    assert np.allclose(test.images.numpy(), ref.images.numpy())


def test_exclusive_default_size_is_the_prostate_readers_native_size(tmp_path):
    out = tmp_path / "ps"
    assert main(["data", "synth", str(out), "--kind", "exclusive", "--train-per-domain", "1",
                 "--test-per-domain", "1"]) == 0
    assert main(["data", "check", str(out), "--format", "prostate"]) == 0
