"""Frozen config dataclasses built from `params.yaml` sections, typed and validated at load time.

Every component owns one frozen dataclass. `load_section` checks each value against the field's
annotation (through pydantic) and then the dataclass's own `__post_init__` checks its ranges with
`require`; every error names the dotted key and the value: `grpo.group_size must be an integer, got
8.5`, `grpo.group_size must be >= 2, got 1`, `grpo.clip_epsilon is not a known parameter; ...`.

Annotate fields with the types below, not bare `int` / `float` / `bool`:
- `Int`: an integer; 8.5, `true` and "8" are refused;
- `Float`: a finite number; an integer or a numeric string is accepted as the float it means, since
  YAML reads `1e-4` (no dot) as a string and `dvc exp run -S grpo.lr=5e-5` writes exactly that;
- `Bool`: `true` or `false` only.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BeforeValidator, ConfigDict, Strict, TypeAdapter, ValidationError

T = TypeVar("T")


class ConfigError(ValueError):
    """A parameter is unknown, missing, of the wrong type or out of range; the message names the key."""


def _finite_float(value: Any) -> Any:
    if isinstance(value, bool):  # YAML's true is no number, though Python would take it as 1
        raise ValueError("not a number")
    if isinstance(value, str):
        value = float(value.strip())
    if isinstance(value, (int, float)) and not math.isfinite(value):
        raise ValueError("not finite")
    return value


Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(_finite_float)]
Bool = Annotated[bool, Strict()]

# what a failed type check says, by pydantic's error type
_TYPE_RULES = {
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "float_type": "must be a finite number",
    "float_parsing": "must be a finite number",
    "dict_type": "must be a mapping of keys to values",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dataclass_type": "must be a mapping of keys to values",
    "too_short": "has too few items",
    "too_long": "has too many items",
}


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    """Raise `ConfigError("<key> <rule>, got <value>")` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key} {rule}, got {value!r}")


def _forbid_unknown_keys(cls: type) -> None:
    """Make pydantic refuse unknown keys in `cls` and in every config dataclass nested in it."""
    if "__pydantic_config__" not in vars(cls):
        cls.__pydantic_config__ = ConfigDict(extra="forbid")
    for inner in typing.get_type_hints(cls).values():
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            _forbid_unknown_keys(inner)


@cache
def _adapter(cls: type) -> TypeAdapter:
    # the dataclass's own __post_init__ still runs after pydantic's type checks
    _forbid_unknown_keys(cls)
    return TypeAdapter(cls)


def _field_names(cls: type, path: tuple[str, ...]) -> list[str]:
    """The valid keys at `path` inside the dataclass `cls` (for an unknown key's message)."""
    for part in path:
        inner = typing.get_type_hints(cls).get(part)
        if not (isinstance(inner, type) and dataclasses.is_dataclass(inner)):
            return []
        cls = inner
    return [f.name for f in dataclasses.fields(cls)]


def _dotted(section: str, loc: tuple) -> str:
    """("grpo", ("betas", 1)) -> "grpo.betas[1]": keys joined by dots, list positions in brackets."""
    key = section
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else f".{part}"
    return key


def _message(err: dict, cls: type, section: str) -> str:
    loc = tuple(err["loc"])
    key = _dotted(section, loc)
    kind, value = err["type"], err.get("input")
    if kind == "missing" and loc and isinstance(loc[-1], int):  # a list shorter than its fixed length
        return f"{_dotted(section, loc[:-1])} has too few items, got {value!r}"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        names = _field_names(cls, tuple(str(part) for part in loc[:-1]))
        valid = f"; valid keys of {_dotted(section, loc[:-1])}: {', '.join(names)}" if names else ""
        return f"{key} is not a known parameter{valid}"
    if kind in ("missing", "missing_argument"):
        return f"{key} is required"
    if kind == "value_error":
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError):  # raised by a __post_init__: its text starts with the inner key
            return f"{key}.{cause}"
        return f"{key} must be a finite number, got {value!r}"
    return f"{key} {_TYPE_RULES.get(kind, err['msg'].lower())}, got {value!r}"


def load_section(cls: type[T], values: Mapping[str, Any] | None, section: str) -> T:
    """Build the dataclass `cls` from `values`, checking every value's type; errors name `section.key`."""
    if values is not None and not isinstance(values, Mapping):
        raise ConfigError(f"{section} must be a mapping of keys to values, got {values!r}")
    try:
        return _adapter(cls).validate_python(dict(values or {}))
    except ValidationError as err:
        raise ConfigError(_message(err.errors()[0], cls, section)) from None
    except ConfigError as err:  # a __post_init__ check outside pydantic's own validation
        raise ConfigError(f"{section}.{err}") from None


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read a params file; a missing or malformed file is named in the error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path.resolve()}")
    try:
        with path.open() as f:
            params = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(params).__name__}")
    return params
