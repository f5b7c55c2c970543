"""YAML <-> typed config: strict parsing, key=value overrides, round trip.

Unknown keys and ill-typed values are errors that name the dotted field, the bad value and what is
allowed. Static cross-field checks live in validate.py; this module only maps data to dataclasses.
It imports nothing from megatron_ddk but the schema and atomic.py.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from typing import Any, List, Literal, Optional, Sequence, Union

import yaml

from megatron_ddk.atomic import write_atomic
from megatron_ddk.config.schema import TEACHER_FROM_CHECKPOINT, RunConfig


class ConfigError(ValueError):
    """A user error in a config file or override; the message names the field."""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, where: str) -> Any:
    """Convert one parsed YAML value to the field type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:  # a mapping for a dataclass arm: its own errors keep the dotted name
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return _convert(value, arg, where)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: got {value!r}; expected {_type_name(tp)}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: got {value!r}; allowed values: "
                          + ", ".join(repr(a) for a in typing.get_args(tp)))
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: got {value!r}; expected {_type_name(tp)}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: got {value!r}; expected a mapping")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: got {value!r}; expected {_type_name(tp)}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: got {value!r}; expected {_type_name(tp)}")


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; "
                          f"known keys{' of ' + where if where else ''}: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in data:
            dotted = f"{where}.{name}" if where else name
            kwargs[name] = _convert(data[name], hints[name], dotted)
    return cls(**kwargs)


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _mapping_without_duplicates(loader, node, deep=False):
    lines = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
            continue
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        try:
            if key in lines:
                raise ConfigError(f"key {key!r} is given twice in one mapping (lines "
                                  f"{lines[key]} and {line}); keep one")
            lines[key] = line
        except TypeError:  # an unhashable key: SafeLoader's own error follows
            continue
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                              _mapping_without_duplicates)


def load_yaml(stream) -> Any:
    """yaml.safe_load, but a key given twice in one mapping is a ConfigError naming its lines."""
    return yaml.load(stream, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def to_dict(cfg) -> dict:
    """The config as plain data (YAML-safe)."""
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = {}
            node[key] = child
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: Sequence[str], top_level: bool = False) -> dict:
    """Apply `section.field=value` strings (values parsed as YAML) to plain config data;
    top_level=True also accepts `field=value` for top-level fields (pipeline configs)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.field=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or ("." not in key and not top_level):
            raise ConfigError(f"override {item!r}: the key must be section.field, "
                              f"e.g. train.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        _set_dotted(data, key, value)
    return data


def _default_teacher(data: dict) -> None:
    """distill.teacher_load set and distill.teacher not given: the teacher is from_checkpoint
    (models/teacher_config.py resolves it). An explicit `teacher: null` stays no teacher."""
    distill = data.get("distill")
    if isinstance(distill, dict) and distill.get("teacher_load") and "teacher" not in distill:
        distill["teacher"] = TEACHER_FROM_CHECKPOINT


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run YAML (or defaults when path is None), apply overrides, return a RunConfig.

    Only the schema is enforced here; call validate.static_checks for cross-field rules.
    """
    data: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} does not exist")
        with open(path) as f:
            try:
                loaded = load_yaml(f)
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
            except ConfigError as exc:
                raise ConfigError(f"config file {path}: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
        data = loaded or {}
    return config_from_data(data, overrides, path or "config")


def config_from_data(data: dict, overrides: Sequence[str] = (), where: str = ""
                     ) -> RunConfig:
    """A RunConfig from plain data (a parsed YAML file, or what the pipeline generates) and
    overrides; errors are prefixed with `where` when given. load_config's path after reading
    the file."""
    data = apply_overrides(copy.deepcopy(data), overrides)
    _default_teacher(data)
    try:
        return from_dict(RunConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None


def dump_config(cfg: RunConfig, path: str) -> None:
    """Write the resolved config as YAML, atomically (atomic.write_atomic)."""
    write_atomic(path, config_to_yaml(cfg))


def config_to_yaml(cfg: RunConfig) -> str:
    """The resolved config as a YAML string."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
