"""The command line end to end: methods, data synth/check, train on the written data through the real
reader, evaluate, predict, score."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsemi.cli import main

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO.parent / "shared" / "data" / "samples"


def test_methods_lists_the_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("supervised", "mean_teacher", "fixmatch", "midss", "ustrun"):
        assert name in out


@pytest.mark.skipif(not SAMPLES.exists(), reason="shared samples not present")
def test_data_check_reports_the_prostate_image_without_mask(capsys):
    assert main(["data", "check", str(SAMPLES / "ProstateSlice"), "--format", "prostate"]) == 1
    out = capsys.readouterr().out
    assert "I2CVB" in out and "00_01.png" in out


@pytest.mark.skipif(not SAMPLES.exists(), reason="shared samples not present")
def test_data_check_passes_clean_fundus_samples():
    assert main(["data", "check", str(SAMPLES / "Fundus"), "--format", "fundus"]) == 0


def test_bad_override_is_a_clear_error(capsys):
    code = main(["train", str(REPO / "configs" / "demo.yaml"), "train.iteratons=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.iteratons" in err and "iterations" in err


def test_synth_train_evaluate_predict_score(tmp_path, tiny_overrides, capsys):
    data = tmp_path / "Fundus"
    assert main(["data", "synth", str(data), "--size", "32", "--domains", "4",
                 "--train-per-domain", "4", "--test-per-domain", "2"]) == 0
    assert sorted(p.name for p in data.iterdir() if p.is_dir()) == ["Domain1", "Domain2", "Domain3", "Domain4"]
    assert main(["data", "check", str(data), "--format", "fundus"]) == 0
    run = tmp_path / "run"
    overrides = [o for o in tiny_overrides if not o.startswith("data.synthetic")]
    code = main(["train", str(REPO / "configs" / "fundus" / "supervised.yaml"), *overrides,
                 f"data.root={data}", "train.iterations=4", "train.eval_every=2", "--run-dir", str(run)])
    assert code == 0
    report = (run / "report.md").read_text()
    assert "best_test" in report and "Domain2" in report
    assert (run / "curves.png").exists() and (run / "overlays" / "Domain1.png").exists()
    assert "](overlays/Domain1.png)" in report  # report.md links the overlays
    result = json.loads((run / "eval.json").read_text())
    assert set(result["best_test"]["per_domain"]) == {"Domain1", "Domain2", "Domain3", "Domain4"}

    assert main(["evaluate", str(run), "--checkpoint", "last_student"]) == 0
    images = data / "Domain2" / "test" / "ROIs" / "image"
    out = tmp_path / "pred"
    assert main(["predict", str(run / "checkpoints" / "best_test.pt"), str(images), str(out)]) == 0
    preds = sorted(out.glob("*.png"))
    assert [p.name for p in preds] == sorted(p.name for p in images.glob("*.png"))
    values = set(np.unique(np.asarray(Image.open(preds[0]))).tolist())
    assert values <= {0, 128, 255}, "prediction not in the Fundus mask encoding"
    gt = data / "Domain2" / "test" / "ROIs" / "mask"
    assert main(["score", str(out), str(gt), "--format", "fundus", "--out", str(tmp_path / "scores")]) == 0
    scores = json.loads((tmp_path / "scores" / "scores.json").read_text())
    assert "cup" in json.dumps(scores) and "disc" in json.dumps(scores)

    # the same data converted to the generic format trains and evaluates with the same counts
    generic = tmp_path / "generic"
    assert main(["data", "convert", str(data), str(generic), "--format", "fundus", "--lb-num", "4"]) == 0
    assert main(["data", "check", str(generic), "--format", "generic"]) == 0
    run2 = tmp_path / "run_generic"
    code = main(["train", str(REPO / "configs" / "fundus" / "supervised.yaml"), *overrides,
                 "data.format=generic", f"data.root={generic}", "data.lb_domain=0",
                 "train.iterations=4", "train.eval_every=2", "--run-dir", str(run2)])
    assert code == 0
    assert json.loads((run2 / "splits.json").read_text()) == json.loads((run / "splits.json").read_text())
    result2 = json.loads((run2 / "eval.json").read_text())
    assert result2["best_test"]["counts"]["cases"] == result["best_test"]["counts"]["cases"]


@pytest.mark.skipif(not SAMPLES.exists(), reason="shared samples not present")
def test_training_refuses_data_with_errors_before_the_first_step(tmp_path, capsys):
    import shutil

    data = tmp_path / "Fundus"
    shutil.copytree(SAMPLES / "Fundus", data)
    mask = next(data.glob("Domain1/train/ROIs/mask/*.png"))
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(mask)  # size mismatch: an error of `data check`
    code = main(["train", str(REPO / "configs" / "fundus" / "supervised.yaml"), f"data.root={data}",
                 "--run-dir", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert mask.name in err and "data.check=false" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(not SAMPLES.exists(), reason="shared samples not present")
def test_unlabelled_image_without_mask_is_a_warning_in_training(tmp_path, capsys):
    code = main(["train", str(REPO / "configs" / "prostate" / "supervised.yaml"),
                 f"data.root={SAMPLES / 'ProstateSlice'}", "data.patch_size=32", "data.lb_num=1",
                 "model.base_channels=4", "train.batch_size=1", "train.unlabelled_batch_size=1",
                 "train.iterations=1", "train.eval_every=1", "train.tensorboard=false", "--no-eval",
                 "--run-dir", str(tmp_path / "run")])
    assert code == 0
    err = capsys.readouterr().err
    assert "warning" in err and "00_01.png" in err and "no mask" in err
