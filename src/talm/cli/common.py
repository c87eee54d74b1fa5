"""What every console script shares: flags generated from config fields, and one-line errors.

`add_config_flags` turns the fields of a `talm.config.Config` class into argparse flags whose help text is the
field's docstring and default; `collect_config_flags` gives back only the flags the user passed, as plain data
for pydantic to validate (so a config file or preset can supply the rest). `run_main` runs a command and turns
the errors a user can cause into one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

from pydantic import ValidationError

from talm.config import Config, describe_validation_error
from talm.errors import TalmError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; wide enough for field docs."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=110)


def _unwrap_optional(annotation: Any) -> Any:
    """`int | None` -> `int`; anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def flag_for(field: str, prefix: str = "") -> str:
    """Top-level fields use dashes (`--vocab-size`); nested ones keep their dotted path (`--model.n_layer`)."""
    return f"--{prefix}{field}" if prefix else "--" + field.replace("_", "-")


def add_config_flags(
    parser: argparse.ArgumentParser | Any,
    cls: type[Config],
    *,
    prefix: str = "",
    short: dict[str, str] | None = None,
    skip: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Add one flag per field of `cls`; return {dotted field path: flag as the user types it}.

    `prefix` is "model." for nested sections; `short` adds short aliases ({"vocab_size": "-vs"}); `defaults`
    overrides the default shown in --help (e.g. a preset's value). Flags default to "not given" so that a
    config file or preset fills the gaps and pydantic validates everything once.
    """
    short = short or {}
    defaults = defaults or {}
    names: dict[str, str] = {}
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        flag = flag_for(name, prefix)
        spellings = [short[name], flag] if name in short else [flag]
        names[prefix + name] = "/".join(spellings)
        annotation = _unwrap_optional(field.annotation)
        origin = typing.get_origin(annotation)
        # Required fields have no default to show; default_factory fields show what the factory makes.
        default = defaults.get(
            name, None if field.is_required() else field.get_default(call_default_factory=True)
        )
        doc = (field.description or "").strip().replace("%", "%%")
        if default is not None and not (isinstance(default, (list, tuple)) and not default):
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            doc += f" (default: {shown})"
        kwargs: dict[str, Any] = {"dest": prefix + name, "default": argparse.SUPPRESS, "help": doc}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if origin in (list, tuple):
                kwargs["nargs"] = "+"
            if origin is Literal:
                kwargs["choices"] = [str(c) for c in typing.get_args(annotation)]
            kwargs["metavar"] = name.upper().rsplit(".", 1)[-1]
        parser.add_argument(*spellings, **kwargs)
    return names


def collect_config_flags(args: argparse.Namespace, cls: type[Config], *, prefix: str = "") -> dict[str, Any]:
    """The values the user actually passed for the fields of `cls`, as plain data (unvalidated)."""
    given = vars(args)
    return {name: given[prefix + name] for name in cls.model_fields if prefix + name in given}


def run_main(command: Callable[[], Any], flag_names: dict[str, str] | None = None) -> None:
    """Run a console script's body: user errors become one line on stderr and exit status 2."""
    prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv else "talm"
    try:
        command()
    except TalmError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except ValidationError as err:
        print(f"{prog}: error: {describe_validation_error(err, flag_names)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; nothing partial was left behind", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # `train_model ... | head`: the reader left, which is not an error of ours.
        sys.stderr.close()
        sys.exit(0)
