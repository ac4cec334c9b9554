"""Frozen config dataclasses built from `params.yaml` sections, validated at load time.

Every component owns one frozen dataclass whose `__post_init__` checks its values with `require`;
`load_section` builds it from a mapping and prefixes errors with the section's name, so a bad value
reads `grpo.group_size must be >= 2, got 1` and an unknown key names itself and the valid ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A parameter is unknown, missing or out of range; the message names the key."""


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    """Raise `ConfigError("<key> <rule>, got <value>")` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key} {rule}, got {value!r}")


def load_section(cls: type[T], values: Mapping[str, Any] | None, section: str) -> T:
    """Build the dataclass `cls` from `values`, naming `section.key` in every error."""
    values = dict(values or {})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"{section}.{unknown[0]} is not a known parameter; valid keys of {section}: {', '.join(names)}"
        )
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{section}.{missing[0]} is required")
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{section}.{err}") from None


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read a params file; a missing file is named in the error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path.resolve()}")
    with path.open() as f:
        return yaml.safe_load(f) or {}
