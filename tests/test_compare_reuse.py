"""``bench compare`` / ``demo`` reuse a run only when its resolved config equals the requested one, and
check every method before training anything (issue 11, item 3)."""

from pathlib import Path

import pytest

import medsemi.workflows.compare as compare
from medsemi.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def _compare(out, overrides, methods="supervised"):
    return main(["bench", "compare", str(DEMO), *overrides, "--methods", methods, "--seeds", "1",
                 "--out", str(out)])


def test_same_out_with_new_overrides_is_refused_not_reused(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "cmp"
    base = [*tiny_overrides, "train.iterations=2", "train.eval_every=2"]
    assert _compare(out, base) == 0
    run = out / "supervised-seed0"
    before = (run / "eval.json").read_bytes()
    capsys.readouterr()
    assert _compare(out, [*base, "model.base_channels=6"]) == 2
    err = capsys.readouterr().err
    assert str(run) in err and "model.base_channels: 4 -> 6" in err and "nothing was trained" in err
    assert (run / "eval.json").read_bytes() == before
    assert _compare(out, base) == 0  # the same settings: reused, not retrained
    assert (run / "eval.json").read_bytes() == before


def test_every_method_is_checked_before_anything_trains(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "cmp"
    assert _compare(out, [*tiny_overrides, "train.iterations=2"], methods="supervised,nosuchmethod") == 2
    assert "nosuchmethod" in capsys.readouterr().err
    assert not (out / "supervised-seed0").exists(), "the first method trained before the second was checked"
    assert _compare(out, [*tiny_overrides, "train.iterations=2"], methods="supervised,ustrun:nosuchoption=1") == 2
    assert "nosuchoption" in capsys.readouterr().err
    assert not (out / "supervised-seed0").exists()


@pytest.mark.parametrize(("args", "folder"), [([], "runs/demo"), (["--quick"], "runs/demo-quick"),
                                               (["--quick", "--out", "x"], "x")])
def test_demo_quick_has_its_own_default_folder(tmp_path, monkeypatch, args, folder):
    seen = {}

    def fake_compare(config, methods, seeds, out, overrides):
        seen["out"] = Path(out)
        raise SystemExit(0)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compare, "compare_methods", fake_compare)
    with pytest.raises(SystemExit):
        main(["demo", *args])
    assert seen["out"] == Path(folder)
