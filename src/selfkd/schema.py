"""Typed mappings: check a value against a type annotation and build a dataclass from a mapping.

Generic schema code shared by the config sections (:mod:`selfkd.config`), ``data.mix``
(:mod:`selfkd.mixspec`) and every method's ``Params`` (:mod:`selfkd.methods.base`). Errors are
one-line :class:`~selfkd.errors.ConfigError` messages that name the dotted key and, for unknown
keys and values, the close matches. A leaf: it imports only :mod:`selfkd.errors` and
:mod:`selfkd.registry`'s ``close_matches``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from selfkd.errors import ConfigError
from selfkd.registry import close_matches

__all__ = ["build_dataclass", "coerce"]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int -> float allowed); ConfigError if not."""
    origin = typing.get_origin(tp)
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
                return coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(
            f"{key} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}"
        )
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping (key: value), got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "5e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def build_dataclass(
    cls: type,
    data: Any,
    prefix: str,
    choices: Mapping[str, tuple[str, ...]] | None = None,
    convert: Callable[[str, Any], Any] | None = None,
) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types.

    ``choices`` maps dotted keys (``prefix.key``) to their allowed values (an empty tuple: any);
    ``convert(dotted_key, value)`` may rewrite a value before its type is checked (the config's
    YAML-1.1 ``off`` booleans, a single name for a list).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(
                f"unknown key {prefix}.{key}{close_matches(str(key), names)}; "
                f"valid keys: {', '.join(names)}"
            )
        full = f"{prefix}.{key}"
        allowed = (choices or {}).get(full)
        if convert is not None:
            value = convert(full, value)
        value = coerce(value, hints[key], full)
        if allowed and value not in allowed:
            raise ConfigError(
                f"{full} must be one of {', '.join(allowed)}, got {value!r}"
                f"{close_matches(str(value), list(allowed))}"
            )
        kwargs[key] = value
    return cls(**kwargs)
