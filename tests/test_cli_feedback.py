"""Issue 11 (second half) to 18: one-sentence errors with a non-zero exit, overrides anywhere, plain progress
lines, the thread count, `methods`, `--help`, `--version`, `data check --json`, config paths."""

import argparse
import errno
import json
import pathlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medsemi.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
SAMPLES = REPO.parent / "shared" / "data" / "samples"
FAST = ["data.patch_size=32", "data.lb_num=2", "data.synthetic.train_per_domain=4",
        "data.synthetic.test_per_domain=2", "data.synthetic.num_domains=2", "model.base_channels=4",
        "train.batch_size=2", "train.unlabelled_batch_size=2", "train.tensorboard=false", "train.log_every=2",
        "train.iterations=4", "train.eval_every=4", "train.checkpoint_every=2"]


def _train(tmp_path: Path, *extra: str) -> int:
    return main(["train", DEMO, *FAST, *extra, "--run-dir", str(tmp_path / "run"), "--no-eval"])


# -- item 11 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["train.batch_size", "train.unlabelled_batch_size", "train.iterations",
                                 "train.eval_every", "train.checkpoint_every"])
def test_non_positive_size_is_refused_before_a_run_directory_exists(tmp_path, capsys, key):
    assert _train(tmp_path, f"{key}=0") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and key in err and "positive" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_sentence(tmp_path, capsys):
    assert _train(tmp_path, "train.device=cuda") == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "train.device=cpu" in err and "Traceback" not in err


@pytest.mark.skipif(not SAMPLES.exists(), reason="shared samples not present")
def test_images_smaller_than_the_network_minimum(tmp_path, capsys):
    assert main(["train", str(REPO / "configs" / "fundus" / "supervised.yaml"), f"data.root={SAMPLES / 'Fundus'}",
                 "data.patch_size=8", "data.lb_num=1", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "data.patch_size" in err and "minimum input size" in err


def test_full_disk_names_the_file(tmp_path, capsys, monkeypatch):
    def no_space(obj, handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("medsemi.checkpoints.torch.save", no_space)
    assert _train(tmp_path) == 1
    err = capsys.readouterr().err
    assert "no space left on device while writing" in err and ".pt" in err and "Traceback" not in err


def test_read_only_output_folder(tmp_path, capsys, monkeypatch):
    real_mkdir = pathlib.Path.mkdir
    read_only = tmp_path / "ro"

    def mkdir(self, *args, **kwargs):
        if read_only in (self, *self.parents):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    code = main(["train", DEMO, *FAST, "--run-dir", str(read_only / "run"), "--no-eval"])
    assert code == 1
    err = capsys.readouterr().err
    assert "read-only" in err and str(read_only / "run") in err


def test_data_convert_into_a_non_empty_folder_needs_overwrite(tmp_path, capsys):
    data = tmp_path / "Fundus"
    assert main(["data", "synth", str(data), "--size", "32", "--train-per-domain", "2",
                 "--test-per-domain", "1"]) == 0
    out = tmp_path / "generic"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    args = ["data", "convert", str(data), str(out), "--format", "fundus", "--lb-num", "2"]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and (out / "keep.txt").read_text() == "user file"
    assert not (out / "imagesTr").exists()
    assert main([*args, "--overwrite"]) == 0 and (out / "imagesTr").is_dir()


def test_bench_compare_refuses_zero_seeds_with_its_own_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "compare", DEMO, "--seeds", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: medsemi bench compare" in err and "--seeds" in err and "positive" in err


def test_broken_pipe_exits_quietly(monkeypatch):
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["methods"]) == 1  # no exception escapes


# -- item 13 ---------------------------------------------------------------------------------------------------
def test_overrides_after_options(tmp_path):
    code = main(["train", DEMO, "--run-dir", str(tmp_path / "run"), *FAST, "--no-eval", "train.iterations=2"])
    assert code == 0
    assert "iterations: 2\n" in (tmp_path / "run" / "config.yaml").read_text()


def test_a_parse_error_prints_the_sub_command_usage(capsys):
    with pytest.raises(SystemExit):
        main(["train", DEMO, "--no-such-option"])
    err = capsys.readouterr().err
    assert err.startswith("usage: medsemi train") and "--no-such-option" in err


# -- items 15, 16 ----------------------------------------------------------------------------------------------
def test_default_threads_is_half_the_cpus_at_most_four(monkeypatch):
    from medsemi.engine import trainer

    for cpus, expected in ((1, 1), (2, 1), (4, 2), (16, 4)):
        monkeypatch.setattr(trainer.os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert trainer.default_threads() == expected


def test_plain_progress_lines_threads_and_resume_message(tmp_path, capsys):
    from medsemi.config import load_config
    from medsemi.engine.trainer import Trainer

    cfg = load_config(DEMO, [*FAST, "train.threads=1"])  # progress_bar stays true: stdout is not a TTY here
    Trainer(cfg, tmp_path / "run").fit(stop_after=2)
    out = capsys.readouterr().out
    assert "1 CPU thread(s)" in out and "\r" not in out
    line = next(x for x in out.splitlines() if x.startswith("iteration"))
    assert line.startswith("iteration 2/4 ") and "loss" in line and "it/s" in line and "ETA" in line
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-eval"]) == 0
    out = capsys.readouterr().out
    assert "resumed at iteration 2 of 4" in out and "iteration 4/4" in out
    log = (tmp_path / "run" / "train.log").read_text()
    assert "CPU thread(s)" in log and "resumed at iteration 2" in log


def test_bench_compare_shows_run_k_of_n_and_one_seed_has_no_spread(tmp_path, capsys):
    assert main(["bench", "compare", DEMO, *FAST, "--methods", "supervised", "--seeds", "2",
                 "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "run 1 of 2: supervised" in out and "run 2 of 2: supervised" in out and "ETA" in out
    assert "±" in (tmp_path / "cmp" / "comparison.md").read_text()
    from medsemi.workflows.compare import render_markdown

    row = {"protocol": "best_test", "method": "m", "scope": "macro", "class": "c", "mean": 0.5, "sd": 0.0}
    text = render_markdown([{**row, "metric": k, "n": 1} for k in ("dice", "jaccard", "hd95", "asd")],
                           ["m"], "best_test", "x")
    assert "±" not in text and "0.500" in text and "one seed" in text


def test_demo_ends_with_its_gain_table(tmp_path, capsys, monkeypatch):
    from medsemi.workflows import compare

    def fake_compare(config, methods, seeds, out, overrides):
        rows = []
        for m, v in (("supervised", 0.5), ("ustrun", 0.7)):
            report = Path(out) / f"{m}-seed0" / "report.md"
            report.parent.mkdir(parents=True)
            report.write_text("# r\n\n## best_test: x\n\n| table |\n\n## best_val: y\n")
            rows.append({"protocol": "best_test", "metric": "dice", "method": m, "scope": "macro", "mean": v})
        return {"rows": rows}

    monkeypatch.setattr(compare, "compare_methods", fake_compare)
    compare.run_demo(tmp_path, quick=True)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("Dice macro") and "gain +0.200" in last


# -- item 18 ---------------------------------------------------------------------------------------------------
def test_methods_shows_defaults_types_and_meanings_once(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "method.threshold" in out and "float = 0.95" in out
    ustrun = out.split("\nustrun:")[1].split("\n\n")[0]
    assert "the options of midss" in ustrun and "method.symgd" not in ustrun and "method.queue_length" in ustrun
    assert "module docstring" not in out  # every option has a one-line meaning
    for block in out.split("\n\n"):
        options = [line.split()[0] for line in block.splitlines() if line.startswith("  method.")]
        assert len(options) == len(set(options))


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_option_has_help_and_version(capsys):
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, f"{parser.prog} {action.dest} has no help text"
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("medsemi 0.")


@pytest.mark.skipif(not SAMPLES.exists(), reason="shared samples not present")
def test_data_check_json(capsys):
    assert main(["data", "check", str(SAMPLES / "Fundus"), "--format", "fundus", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["errors"] == [] and "Domain1" in json.dumps(report)


def test_data_check_versemi_prints_counts_shapes_spacing(tmp_path, capsys):
    import h5py

    for name in ("data0001", "data0002", "spleen_1"):
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f["image"] = np.zeros((32, 32, 16), np.float32)
            label = np.zeros((32, 32, 16), np.uint8)
            label[8:16, 8:16, 4:8] = 1
            f["label"] = label
            f.attrs["spacing"] = [0.8, 0.8, 2.5]
    assert main(["data", "check", str(tmp_path), "--format", "versemi"]) == 0
    out = capsys.readouterr().out
    assert "3 case(s)" in out and "32x32x16" in out and "0.8x0.8x2.5" in out
    assert "task 1" in out and "task 3" in out
    assert main(["data", "check", str(tmp_path), "--format", "versemi", "--json"]) == 0
    tasks = json.loads(capsys.readouterr().out)["tasks"]
    assert tasks["task 1"]["cases"] == 2 and tasks["task 1"]["shapes"] == [[32, 32, 16]]


def test_relative_config_paths_resolve_alike_in_train_and_bench(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # neither command finds configs/demo.yaml here, both find it in the repository
    assert main(["train", "configs/demo.yaml", "train.iteratons=1"]) == 2
    assert "train.iteratons" in capsys.readouterr().err
    assert main(["bench", "compare", "configs/demo.yaml", "train.iteratons=1"]) == 2
    assert "train.iteratons" in capsys.readouterr().err
    assert main(["train", "demo.yaml", "train.iteratons=1"]) == 2
    assert "train.iteratons" in capsys.readouterr().err
