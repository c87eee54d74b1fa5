"""`chat`: talk with a chat model (fine-tuned on conversations) in the terminal.

Type a message and press Enter: the reply streams as it is generated, and the conversation goes on with
everything said so far (the oldest exchanges are left out once they no longer fit the model's context).
Commands: /reset forgets the conversation, /system TEXT sets the system message (/system alone clears it),
/exit (or Ctrl-D) ends. Ctrl-C stops the current reply (what was shown of it stays in the conversation).
Prompts use talm's chat format (talm.tokenizer.chat), the one the model was fine-tuned with.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from talm.cli.common import (
    ArgumentParser,
    HelpFormatter,
    add_config_flags,
    add_model_flags,
    collect_config_flags,
    run_main,
)
from talm.config import validate
from talm.errors import TalmError
from talm.use.config import SampleConfig

HELP = "commands: /reset, /system TEXT, /exit (or Ctrl-D); Ctrl-C stops a reply"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    parser = ArgumentParser(
        prog="chat",
        description=__doc__,
        formatter_class=HelpFormatter,
        epilog='Example: chat -m models/assistant --checkpoint best --system "Answer briefly."',
    )
    add_model_flags(parser)
    parser.add_argument("--system", metavar="TEXT", help="a system message to start the conversation with")
    names = add_config_flags(parser, SampleConfig, short={"seed": "-s"}, skip=("num_samples",))
    return parser, names


def main(argv: Sequence[str] | None = None) -> None:
    parser, names = build_parser()
    args = parser.parse_args(argv)
    run_main(parser, lambda: run(args, names), names)


def run(args: argparse.Namespace, names: dict[str, str]) -> None:
    config = validate(SampleConfig, collect_config_flags(args, SampleConfig), names)
    # these import torch: after validation
    from talm.tokenizer.chat import ChatFormat
    from talm.use.chat import Conversation, ReplyStats, prompt_budget, stream_reply
    from talm.use.load import describe_checkpoint, load_checkpoint

    model, tokenizer, meta = load_checkpoint(args.model, args.checkpoint, args.device)
    chat_format = ChatFormat(tokenizer)  # refuses a tokenizer without role tokens
    conversation = Conversation(chat_format, args.system)
    budget = prompt_budget(model.config.context_length, config.max_new_tokens)
    print(f"{describe_checkpoint(args.model, meta)}: type a message; {HELP}", file=sys.stderr)

    tokens = 0
    start = time.perf_counter()
    while (line := read_message()) is not None:
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command == "/exit":
                break
            if command == "/reset":
                conversation.reset()
                print("[conversation reset]", file=sys.stderr, flush=True)
            elif command == "/system":
                conversation.system = rest.strip() or None
                said = f"set to {conversation.system!r}" if conversation.system else "cleared"
                print(f"[system message {said}]", file=sys.stderr, flush=True)
            else:
                print(f"[unknown command {command}; {HELP}]", file=sys.stderr, flush=True)
            continue
        try:
            ids, dropped = conversation.prompt(line.rstrip("\r\n"), budget)
        except TalmError as err:  # a message too long ends nothing: say why, ask for the next one
            print(f"error: {err}", file=sys.stderr, flush=True)
            continue
        if dropped:
            print(f"[the oldest {dropped} exchange(s) no longer fit the context: left out]", file=sys.stderr)
        stats = ReplyStats()
        pieces: list[str] = []
        try:
            for piece in stream_reply(model, tokenizer, ids, config, end_id=chat_format.end_id, stats=stats):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            if stats.finish_reason == "length":
                print(f"[the reply reached --max-new-tokens ({config.max_new_tokens})]", file=sys.stderr)
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            print("[stopped]", file=sys.stderr, flush=True)
        sys.stdout.flush()
        tokens += stats.tokens
        conversation.add_exchange(line.rstrip("\r\n"), "".join(pieces))
    seconds = time.perf_counter() - start
    device = next(model.parameters()).device
    print(f"generated {tokens:,} tokens in {seconds:.1f} s on {device}", file=sys.stderr)


def read_message() -> str | None:
    """The next line typed, or None at end of input. Ctrl-C while typing drops the line and asks again."""
    while True:
        try:
            if sys.stdin.isatty():
                return input("> ")
            print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            return line if line else None
        except EOFError:
            return None
        except KeyboardInterrupt:
            print("\n[Ctrl-D or /exit ends the chat]", file=sys.stderr, flush=True)
