"""`generate`: continue prompts with a trained model, printing the text as it is generated.

With -p/--prompt, each prompt is printed followed by its continuation (several prompts and --num-samples are
generated together in one batch, shown one after the other). Without a prompt, an interactive loop: type a
prompt, read the continuation; an empty line or Ctrl-D ends it, Ctrl-C stops the current continuation.
Generation stops at <|endoftext|> or after --max-new-tokens; --temperature 0 always picks the likeliest token.
At the end, one line on stderr: tokens generated, the time spent generating (not typing) and tokens/s, and why
generation stopped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from talm.cli.common import (
    ArgumentParser,
    HelpFormatter,
    add_config_flags,
    add_model_flags,
    check_streams,
    collect_config_flags,
    run_main,
)
from talm.config import validate
from talm.errors import TalmError
from talm.use.config import SampleConfig

if TYPE_CHECKING:
    from talm.model.gpt import GPT
    from talm.tokenizer.api import Tokenizer
    from talm.use.sample import GenerationStats

SEPARATOR = "-" * 40


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    parser = ArgumentParser(
        prog="generate",
        description=__doc__,
        formatter_class=HelpFormatter,
        epilog='Example: generate -m models/shakespeare -p "ROMEO:" --max-new-tokens 200 --seed 0',
    )
    add_model_flags(parser)
    parser.add_argument(
        "-p",
        "--prompt",
        action="extend",
        nargs="+",
        metavar="TEXT",
        help='one or more prompts ("" starts a new document); without any, an interactive loop',
    )
    names = add_config_flags(parser, SampleConfig, short={"seed": "-s", "num_samples": "-n"})
    parser.add_argument(
        "--allow-special",
        action="store_true",
        help="read special-token spellings in prompts (<|endoftext|>, <|user|>, ...) as special tokens "
        "(default: as plain text)",
    )
    return parser, names


def main(argv: Sequence[str] | None = None) -> None:
    parser, names = build_parser()
    args = parser.parse_args(argv)
    run_main(parser, lambda: run(args, names), names)


def run(args: argparse.Namespace, names: dict[str, str]) -> None:
    stdin = (
        None
        if args.prompt is not None
        else "without -p/--prompt, generate reads prompts from it: pass -p TEXT"
    )
    check_streams("generate", stdin=stdin)
    config = validate(SampleConfig, collect_config_flags(args, SampleConfig), names)
    # these import torch: after validation
    from talm.model.threads import use_cpu_threads
    from talm.use.load import describe_checkpoint, load_checkpoint
    from talm.use.sample import GenerationStats, prepare_prompt

    model, tokenizer, meta = load_checkpoint(args.model, args.checkpoint, args.device, for_generation=True)
    use_cpu_threads(next(model.parameters()).device)  # on CPU: the idle cores' count (the summary says it)
    device = next(model.parameters()).device
    context = model.config.context_length

    def prepare(texts: list[str]) -> list[tuple[str, list[int]]]:
        """Every prompt's ids (a bad prompt refuses them all), then a note for each prompt that was cut."""
        prepared = [prepare_prompt(tokenizer, t, context, allow_special=args.allow_special) for t in texts]
        for _, notice in prepared:
            if notice:
                print(f"note: {notice}", file=sys.stderr)
        return [(text, ids) for text, (ids, _) in zip(texts, prepared, strict=True)]

    stats = GenerationStats()
    if args.prompt is not None:
        generate_and_print(model, tokenizer, prepare(args.prompt), config, stats, echo=True)
    else:
        print(
            f"{describe_checkpoint(args.model, meta)}: type a prompt and press Enter; an empty line or Ctrl-D ends",
            file=sys.stderr,
        )
        while (text := read_prompt()) is not None:
            try:
                prompts = prepare([text])
            except TalmError as err:  # a bad prompt ends nothing: say why, ask for the next one
                print(f"error: {err}", file=sys.stderr, flush=True)
                continue
            try:
                generate_and_print(model, tokenizer, prompts, config, stats, echo=False)
            except KeyboardInterrupt:
                print("\n[stopped]", flush=True)
    print(stats.summary(device), file=sys.stderr)


def read_prompt() -> str | None:
    """The next prompt typed, or None at an empty line or end of input."""
    try:
        if sys.stdin.isatty():
            line = input("> ")
        else:
            print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                return None
    except EOFError:
        return None
    line = line.rstrip("\r\n")
    return line if line.strip() else None


def generate_and_print(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: list[tuple[str, list[int]]],
    config: SampleConfig,
    stats: GenerationStats,
    *,
    echo: bool,
) -> None:
    """Generate every prompt's samples in one batch (prompts as `prepare_prompt` gives them) and write them to
    stdout, one after the other, each after its prompt's text if `echo`."""
    from talm.use.sample import stream_samples

    texts = [text for text, _ in prompts for _ in range(config.num_samples)]
    started = -1
    out = sys.stdout
    for row, piece in stream_samples(model, tokenizer, [ids for _, ids in prompts], config, stats=stats):
        if row != started:
            if row > 0:
                out.write(SEPARATOR + "\n")
            started = row
            if echo:
                out.write(texts[row])
        if piece is None:
            out.write("\n")
        else:
            out.write(piece)
        out.flush()
