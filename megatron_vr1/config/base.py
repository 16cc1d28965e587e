"""Shared helpers for the config dataclasses: validation errors that name the field and the fix,
conversion to plain dicts, and typed ``--set a.b=c`` overrides."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, get_args, get_origin


class ConfigError(ValueError):
    """A config value is invalid. The message names the field, the value and the fix."""


def require(ok: bool, field: str, value: Any, fix: str) -> None:
    """Raise ConfigError unless ``ok``: ``<field>=<value> is invalid: <fix>``."""
    if not ok:
        raise ConfigError(f"{field}={value!r} is invalid: {fix}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-serialisable dict of a (nested) config dataclass."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from ``to_dict`` output; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {}
    for name, v in data.items():
        t = hints[name]
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            v = from_dict(t, v)
        elif isinstance(v, list) and any(get_origin(a) is tuple or a is tuple for a in (t, *get_args(t))):
            v = tuple(v)  # JSON has no tuples; also for ``tuple[...] | None`` fields
        kwargs[name] = v
    return cls(**kwargs)


def _parse_scalar(text: str, t: Any, path: str) -> Any:
    origin = get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = get_args(t)
        if type(None) in args and text.lower() in ("none", "null"):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _parse_scalar(text, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"--set {path}={text}: cannot be read as {t}: {'; '.join(errors)}")
    if origin is Literal:
        choices = get_args(t)
        for c in choices:
            if str(c) == text:
                return c
        raise ConfigError(f"--set {path}={text}: must be one of {list(choices)}")
    if origin in (tuple, list):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError:
            raw = [s for s in text.strip("[]()").split(",") if s.strip()]
        if not isinstance(raw, list):
            raw = [raw]
        args = get_args(t)
        elem = args[0] if args else str
        vals = [_parse_scalar(str(x).strip(), elem, path) for x in raw]
        return tuple(vals) if origin is tuple else vals
    if t is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--set {path}={text}: expected a boolean (true/false)")
    if t is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--set {path}={text}: expected an integer") from None
    if t is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--set {path}={text}: expected a number") from None
    if t is str:
        return text
    if t is typing.Any:
        return text
    raise ConfigError(f"--set {path}: fields of type {t} cannot be set from the command line")


def apply_override(cfg: Any, assignment: str) -> Any:
    """Return a copy of ``cfg`` with ``a.b.c=value`` applied, type-checked and re-validated."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected the form section.field=value")
    path, text = assignment.split("=", 1)
    parts = path.strip().split(".")
    return _set_path(cfg, parts, text.strip(), path)


def _set_path(cfg: Any, parts: list[str], text: str, full: str) -> Any:
    name = parts[0]
    names = [f.name for f in dataclasses.fields(cfg)]
    if name not in names:
        raise ConfigError(f"--set {full}: {type(cfg).__name__} has no field {name!r}; fields: {names}")
    current = getattr(cfg, name)
    if len(parts) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"--set {full}: {name!r} is not a section")
        new = _set_path(current, parts[1:], text, full)
    else:
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"--set {full}: {name!r} is a section; set one of its fields")
        new = _parse_scalar(text, typing.get_type_hints(type(cfg))[name], full)
    return dataclasses.replace(cfg, **{name: new})
