"""Configuration: nested dataclasses <- YAML <- dotted command-line overrides.

Every config in interleaf is a plain dataclass with a `validate()` method (`Config`).
`load_config(Cls, path, ["a.b=c"])` reads the YAML file, applies the overrides, type-checks every
value against the dataclass fields, calls each section's `validate()` and returns an instance.
Unknown keys, wrong types and values out of range raise `ConfigError` naming the dotted key.

The configs that ship with interleaf (model sizes, DeepSpeed JSONs, demo, BPE, VQ-GAN, training)
live inside the package, in `CONFIG_DIR`; the repository's top-level `configs/` is a link to that
folder. A relative `configs/...` path that does not exist where interleaf runs names the shipped
file, so the documented commands work from any folder once the package is installed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, Union, get_args, get_origin

import yaml

from interleaf.errors import ConfigError
from interleaf.utils import atomic_write, first_line, read_text


class Config(Protocol):
    """A config dataclass: `validate()` checks what the field types cannot say (ranges, combinations)
    and raises ConfigError naming the key. A section whose values its parent checks has an empty one."""

    def validate(self) -> None: ...


T = TypeVar("T", bound=Config)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def config_file(path: str | Path) -> Path:
    """`path` itself if it exists; else a relative `configs/...` path names the shipped file."""
    path = Path(path)
    if path.exists() or path.is_absolute() or path.parts[:1] != ("configs",):
        return path
    return CONFIG_DIR.joinpath(*path.parts[1:])


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping (a shipped config by its `configs/...` name, see `config_file`); a missing
    or malformed file is a ConfigError."""
    given, path = path, config_file(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {given}")
    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {first_line(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def parse_overrides(overrides: Sequence[str]) -> dict:
    """Turn ["optim.lr=3e-4", "model.n_layers=4"] into a nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def merge(base: dict, extra: dict) -> dict:
    """Deep-merge `extra` onto `base` (new dict; mappings merge, everything else replaces)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"config key '{key}': must be one of {choices}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key '{key}': expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        args = get_args(tp)
        if args:
            return {k: _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking keys and types recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown config key '{key}' (known here: {known})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], value, key)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        key = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ConfigError(f"config key '{key}' is required")
    obj = cls(**kwargs)
    obj.validate()
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain dict/list values, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """YAML file (optional) + dotted overrides -> validated dataclass instance."""
    data = read_yaml(path) if path is not None else {}
    data = merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def save_config(obj: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    with atomic_write(path) as f:
        yaml.safe_dump(to_dict(obj), f, sort_keys=False)
