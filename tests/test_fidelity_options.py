"""Evaluation as the papers do it (precision, smoothed-Dice empty rule, ramp rounding) and the
``method.preset=paper|released`` switch (issue 12, sections 2-3; spec ust-run.md 1.5, 3.4 and addendum)."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from medsemi.config import ConfigError, load_config
from medsemi.engine.trainer import Trainer
from medsemi.families.base import eval_policy
from medsemi.metrics import smoothed_dice
from medsemi.schedules import consistency_weight, sigmoid_rampup
from medsemi.workflows.compare import config_for_method

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
FUNDUS_UST = REPO / "configs" / "fundus" / "ustrun.yaml"
VERSEMI_20 = REPO / "configs" / "versemi" / "versemi_20.yaml"


# ----------------------------------------------------------------------------- ramp
def test_ramp_is_python_float_floor_division():
    # max/200 = 5.025 is not exact: 201 / 5.025 rounds to 40.0, but 201 // 5.025 is 39.0 (as the original)
    assert 201 // (1005 / 200) == 39.0 and math.floor(201 / (1005 / 200)) == 40
    assert consistency_weight(201, 1005) == sigmoid_rampup(39, 200)
    assert consistency_weight(201, 1005) != sigmoid_rampup(40, 200)
    for max_it in (1005, 1006, 1008, 30000, 60000):  # every step agrees with the original's expression
        for k in range(0, max_it, 7):
            phase = 1.0 - min(max(k // (max_it / 200), 0), 200) / 200  # utils/ramps.py sigmoid_rampup
            assert consistency_weight(k, max_it) == math.exp(-5.0 * phase * phase)


# ----------------------------------------------------------------------------- smoothed-Dice empty rule
@pytest.mark.parametrize(("method", "rule", "both_empty"), [("midss", "midss", 1 / 1.001), ("ustrun", "ust", 0.0),
                                                            ("supervised", "ust", 0.0)])
def test_auto_empty_rule_follows_the_method(method, rule, both_empty):
    cfg = load_config(DEMO, [f"method.name={method}"])
    assert cfg.eval.smoothed_empty_rule == "auto"
    policy = eval_policy(cfg)
    assert policy.smoothed_empty_rule == rule
    empty = torch.zeros(8, 8, dtype=torch.bool).numpy()
    assert smoothed_dice(empty, empty, policy.smoothed_empty_rule) == pytest.approx(both_empty)


@pytest.mark.parametrize("explicit", ["ust", "midss"])
def test_explicit_empty_rule_wins(explicit):
    for method in ("midss", "ustrun"):
        cfg = load_config(DEMO, [f"method.name={method}", f"eval.smoothed_empty_rule={explicit}"])
        assert eval_policy(cfg).smoothed_empty_rule == explicit


def test_bad_eval_values_are_refused():
    with pytest.raises(ConfigError, match="eval.smoothed_empty_rule"):
        load_config(DEMO, ["eval.smoothed_empty_rule=medpy"])
    with pytest.raises(ConfigError, match="eval.amp"):
        load_config(DEMO, ["eval.amp=bf16"])


# ----------------------------------------------------------------------------- evaluation precision
@pytest.mark.parametrize(("eval_amp", "expected"), [("off", "off"), ("train", "bf16")])
def test_periodic_evaluation_precision(tmp_path, tiny_overrides, eval_amp, expected):
    cfg = load_config(DEMO, [*tiny_overrides, "train.amp=bf16", f"eval.amp={eval_amp}", "train.iterations=2",
                             "train.eval_every=2", "train.checkpoint_every=2"])
    tr = Trainer(cfg, tmp_path / "run")
    assert tr.amp == "bf16"  # training autocasts
    seen = []
    real = tr.family.evaluate

    def spy(nets, cfg, device, surface=False, amp="off", validation=True):
        seen.append(amp)
        return real(nets, cfg, device, surface=surface, amp=amp, validation=validation)

    tr.family.evaluate = spy
    tr.fit()
    assert seen == [expected]
    assert (tmp_path / "run" / "checkpoints" / "best_test.pt").exists()


# ----------------------------------------------------------------------------- presets
def test_ustrun_presets():
    paper = load_config(DEMO, ["method.name=ustrun"])
    assert paper.method.preset == "paper" and paper.method.lq_mode == "loss" and paper.train.amp == "auto"
    rel = load_config(DEMO, ["method.name=ustrun", "method.preset=released"])
    assert rel.method.lq_mode == "forward_only" and rel.train.amp == "fp16"


def test_midss_released_is_fp16_with_scaler(tmp_path, tiny_overrides):
    cfg = load_config(DEMO, [*tiny_overrides, "method.name=midss", "method.preset=released"])
    assert cfg.train.amp == "fp16"
    assert load_config(DEMO, ["method.name=midss"]).train.amp == "auto"
    tr = Trainer(cfg, tmp_path / "run")  # the engine pairs fp16 with a GradScaler
    assert tr.amp == "fp16" and tr.scaler.is_enabled()


def test_explicit_keys_win_over_the_preset():
    notes: list[str] = []
    cfg = load_config(DEMO, ["method.name=ustrun", "method.preset=released", "method.lq_mode=loss",
                             "train.amp=bf16"], notes)
    assert cfg.method.lq_mode == "loss" and cfg.train.amp == "bf16"
    assert len(notes) == 2 and any("method.lq_mode='loss'" in n for n in notes)
    # a dataset config writes lq_mode: the preset alone does not change it, both together do
    cfg = load_config(FUNDUS_UST, ["method.preset=released"])
    assert cfg.method.lq_mode == "loss" and cfg.train.amp == "fp16"
    cfg = load_config(FUNDUS_UST, ["method.preset=released", "method.lq_mode=forward_only"])
    assert cfg.method.lq_mode == "forward_only"
    # no preset written: nothing to report, even where options differ from the paper preset
    notes = []
    load_config(DEMO, ["method.name=ustrun", "method.lq_mode=off"], notes)
    assert notes == []


def test_versemi_presets():
    paper = load_config(VERSEMI_20)
    assert (paper.method.pipeline, paper.method.compat_cons_broadcast, paper.method.reset_optimizer_at_stage2) == (
        "two_stage", False, True)
    rel = load_config(VERSEMI_20, ["method.preset=released", "method.pipeline=released_main"])
    assert rel.method.stage1_only and rel.method.compat_cons_broadcast
    assert not rel.method.reset_optimizer_at_stage2 and rel.train.amp == "off" and rel.method.bn_update_per_query
    assert not paper.method.bn_update_per_query
    # the config writes pipeline: two_stage, which wins; the rest of the released preset applies
    both = load_config(VERSEMI_20, ["method.preset=released"])
    assert both.method.pipeline == "two_stage" and both.method.compat_cons_broadcast
    assert not both.method.reset_optimizer_at_stage2
    plain = load_config(None, ["method.name=versemi", "method.preset=released", "data.format=synthetic3d",
                               "model.name=versemi_vnet"])
    assert plain.method.pipeline == "released_main"
    sup = load_config(None, ["method.name=versemi_supervised", "method.preset=released"])
    assert sup.method.pipeline == "supervised"


def test_preset_errors():
    with pytest.raises(ConfigError, match="method.preset must be one of"):
        load_config(DEMO, ["method.name=ustrun", "method.preset=github"])
    with pytest.raises(ConfigError, match="has no presets"):
        load_config(DEMO, ["method.name=supervised", "method.preset=released"])


def test_saved_config_reloads_to_the_same_settings(tmp_path):
    from medsemi.config import save_config

    cfg = load_config(DEMO, ["method.name=ustrun", "method.preset=released"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_dataset_configs_state_preset_and_lq_mode():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        method = (yaml.safe_load(path.read_text()) or {}).get("method") or {}
        if method.get("name") in ("ustrun", "midss", "versemi", "versemi_supervised"):
            assert method.get("preset") in ("paper", "released"), path
        if method.get("name") == "ustrun":
            assert method.get("lq_mode") in ("loss", "forward_only"), path
    assert yaml.safe_load((REPO / "configs" / "versemi" / "released_main.yaml").read_text())["method"][
        "preset"] == "released"


def test_compare_drops_options_another_method_does_not_have():
    cfg = config_for_method(FUNDUS_UST, "supervised", [])
    assert cfg.method.name == "supervised"
    cfg = config_for_method(FUNDUS_UST, "ustrun:preset=released:lq_mode=forward_only", [])
    assert cfg.method.lq_mode == "forward_only" and cfg.train.amp == "fp16"
    cfg = config_for_method(FUNDUS_UST, "midss:preset=released", [])
    assert cfg.method.name == "midss" and cfg.train.amp == "fp16"
    with pytest.raises(ConfigError, match="lq_mode"):  # an explicit override is never dropped
        config_for_method(FUNDUS_UST, "supervised", ["method.lq_mode=loss"])
