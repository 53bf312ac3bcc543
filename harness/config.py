"""Typed configuration: one dataclass per concern, TOML files, and ``--set key=value`` overrides.

A config file lists only what differs from the defaults below. Overrides are dotted paths
(``--set optim.lr=0.001``, ``--set model.args.final_lambda=0.02``); values are parsed as TOML
literals (``3``, ``0.5``, ``true``, ``"text"`` or bare text) and checked against the field's type.
Unknown keys and wrong types are errors that name the key and the expected type.
``model.args`` is a free table of constructor keyword arguments, checked by the model constructor.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import CapsbenchError


class ConfigError(CapsbenchError, ValueError):
    """A config file or override that does not fit the schema."""


# ---------------------------------------------------------------------------------------------
# the run configuration used by `python -m harness.train`
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name: str = "em_capsnet_small"  # a registered model (models.list_models())
    args: dict[str, Any] = field(default_factory=dict)  # constructor kwargs, e.g. final_lambda, dropout


@dataclass
class DataConfig:
    name: str = "synthnorb"  # a registered dataset (harness.data.list_datasets())
    root: str = ""  # folder with the dataset's files; "" = $CAPSBENCH_DATA/<name>
    view: str = "none"  # none | azimuth | elevation: the paper's novel-viewpoint split
    channels: int = 1  # 1, or 2 for smallNORB's stereo pair
    val_fraction: float = 0.1  # held out from the training files (never the test files)
    limit_train: int = 0  # use only this many training images (0 = all); for quick runs
    limit_test: int = 0  # evaluate on only this many test images (0 = all)
    augment: bool = True  # the dataset's training augmentation (NORB: random crop + jitter)
    batch_size: int = 32
    eval_batch_size: int = 128


@dataclass
class OptimConfig:
    optimizer: str = "adam"  # adam | adamw
    lr: float = 0.0  # 0 = the model's default_lr (capsules 3e-3, CNNs 1e-3); the run logs the value used
    weight_decay: float = 0.0
    schedule: str = "auto"  # auto: the model's | cosine: lr -> 0 over train.epochs | exponential: × lr_decay
    schedule_epochs: int = 0  # the cosine's length (0 = train.epochs); a study trial runs its final's start
    lr_decay: float = 0.8  # the exponential schedule's decay per epoch (docs/capsule_recipe.md)


@dataclass
class LossConfig:
    name: str = "auto"  # auto (the model's default) | spread | cross_entropy
    margin_schedule: str = "linear"  # linear (seed article) | sigmoid (official code) | constant
    margin_start: float = 0.2
    margin_end: float = 0.9
    margin_ramp_epochs: float = 7.0  # epochs to go from start to end


@dataclass
class TrainConfig:
    epochs: int = 10
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # fp32 | bf16 (autocast on CUDA; EM routing stays float32)
    compile: bool = False  # torch.compile the model
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms
    multicrop: bool = False  # also report multi-crop test error at the end
    threads: int = 0  # torch CPU threads (0 = torch's default)
    save_every: int = 1  # keep checkpoints/model_epoch_{k}.pt every this many epochs (0 = never)
    system_metrics: bool = True  # sample CPU/GPU/memory into the MLflow run (system/* metrics)


@dataclass
class RunConfig:
    experiment: str = "capsbench"  # MLflow experiment
    run_name: str = ""  # "" = <model>-<data>[-<view>]
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------
# generic machinery: dict <-> dataclass, TOML, overrides, flattening
# ---------------------------------------------------------------------------------------------


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) dict, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"[{path}]" if path else "top level"
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; allowed: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, _join(path, k)) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def merge(cfg: Any, data: dict[str, Any], path: str = "") -> Any:
    """A copy of ``cfg`` with the (nested, partial) dict ``data`` applied on top."""
    return from_dict(type(cfg), deep_merged(to_dict(cfg), data), path)


def deep_merged(base: Any, new: Any) -> Any:
    """``new`` laid over ``base``: nested dicts merge key by key, anything else in ``new`` wins."""
    if not (isinstance(base, dict) and isinstance(new, dict)):
        return new
    return {**base, **{k: deep_merged(base.get(k), v) for k, v in new.items()}}


def check_model_name(name: str, key: str = "model.name") -> None:
    """A ConfigError naming the closest registered models when ``name`` is not one."""
    import models

    try:
        models.check_model_name(name)
    except models.UnknownModelError as e:
        raise ConfigError(f"{key}: {e}") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML ({e}); fix the file") from e


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3). The value is a TOML literal, or a bare string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. optim.lr=0.001")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def overrides_to_dict(overrides: list[str]) -> dict[str, Any]:
    """Nested dict from a list of ``key=value`` overrides."""
    out: dict[str, Any] = {}
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r} conflicts with another override of {k!r}")
        node[keys[-1]] = value
    return out


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply ``--set`` overrides; unknown keys and wrong types raise ConfigError."""
    return merge(cfg, overrides_to_dict(overrides)) if overrides else cfg


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Defaults <- TOML file <- overrides."""
    cfg = cls()
    if path:
        cfg = merge(cfg, load_toml(path), "")
    return apply_overrides(cfg, overrides or [])


# Keys added after runs were recorded, at the value such a run trained with (its record lacks them).
ADDED_SINCE_RECORDED = {"optim": {"schedule": "exponential", "schedule_epochs": 0}}


def recorded_config(data: dict[str, Any]) -> dict[str, Any]:
    """A run's recorded config (nested dict) with every key added since, at the value it trained with."""
    return deep_merged(ADDED_SINCE_RECORDED, data)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 0.003, "model.args.final_lambda": 0.01, ...}`` for logging as params."""
    data = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = _join(prefix, k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def dumps_toml(data: dict[str, Any]) -> str:
    """Serialise a nested dict of plain values as TOML (tables after scalars)."""
    lines: list[str] = []
    _dump_table(data, [], lines)
    return "\n".join(lines).lstrip() + "\n"


# ---------------------------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table, got {value!r}")
        return dict(value)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):  # "a,b,c" from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if v is None:
        return '""'
    return repr(v)


def _dump_table(data: dict, path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if path and (scalars or not tables):
        lines.append(f"\n[{'.'.join(path)}]")
    for k, v in scalars.items():
        lines.append(f"{k} = {_fmt(v)}")
    for k, v in tables.items():
        _dump_table(v, [*path, k], lines)
