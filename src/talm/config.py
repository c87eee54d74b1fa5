"""Configuration as data: the `Config` base every stage's config derives from (each stage owns its classes, in
`talm.<stage>.config`), validated once at the edge.

Every config class derives from `Config`: typed fields whose docstrings become the `--help` text of the
command-line flags (see `talm.cli.common`), unknown keys rejected (`extra="forbid"`), cross-field rules as
validators. Configs can be read from TOML files and overridden field by field; a validation failure becomes a
one-line `TalmError` naming the field, the value and the rule.

Field values are strict (pydantic strict mode): a bool is not an int and a string is not a number, whether
the value comes from a TOML file or from Python (`n_layer = true` is refused, not read as 1). Command-line flags
are text, so `talm.cli.common` converts each flag to its field's type before validation. Every float field
refuses nan and inf ("must be a finite number"), for every config, through the base class.

This module is a leaf: it imports nothing else from talm but `errors`, and never torch.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Strict,
    ValidationError,
)

from talm.errors import TalmError


class Config(BaseModel):
    """Base of every talm config: strict about unknown keys and value types, finite floats, documented field
    by field."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,  # a bool is not an int, a string is not a number (ints are still accepted as floats)
        allow_inf_nan=False,  # every float field of every config: nan and inf are refused
        use_attribute_docstrings=True,
        validate_assignment=True,
        validate_default=True,
    )


@dataclass(frozen=True)
class FlagType:
    """Field metadata for `talm.cli.common`: how to turn the text of the field's command-line flag into a value
    (used instead of the converter derived from the field's type). `parse` raises ValueError on bad text."""

    parse: Callable[[str], Any]
    expected: str
    """What the text should look like, for the error message ("a token count such as 1e9")."""


# A file or directory path: a string is a fine spelling of a path, so paths are not strict.
PathField = Annotated[Path, Strict(False)]

SEED_LIMIT = 2**63


def _check_seed(seed: int) -> int:
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"must be from 0 to 2**63-1 ({SEED_LIMIT - 1}): pass e.g. 0")
    return seed


# A random seed: torch and numpy take seeds in [0, 2**63).
Seed = Annotated[int, AfterValidator(_check_seed)]

# Names of value types in messages, as a TOML or Python user would call them.
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list"}
_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "path_type": "a path",
    "model_type": "a table",
    "dict_type": "a table",
}


# What pydantic appends to an error's text (str(ValidationError)), which a message quoting one must not carry.
_PYDANTIC_NOISE = re.compile(r"\s*\[type=[^\]]*\]|\s*For further information visit \S+")


def _type_name(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    return _TYPE_NAMES.get(type(value), f"a {type(value).__name__}")


def describe_validation_error(err: ValidationError, flag_names: dict[str, str] | None = None) -> str:
    """One line for a pydantic error: which field, which value, which rule.

    `flag_names` maps a dotted field path ("model.n_layer") to how the user spelled it ("--model.n_layer"),
    so the message names what the user typed.
    """
    flag_names = flag_names or {}
    parts = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        name = flag_names.get(path, path or "config")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown setting {name!r}: check its spelling (see --help for the valid ones)")
            continue
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        msg = _PYDANTIC_NOISE.sub("", " ".join(msg.split()))  # a nested error's text: its URL and type tag
        value = e.get("input")
        if e["type"] in _EXPECTED:
            msg = f"must be {_EXPECTED[e['type']]}, not {_type_name(value)}"
        elif e["type"] == "finite_number":
            msg = "must be a finite number"
        if isinstance(value, dict) or path == "":
            parts.append(f"{name}: {msg}")
        else:
            parts.append(f"{name}={value!r}: {msg}")
    return "; ".join(parts)


def validate(cls: type[Config], data: dict[str, Any], flag_names: dict[str, str] | None = None) -> Any:
    """Build `cls` from plain data, turning a validation failure into a one-line TalmError."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise TalmError(describe_validation_error(err, flag_names)) from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into plain data (validated later, together with any overrides)."""
    p = Path(path)
    if not p.is_file():
        raise TalmError(f"config file {str(p)!r} not found: pass the path of an existing .toml file")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise TalmError(f"config file {str(p)!r} is not valid TOML ({err}): fix the file") from None


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` into a copy of `base` (nested tables merge, other values replace)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """`set_dotted(d, "model.n_layer", 12)` sets d["model"]["n_layer"] = 12, creating tables as needed."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[leaf] = value
