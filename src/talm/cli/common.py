"""What every console script shares: flags generated from config fields, and one-line errors.

`add_config_flags` turns the fields of a `talm.config.Config` class into argparse flags whose help text is the
field's docstring and default, and whose text is converted to the field's type (configs are strict: "3" is not
an int); `collect_config_flags` gives back only the flags the user passed, as plain data for pydantic to
validate (so a config file or preset can supply the rest). `ArgumentParser` is the parser of every console
script: a bad flag (unknown, bad choice, bad number) is one line, not argparse's usage block. `run_main` runs a
command and turns the errors a user can cause into one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

from pydantic import ValidationError

from talm.config import Config, FlagType, describe_validation_error
from talm.errors import TalmError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; wide enough for field docs."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=110)


class ArgumentParser(argparse.ArgumentParser):
    """The parser of every console script: a usage error (unknown flag, invalid choice, a number that is not
    one, a missing argument) is one line on stderr and exit status 2, without argparse's usage block
    (`--help` still shows it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # a mistyped --model.mlp must not become --model.mlp_hidden
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())
        self.exit(EXIT_USAGE, f"{self.prog}: error: {line}\n")


def _unwrap_optional(annotation: Any) -> Any:
    """`int | None` -> `int`; anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _strip_annotated(annotation: Any) -> tuple[Any, list[Any]]:
    """`Annotated[int, m1, m2]` -> (int, [m1, m2]); anything else -> (annotation, [])."""
    if typing.get_origin(annotation) is Annotated:
        return annotation.__origin__, list(annotation.__metadata__)
    return annotation, []


def _converter(annotation: Any, metadata: list[Any]) -> Callable[[str], Any] | None:
    """How the text of a flag becomes a value of the field's type (None: keep the text, a str)."""
    for item in metadata:
        if isinstance(item, FlagType):
            return _checked(item.parse, item.expected)
    if annotation is int:
        return _checked(int, "a whole number (e.g. 12)")
    if annotation is float:
        return _checked(float, "a number (e.g. 0.5 or 3e-4)")
    if annotation is Path:
        return Path
    return None


def _checked(parse: Callable[[str], Any], expected: str) -> Callable[[str], Any]:
    """`parse`, turning its ValueError into argparse's one-line "argument --x: 'abc' is not ..." message."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except (ValueError, TypeError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected}") from None

    return convert


def _or_none(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """`convert`, with "none" (any case) meaning the field's None."""
    return lambda text: None if text.strip().lower() == "none" else convert(text)


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
        optional = _unwrap_optional(field.annotation) is not field.annotation
        annotation, metadata = _strip_annotated(_unwrap_optional(field.annotation))
        metadata = [*field.metadata, *metadata]
        many = typing.get_origin(annotation) in (list, tuple)
        if many:  # one flag, several values: each converted like a single value of the item type
            annotation, metadata = _strip_annotated(typing.get_args(annotation)[0])
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
            if many:
                kwargs["nargs"] = "+"
            if typing.get_origin(annotation) is Literal:
                kwargs["choices"] = [str(c) for c in typing.get_args(annotation)]
            else:
                convert = _converter(annotation, metadata)
                if convert is not None and optional and annotation in (int, float) and not many:
                    convert = _or_none(convert)  # "none" unsets what a preset or config file set
                    kwargs["help"] += " (none: unset)"
                if convert is not None:
                    kwargs["type"] = convert
            kwargs["metavar"] = name.upper().rsplit(".", 1)[-1]
        parser.add_argument(*spellings, **kwargs)
    return names


def collect_config_flags(args: argparse.Namespace, cls: type[Config], *, prefix: str = "") -> dict[str, Any]:
    """The values the user actually passed for the fields of `cls`, as plain data (unvalidated)."""
    given = vars(args)
    return {name: given[prefix + name] for name in cls.model_fields if prefix + name in given}


def add_model_flags(parser: argparse.ArgumentParser, *, device: bool = True) -> None:
    """The flags of every command that uses a trained model: -m/--model, --checkpoint and (unless not asked
    for) --device."""
    parser.add_argument(
        "-m", "--model", required=True, metavar="DIR", help="the model directory (models/NAME)"
    )
    parser.add_argument(
        "--checkpoint",
        default="latest",
        help="latest, best (lowest validation loss) or the path of a checkpoint directory (default: latest)",
    )
    if device:
        parser.add_argument(
            "--device",
            default="auto",
            choices=["auto", "cpu", "cuda", "mps"],
            help="where to run (default: auto: cuda, then mps, then cpu)",
        )


def check_streams(prog: str, *, stdin: str | None = None) -> None:
    """Refuse to start without a stdout to write to, or, when the command reads its stdin (`stdin`: what it
    reads there and how to give it), without a stdin: a stream closed by the shell (`>&-`, `<&-`) is None."""
    if stdin is not None and (sys.stdin is None or sys.stdin.closed):
        raise TalmError(f"stdin is closed: {stdin}")
    if sys.stdout is None or sys.stdout.closed:
        raise TalmError(
            f"stdout is closed: {prog} writes the text there; run it with stdout open (a terminal, a file or "
            "a pipe)"
        )


def run_main(
    parser: argparse.ArgumentParser, command: Callable[[], Any], flag_names: dict[str, str] | None = None
) -> None:
    """Run a console script's body: user errors become one line on stderr and exit status 2."""
    try:
        command()
    except TalmError as err:
        user_error(parser, str(err))
    except ValidationError as err:
        user_error(parser, describe_validation_error(err, flag_names))
    except KeyboardInterrupt:
        print(f"\n{parser.prog}: interrupted; nothing partial was left behind", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # `train_model ... | head`: the reader left, which is not an error of ours.
        sys.stderr.close()
        sys.exit(0)


def user_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """Print a user error as one line naming the command (its hints name that command's flags) and exit 2."""
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
