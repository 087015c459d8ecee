"""benchmarks/train_speed.py: a tiny run through its main(), JSON layout and recorded network calls."""

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load():
    if "medsemi_bench_train_speed" in sys.modules:
        return sys.modules["medsemi_bench_train_speed"]
    spec = importlib.util.spec_from_file_location("medsemi_bench_train_speed",
                                                  REPO / "benchmarks" / "train_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_train_speed_tiny_run(tmp_path):
    ts = _load()
    out = tmp_path / "bench.json"
    b = 2
    report = ts.main(["--size", "32", "--base-channels", "4", "--batch", str(b), "--iters", "1",
                      "--warmup", "0", "--methods", "supervised,ustrun:grouped", "--kinds", "multilabel",
                      "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert {"device", "device_type", "torch", "cuda", "python", "settings", "results"} <= set(saved)
    assert saved["device_type"] == "cpu"
    settings = saved["settings"]
    assert settings["size"] == 32 and settings["base_channels"] == 4 and settings["batch"] == b
    assert settings["amp_resolved"] == "off" and settings["kinds"] == ["multilabel"]
    results = saved["results"]
    assert [r["variant"] for r in results] == ["supervised", "ustrun[grouped]"]
    for r in results:
        assert r["error"] is None, r["error"]
        assert r["ms_per_iter"] > 0 and r["floor_ms_per_iter"] > 0
        assert r["it_per_s"] == pytest.approx(1000 / r["ms_per_iter"])
        assert r["ratio_to_floor"] == pytest.approx(r["ms_per_iter"] / r["floor_ms_per_iter"])
        assert r["sync_free"] is None  # only checked on CUDA
    calls = [(c["role"], c["shape"][0], c["grad"]) for c in results[0]["calls"]]
    assert calls == [("student", b, True)]
    # UST-RUN, grouped: the 3 teacher calls fused (no grad), the hardness call, and the 4 student calls
    # plus the unreliable sample fused (spec ust-run.md 4.3)
    calls = [(c["role"], c["shape"][0], c["grad"]) for c in results[1]["calls"]]
    assert calls == [("teacher", 3 * b, False), ("student", b, False), ("student", 4 * b + 1, True)]
    assert results[1]["calls"][0]["shape"] == [3 * b, 3, 32, 32]


def test_variants_expand_forward_modes():
    ts = _load()
    from medsemi.methods.intermediate import FORWARD_MODES

    labels = [v.label for v in ts.variants(ts.parse_args(["--methods", "bcp,midss"]))]
    assert labels == ["bcp"] + [f"midss[{m}]" for m in FORWARD_MODES]
    labels = [v.label for v in ts.variants(ts.parse_args(["--methods", "ustrun", "--grouped-norm", "one_pass"]))]
    assert labels == ["ustrun[separate]", "ustrun[fused]", "ustrun[grouped/one_pass]"]
    variant = ts.Variant("ustrun", "grouped", "one_pass")
    cfg = ts.make_config(ts.parse_args(["--size", "32"]), "exclusive", variant, "off")
    assert cfg.method.forward_mode == "grouped" and cfg.method.grouped_norm == "one_pass"
    with pytest.raises(SystemExit, match="unknown method"):
        ts.variants(ts.parse_args(["--methods", "nope"]))
    with pytest.raises(SystemExit, match="forward modes exist only"):
        ts.variants(ts.parse_args(["--methods", "supervised:fused"]))


def test_versemi_speed_tiny_run(tmp_path):
    spec = importlib.util.spec_from_file_location("medsemi_bench_versemi_speed",
                                                  REPO / "benchmarks" / "versemi_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "v.json"
    result = module.main(["--size", "32", "--base-filters", "2", "--batch", "2", "--queries", "3",
                          "--iters", "1", "--warmup", "0", "--device", "cpu", "--channels-last", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["ms_shared"] > 0 and saved["ms_naive"] > 0
    assert saved["ms_stage1"] > 0 and saved["ms_stage2"] > 0 and saved["settings"]["channels_last"] is True
    assert saved["it_per_s_stage1"] == pytest.approx(1000.0 / saved["ms_stage1"])
    assert saved["speedup"] == pytest.approx(result["ms_naive"] / result["ms_shared"])


def test_train_speed_pool_reports_the_data_cost(tmp_path):
    ts = _load()
    report = ts.main(["--size", "32", "--base-channels", "2", "--batch", "2", "--iters", "2", "--warmup", "0",
                      "--methods", "fixmatch", "--kinds", "exclusive", "--device", "cpu", "--data", "pool",
                      "--no-floor"])
    r = report["results"][0]
    assert r["error"] is None, r["error"]
    assert 0 < r["data_ms_per_iter"] and r["data_fraction"] == pytest.approx(r["data_ms_per_iter"] / r["ms_per_iter"])
    assert report["settings"]["channels_last"] == "auto"
    random = ts.main(["--size", "32", "--base-channels", "2", "--batch", "2", "--iters", "1", "--warmup", "0",
                      "--methods", "supervised", "--kinds", "exclusive", "--device", "cpu", "--no-floor"])
    assert random["results"][0]["data_ms_per_iter"] is None  # fixed device batches: nothing drawn


def test_grouped_overhead_tiny_run(tmp_path):
    """benchmarks/grouped_overhead.py: interleaved fused / grouped steps, medians and per-round ratios."""
    _load()  # train_speed.py, which grouped_overhead.py imports from beside it
    spec = importlib.util.spec_from_file_location("medsemi_bench_grouped_overhead",
                                                  REPO / "benchmarks" / "grouped_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "g.json"
    report = module.main(["--size", "32", "--base-channels", "2", "--batch", "2", "--rounds", "2", "--warmup", "1",
                          "--methods", "ustrun", "--kinds", "exclusive", "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    (res,) = saved["results"]
    assert res["method"] == "ustrun" and res["kind"] == "exclusive"
    assert set(res["ms"]) == set(module.VARIANTS) and all(v > 0 for v in res["ms"].values())
    assert set(res["ratio_to_fused"]) == {"grouped/interleaved", "grouped/loop", "grouped/one_pass"}
    assert all(v > 0 for v in res["ratio_to_fused"].values())
    with pytest.raises(SystemExit, match="--variants"):
        module.main(["--variants", "grouped/fast"])


def _bench_module(name):
    _load()  # train_speed.py, which the others import from beside them
    key = f"medsemi_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def test_gpu_checks_script_parses_and_its_benchmark_options_exist():
    """benchmarks/gpu_checks.sh is run once on a lent GPU, with no time to fix it there: bash accepts it,
    and every benchmark command in it, with the QUICK sizes, is accepted by that benchmark's parser."""
    path = REPO / "benchmarks" / "gpu_checks.sh"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    script = path.read_text().replace("\\\n", " ")
    quick = dict(kv.split("=", 1) for kv in re.search(r"DEVICE=cpu[^\n]*", script).group(0).split())
    commands = re.findall(r"benchmarks/(\w+)\.py ([^\n]*)", script)
    assert {name for name, _ in commands} == {"grouped_overhead", "train_speed", "versemi_speed"}
    for name, args in commands:
        for var, value in quick.items():
            args = args.replace(f'"${var}"', value)
        argv = shlex.split(args.replace("$OUT", str(REPO / "gpu_checks")))
        assert not [a for a in argv if "$" in a], (name, argv)
        _bench_module(name).parse_args(argv)


def test_grouped_overhead_skips_interleaved_with_channels_last(capsys):
    module = _bench_module("grouped_overhead")
    report = module.main(["--size", "32", "--base-channels", "2", "--batch", "2", "--rounds", "1", "--warmup", "0",
                          "--methods", "midss", "--kinds", "exclusive", "--device", "cpu", "--channels-last", "true",
                          "--variants", "fused,grouped/interleaved"])
    assert "grouped/interleaved skipped" in capsys.readouterr().out
    assert set(report["results"][0]["ms"]) == {"fused"}
