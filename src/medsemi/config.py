"""Typed experiment configuration: dataclasses loaded from YAML, with dotted overrides.

``medsemi train configs/demo.yaml train.iterations=200 model.base_channels=16``

Every section is a dataclass; unknown keys are an error that lists the valid ones. The
``method`` section is validated against the options dataclass of the chosen method
(``methods/registry.py``), so ``method.threshold=0.9`` is checked like any other key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medsemi.data.augment import AugmentConfig


class ConfigError(ValueError):
    """A configuration problem, with a message that says how to fix it."""


@dataclass
class SyntheticSection:
    """The embedded synthetic mixed-domain 2D dataset (``data.format: synthetic``)."""

    kind: str = "multilabel"  # multilabel (fundus-like cup/disc) | exclusive (one organ)
    num_domains: int = 4
    train_per_domain: int = 40
    test_per_domain: int = 16
    seed: int = 0


@dataclass
class DataSection:
    format: str = "synthetic"  # synthetic | fundus | prostate | mnms | busi | generic | versemi | synthetic3d
    root: str = ""
    lb_domain: int = 1  # 1-based, as in the papers
    lb_num: int = 20
    lb_ratio: float = 0.0  # > 0: lb_num = int(lb_ratio * total training images), spec 1.2
    patch_size: int = 64
    val_fraction: float = 0.0  # > 0: a seeded per-domain validation split for honest model selection
    split_seed: int = 0
    list_dir: str = ""  # optional per-domain list files that fix the file order
    check: bool = True  # run `data check` before training and refuse data with errors
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)
    options: dict[str, Any] = field(default_factory=dict)  # format-specific extras (e.g. 3D crop size)


CHANNELS_LAST = ("auto", "true", "false")


@dataclass
class ModelSection:
    name: str = "unet2d"  # unet2d | vnet (plain single-task 3D) | versemi_vnet (task-prompted 3D)
    base_channels: int = 64
    dropout: float = 0.0  # > 0: Dropout on the bottleneck (and the VNet's last decoder feature); UA-MT uses 0.5
    # auto: channels-last memory format for 2D networks on CUDA, off on a CPU and for 3D networks;
    # true: channels-last (channels-last-3d for 3D networks); false: off. Same results either way.
    channels_last: str = "auto"

    def __post_init__(self) -> None:
        value = self.channels_last
        text = str(value).strip().lower()
        text = {"yes": "true", "on": "true", "1": "true", "no": "false", "off": "false", "0": "false"}.get(text, text)
        if text not in CHANNELS_LAST:
            raise ConfigError(f"model.channels_last: expected auto, true or false, got {value!r}")
        self.channels_last = text
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"model.dropout: expected a probability in [0, 1), got {self.dropout!r}")


@dataclass
class TrainSection:
    iterations: int = 30000
    batch_size: int = 4
    unlabelled_batch_size: int = 4
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)  # Adam
    schedule: str = "poly"  # poly | constant
    poly_power: float = 0.9
    ema_decay: float = 0.99
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | off | bf16 | fp16
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_every: int = 500  # also the "epoch" length of spec 1.3
    checkpoint_every: int = 500
    keep_every: int = 0  # > 0: also keep the student as checkpoints/iter_<k>.pt every keep_every iterations
    log_every: int = 20
    # a non-finite loss: stop (checked at each log interval, no per-step host sync) | skip_step (that
    # step's update is masked out on the device; a log interval whose every step was skipped stops)
    nonfinite: str = "stop"
    # CPU threads for torch's intra-op pool; 0 = automatic: min(4, the CPUs this process may use)
    threads: int = 0
    deterministic: bool = False
    progress_bar: bool = True
    tensorboard: bool = True


@dataclass
class EvalSection:
    batch_size: int = 8
    evaluate_teacher: bool = True
    surface_metrics: str = "final"  # final | every | never : when HD95/ASD are computed
    hd95: str = "medpy"  # medpy (pooled) | max_directed
    empty_prediction_penalty: float = 100.0
    gt_empty_policy: str = "skip"  # skip | penalty
    both_empty_score: float = 1.0
    overlays: int = 4  # prediction overlay images per domain in the report
    # model selection score: mean over classes of the macro per-class value of this metric;
    # smoothed_dice is what UST-RUN/MiDSS select on (spec 1.3), dice is medpy's
    selection_metric: str = "smoothed_dice"
    # AdaBN-style evaluation: BN statistics re-estimated per test domain on that domain's unlabelled
    # training images (evaluation/adabn.py). Not the papers' protocol; off by default.
    bn_adaptation: bool = False
    # precision of the periodic evaluation that picks best_*.pt: "off" = fp32, as the originals (their
    # test() runs outside autocast); "train" = the training autocast (train.amp). The final report is fp32.
    amp: str = "off"
    # smoothed Dice (the selection score) when prediction and ground truth are both empty: "ust" = 0,
    # "midss" = 1/1.001; "auto" = the method's own rule (MiDSS: midss; UST-RUN and the rest: ust; spec 3.4)
    smoothed_empty_rule: str = "auto"

    def __post_init__(self) -> None:
        if self.amp not in ("off", "train"):
            raise ConfigError(f"eval.amp must be off or train, got {self.amp!r}")
        if self.smoothed_empty_rule not in ("auto", "ust", "midss"):
            raise ConfigError(f"eval.smoothed_empty_rule must be auto, ust or midss, got {self.smoothed_empty_rule!r}")


@dataclass
class Config:
    name: str = "experiment"
    seed: int = 1337
    output_dir: str = "runs"
    data: DataSection = field(default_factory=DataSection)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    method: Any = None  # the chosen method's options dataclass (has a ``name`` field)
    eval: EvalSection = field(default_factory=EvalSection)


class OverrideText(str):
    """The text of a command-line override (``key=TEXT``), parsed only once the key's declared type is known."""


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NULL = ("null", "none", "~")


def _yaml_values(value: Any) -> Any:
    """Override texts inside a free-form value (``dict``/``list``/``Any`` fields) parsed as YAML."""
    if isinstance(value, OverrideText):
        return yaml.safe_load(value) if value.strip() else ""
    if isinstance(value, dict):
        return {k: _yaml_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml_values(v) for v in value]
    return value


def _coerce_text(text: str, tp: Any, where: str) -> Any:
    """An override's text read as the declared scalar type ``tp`` (str, bool, int or float)."""
    word = text.strip()
    if tp is str:
        return str(text)
    if tp is bool:
        if word.lower() in _TRUE or word.lower() in _FALSE:
            return word.lower() in _TRUE
        raise ConfigError(f"{where}: expected true/false (or yes/no, on/off, 1/0), got {text!r}")
    if tp is int:
        try:
            return int(word)
        except ValueError:
            pass
        try:
            number = float(word)
        except ValueError:
            number = math.nan
        if math.isfinite(number) and number == int(number):
            return int(number)  # 1e3, 200.0
        raise ConfigError(f"{where}: expected an integer, got {text!r}")
    try:
        return float(word)
    except ValueError:
        raise ConfigError(f"{where}: expected a number, got {text!r}") from None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value (or an override's text, :class:`OverrideText`) to the annotated type, or raise a
    ConfigError naming ``where``. Override text is read by the declared type: a ``str`` field takes it as
    written (``train.amp=off`` is "off"); ``dict``/``list``/``Any``/tuple/section values are parsed as YAML."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return _yaml_values(value)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, OverrideText) and value.strip().lower() in _NULL):
            return None
        return _coerce(value, args[0], where)
    if isinstance(value, OverrideText):
        if tp in (str, bool, int, float):
            return _coerce_text(value, tp, where)
        try:
            value = _yaml_values(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}: {str(value)!r} is not valid YAML ({err.problem})") from None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _yaml_values(dict(value))
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return _yaml_values(list(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (*_TRUE, *_FALSE):
            return value.lower() in _TRUE
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, str):
            return _coerce_text(value, int, where)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted off / on as a bool: train.amp=off, lq_mode=off
            return "on" if value else "off"
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _from_dict(cls: type, raw: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(repr(where + '.' + k if where else k) for k in unknown)}; "
            f"valid keys{' of ' + where if where else ''}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**kwargs)


def _method_options(raw: dict | None) -> Any:
    from medsemi.methods.registry import get_method  # late import: methods import config types

    raw = dict(raw or {"name": "supervised"})
    name = raw.get("name", "supervised")
    method_cls = get_method(name)
    raw["name"] = name
    return _from_dict(method_cls.Options, raw, "method")


def apply_preset(raw: dict, method_raw: dict) -> list[str]:
    """Fill in the settings of ``method.preset`` (``paper`` | ``released``) that the config does not set.

    Resolution rule: a key written in the YAML file or given as an override always wins; the preset only
    supplies the keys left out (its table is ``Method.presets``: ``method.*`` options and ``train.*`` values
    such as ``train.amp``, which the method itself cannot see). Without ``method.preset`` the method's
    options default applies (``paper``). Mutates ``raw`` / ``method_raw`` (copies made by the caller) and
    returns one note per explicit key that differs from the preset (the key kept its explicit value).
    """
    from medsemi.methods.registry import get_method  # late import: methods import config types

    method_cls = get_method(method_raw.get("name", "supervised"))
    field_names = {f.name: f for f in dataclasses.fields(method_cls.Options)}
    if "preset" not in field_names:
        if "preset" in method_raw:
            raise ConfigError(f"method.preset: method {method_cls.name!r} has no presets "
                              "(ustrun, midss, versemi and versemi_supervised have paper | released)")
        return []
    preset = method_raw.get("preset", field_names["preset"].default)
    if preset not in method_cls.presets:
        raise ConfigError(f"method.preset must be one of {sorted(method_cls.presets)} for method "
                          f"{method_cls.name!r}, got {preset!r}")
    notes = []
    for section, values in method_cls.presets[preset].items():
        if section == "method":
            target = method_raw
        else:
            node = raw.get(section)
            if node is not None and not isinstance(node, dict):
                raise ConfigError(f"{section}: expected a mapping, got {node!r}")
            target = raw[section] = dict(node or {})
        for key, value in values.items():
            if key not in target:
                target[key] = value
            elif target[key] != value:
                notes.append(f"{section}.{key}={target[key]!r} is set explicitly and wins over "
                             f"method.preset={preset} ({section}.{key}={value!r})")
    return notes


def config_from_dict(raw: dict, notes: list[str] | None = None) -> Config:
    """A validated :class:`Config` from a plain mapping; ``method.preset`` is resolved first
    (:func:`apply_preset`); ``notes`` (when given) receives one line per explicit key that overrides an
    explicitly chosen preset (``medsemi train`` prints them)."""
    raw = dict(raw or {})
    method_raw = dict(raw.pop("method", None) or {"name": "supervised"})
    explicit = "preset" in method_raw
    found = apply_preset(raw, method_raw)
    if notes is not None and explicit:
        notes.extend(found)
    cfg = _from_dict(Config, raw, "")
    cfg.method = _method_options(method_raw)
    validate(cfg)
    return cfg


POSITIVE_KEYS = ("train.iterations", "train.batch_size", "train.unlabelled_batch_size", "train.eval_every",
                 "train.checkpoint_every", "train.log_every", "eval.batch_size")


def validate(cfg: Config) -> None:
    """Refuse values no run can use (checked when the config is loaded, before any run directory is made)."""
    for key in POSITIVE_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {value}")
    if cfg.train.threads < 0:
        raise ConfigError(f"train.threads must be 0 (automatic) or a positive number of CPU threads, "
                          f"got {cfg.train.threads}")


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if isinstance(child, OverrideText):  # a.b={x: 1} then a.b.y=2
            with contextlib.suppress(yaml.YAMLError):
                parsed = yaml.safe_load(child)
                if isinstance(parsed, dict):
                    child = node[part] = parsed
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, OverrideText]]:
    """``["a.b=3", "c=on"]`` -> ``[("a.b", "3"), ("c", "on")]``: the text after the first ``=``, kept as written
    (:class:`OverrideText`) until the config is built, where each value is read by its field's declared type."""
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        parsed.append((key.strip(), OverrideText(text)))
    return parsed


def find_config(path: str | Path) -> Path:
    """A config path as ``train`` and ``bench compare`` both read it: as given (relative to the current folder),
    else relative to the repository checkout, else to its ``configs/`` folder."""
    path = Path(path)
    if path.is_file():
        return path
    repo = Path(__file__).resolve().parents[2]
    for candidate in (repo / path, repo / "configs" / path):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {path} (looked in the current folder, {repo} and {repo / 'configs'})")


def load_config(path: str | Path | None, overrides: list[str] | None = None, notes: list[str] | None = None,
                replace_method: bool = False) -> Config:
    """Load a YAML config, apply dotted overrides, resolve ``method.preset`` and validate every key and type
    (``notes``: see :func:`config_from_dict`).

    ``replace_method``: ignore the file's ``method`` section (the overrides then give the method and its
    options), e.g. to train another method on a config written for one."""
    return config_from_dict(read_raw_config(path, overrides, replace_method), notes)


def read_raw_config(path: str | Path | None, overrides: list[str] | None = None, replace_method: bool = False
                    ) -> dict:
    """The YAML mapping of ``path`` with the dotted overrides applied, not yet validated (``replace_method``:
    see :func:`load_config`)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    if replace_method:
        raw.pop("method", None)
    return apply_overrides(raw, overrides)


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Set dotted ``key=value`` overrides in a raw config mapping (in place; returned for chaining)."""
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    return raw


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every setting that differs, sorted by key."""
    a, b = _flat(config_to_dict(old)), _flat(config_to_dict(new))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(_plain(config_to_dict(cfg)), sort_keys=False))
