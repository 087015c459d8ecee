"""Config: YAML + dotted overrides, typed, unknown keys are errors naming the valid ones."""

from pathlib import Path

import pytest

from medsemi.config import ConfigError, load_config, save_config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def test_overrides_are_typed():
    cfg = load_config(DEMO, ["train.iterations=200", "model.base_channels=16", "train.lr=1e-2",
                             "augment.brightness=[0.1, 2.0]", "train.progress_bar=false"])
    assert cfg.train.iterations == 200 and isinstance(cfg.train.iterations, int)
    assert cfg.model.base_channels == 16
    assert cfg.train.lr == 0.01
    assert tuple(cfg.augment.brightness) == (0.1, 2.0)
    assert cfg.train.progress_bar is False


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, ["train.iteration=5"])
    msg = str(err.value)
    assert "train.iteration" in msg and "iterations" in msg and "batch_size" in msg


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="train.iterations"):
        load_config(DEMO, ["train.iterations=abc"])
    with pytest.raises(ConfigError, match="integer"):
        load_config(DEMO, ["train.iterations=2.5"])


def test_method_options_are_validated():
    with pytest.raises(ConfigError, match="method.no_such_option"):
        load_config(DEMO, ["method.no_such_option=1"])
    with pytest.raises(ValueError, match="unknown method"):
        load_config(DEMO, ["method.name=nonexistent"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(DEMO, ["train.iterations=7"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
