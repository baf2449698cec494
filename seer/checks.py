"""Errors and small value checks shared by every config schema: a leaf module (it imports nothing from seer).

Schemas (``seer/*/config.py``) and the loaders raise :class:`ConfigError` through :func:`fail`; :mod:`seer.config`,
which composes the schemas into a run's config, sits above them all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key and the value."""


def fail(group: str, key: str, value: Any, why: str) -> None:
    """Raise a :class:`ConfigError` naming ``group.key=value`` and why it is refused."""
    raise ConfigError(f"{group}.{key}={value!r}: {why}")


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def build(cls: type[T], group: str, values: Mapping[str, Any] | T | None) -> T:
    """``cls(**values)``, refusing keys the schema does not have (naming them); an instance passes through."""
    if isinstance(values, cls):
        return values
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in values if k not in names)
    if unknown:
        raise ConfigError(f"{group}: unknown key(s) {unknown}; known keys: {sorted(names)}")
    return cls(**values)
