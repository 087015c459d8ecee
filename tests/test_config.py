"""Config: YAML + dotted overrides, typed, unknown keys are errors naming the valid ones."""

import re
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


def test_channels_last_accepts_auto_and_old_booleans(tmp_path):
    import torch
    from torch import nn

    from medsemi.device import resolve_channels_last

    assert load_config(DEMO).model.channels_last == "auto"  # the default follows the device
    for given, expected in (("true", "true"), ("false", "false"), ("auto", "auto"), ("on", "true")):
        assert load_config(DEMO, [f"model.channels_last={given}"]).model.channels_last == expected
    for flag in ("true", "false"):  # configs written before the field took auto hold a YAML boolean
        path = tmp_path / f"old_{flag}.yaml"
        save_config(load_config(DEMO), path)
        text = re.sub(r"channels_last: .*", f"channels_last: {flag}", path.read_text())
        assert f"channels_last: {flag}\n" in text
        path.write_text(text)
        assert load_config(path).model.channels_last == flag
    with pytest.raises(ConfigError, match="model.channels_last"):
        load_config(DEMO, ["model.channels_last=maybe"])
    net2d, net3d = nn.Sequential(nn.Conv2d(1, 1, 3)), nn.Sequential(nn.Conv3d(1, 1, 3))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_channels_last("auto", cpu, net2d) is None
    assert resolve_channels_last("auto", cuda, net2d) is torch.channels_last
    assert resolve_channels_last("auto", cuda, net3d) is None
    assert resolve_channels_last("true", cpu, net3d) is torch.channels_last_3d
    assert resolve_channels_last(True, cpu, net2d) is torch.channels_last
    assert resolve_channels_last(False, cuda, net2d) is None


def test_override_text_is_read_by_the_field_type():
    cfg = load_config(DEMO, ["train.amp=off", "data.root=/data/a #b", "data.list_dir=on", "train.iterations=1e3",
                             "train.nesterov=yes", "train.deterministic=on", "train.progress_bar=0",
                             "data.options={crop: 96}", "data.options.repeats=3", "augment.brightness=[0.1, 2]",
                             "method.name=fixmatch", "method.teacher=student", "method.threshold=0.9"])
    assert cfg.train.amp == "off"  # YAML would have made it False
    assert cfg.data.root == "/data/a #b"  # YAML would have dropped the comment
    assert cfg.data.list_dir == "on"  # YAML would have made it True
    assert cfg.train.iterations == 1000 and isinstance(cfg.train.iterations, int)
    assert cfg.train.nesterov is True and cfg.train.deterministic is True and cfg.train.progress_bar is False
    assert cfg.data.options == {"crop": 96, "repeats": 3}  # free-form fields still parse YAML
    assert tuple(cfg.augment.brightness) == (0.1, 2.0)
    assert cfg.method.teacher == "student" and cfg.method.threshold == 0.9
    for bad in ("train.iterations=1.5e0", "train.nesterov=maybe", "train.lr=fast"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(DEMO, [bad])


@pytest.mark.parametrize("key", ["train.batch_size", "train.unlabelled_batch_size", "train.iterations",
                                 "train.eval_every", "train.checkpoint_every"])
def test_non_positive_sizes_are_refused_when_loading(key):
    for value in ("0", "-2"):
        with pytest.raises(ConfigError, match=f"{key} must be a positive integer"):
            load_config(DEMO, [f"{key}={value}"])
