"""`chat`: talk with a chat model (fine-tuned on conversations) in the terminal.

Type a message and press Enter: the reply streams as it is generated, and the conversation goes on with
everything said so far (the oldest exchanges are left out once they no longer fit the model's context).
Commands: /reset forgets the conversation, /system TEXT sets the system message (/system alone clears it),
/exit (or Ctrl-D) ends. Ctrl-C stops the current reply (what was shown of it stays in the conversation).
Prompts use talm's chat format (talm.tokenizer.chat), the one the model was fine-tuned with.
A reply may take all the room the prompt leaves in the model's context, unless --max-new-tokens limits it.
A message that cannot fit even alone is refused: typed, the chat goes on; piped, it ends (exit status 2).
At the end, one line on stderr: tokens generated, the time spent generating (not typing), tokens/s, and why
the replies ended.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

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

HELP = "commands: /reset, /system TEXT, /exit (or Ctrl-D); Ctrl-C stops a reply"
DEFAULT_REPLY = (
    "all the room the prompt leaves in the model's context, the prompt keeping at most the context less a "
    "quarter of it (at most 256 tokens) for the reply; a value also sets that reserve, to at most half the context"
)
STDIN_HINT = (
    "chat reads the messages from it: give them on stdin (a terminal, or a pipe: echo Hi | chat -m DIR)"
)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    parser = ArgumentParser(
        prog="chat",
        description=__doc__,
        formatter_class=HelpFormatter,
        epilog='Example: chat -m models/assistant --checkpoint best --system "Answer briefly."',
    )
    add_model_flags(parser)
    parser.add_argument("--system", metavar="TEXT", help="a system message to start the conversation with")
    names = add_config_flags(
        parser,
        SampleConfig,
        short={"seed": "-s"},
        skip=("num_samples",),
        defaults={"max_new_tokens": DEFAULT_REPLY},
    )
    return parser, names


def main(argv: Sequence[str] | None = None) -> None:
    parser, names = build_parser()
    args = parser.parse_args(argv)
    run_main(parser, lambda: run(args, names), names)


def run(args: argparse.Namespace, names: dict[str, str]) -> None:
    check_streams("chat", stdin=STDIN_HINT)
    flags = collect_config_flags(args, SampleConfig)
    config = validate(SampleConfig, flags, names)
    limit = config.max_new_tokens if "max_new_tokens" in flags else None  # None: the room the prompt leaves
    # these import torch: after validation
    from talm.model.threads import use_cpu_threads
    from talm.tokenizer.chat import ChatFormat
    from talm.use.chat import PromptTooLong, prompt_budget
    from talm.use.load import describe_checkpoint, load_checkpoint

    model, tokenizer, meta = load_checkpoint(args.model, args.checkpoint, args.device, for_generation=True)
    use_cpu_threads(next(model.parameters()).device)  # on CPU: the idle cores' count (the summary says it)
    chat_format = ChatFormat(tokenizer)  # refuses a tokenizer without role tokens
    session = Session(model, tokenizer, chat_format, config, limit, args.system)
    session.check_system("--system")
    print(f"{describe_checkpoint(args.model, meta)}: type a message; {HELP}", file=sys.stderr)

    piped = not sys.stdin.isatty()  # a message that cannot fit ends a piped chat (exit 2), not a typed one
    while (line := read_message()) is not None:
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not session.command(text, piped):
                break
            continue
        message = line.rstrip("\r\n")
        try:
            ids, dropped = session.conversation.prompt(message, prompt_budget(session.context, limit))
        except PromptTooLong as err:
            problem = session.too_long(err)
            if piped:
                print(file=sys.stderr)  # the error on a line of its own, after the "> " prompt
                raise problem from None
            print(f"error: {problem}", file=sys.stderr, flush=True)
            continue
        if dropped:
            print(f"[the oldest {dropped} exchange(s) no longer fit the context: left out]", file=sys.stderr)
        session.conversation.add_exchange(message, session.reply(ids))
    print(session.stats.summary(next(model.parameters()).device), file=sys.stderr)


class Session:
    """The chat's model, settings, conversation and totals; what each typed command and message does."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        chat_format: Any,
        config: SampleConfig,
        limit: int | None,
        system: str | None,
    ) -> None:
        from talm.use.chat import Conversation
        from talm.use.sample import GenerationStats

        self.model, self.tokenizer, self.format, self.config, self.limit = (
            model,
            tokenizer,
            chat_format,
            config,
            limit,
        )
        self.context: int = model.config.context_length
        self.conversation = Conversation(chat_format, system)
        self.stats = GenerationStats()

    def reserve(self) -> int:
        from talm.use.chat import reply_reserve

        return reply_reserve(self.context, self.limit)

    def fix(self, *shorten: str) -> str:
        """How to make room: shorter texts, or a smaller reserve for the reply (--max-new-tokens)."""
        smaller = [" or pass a smaller --max-new-tokens"] if self.reserve() > 1 else []
        return "shorten " + " or ".join(shorten) + "".join(smaller)

    def check_system(self, spelled: str) -> None:
        """TalmError if the system message leaves no room in the prompt for any message."""
        fixed, budget = self.conversation.system_tokens(), self.context - self.reserve()
        if self.conversation.system and fixed >= budget:
            raise TalmError(
                f"the system message ({spelled}) is {fixed} tokens with the chat format, leaving no room for a "
                f"message in the {budget} that the model's context of {self.context} leaves for a prompt after "
                f"{self.reserve()} for the reply: {self.fix(spelled)}"
            )

    def too_long(self, err: Any) -> TalmError:
        """The refusal of a message that does not fit even alone (`PromptTooLong`), in the command's terms."""
        texts = (
            ["the message", "the system message (--system, /system)"] if self.conversation.system else ["it"]
        )
        return TalmError(
            f"the message is {err.tokens - err.fixed} tokens ({err.tokens} with the system message and chat "
            f"format), more than the {err.budget} that the model's context of {self.context} leaves for a prompt "
            f"after {self.context - err.budget} for the reply: {self.fix(*texts)}"
        )

    def command(self, text: str, piped: bool) -> bool:
        """Do a /command; False for /exit. A /system that leaves no room is refused (a piped chat ends)."""
        command, _, rest = text.partition(" ")
        if command == "/exit":
            return False
        if command == "/reset":
            self.conversation.reset()
            print("[conversation reset]", file=sys.stderr, flush=True)
        elif command == "/system":
            before = self.conversation.system
            self.conversation.set_system(rest.strip())
            try:
                self.check_system("/system")
            except TalmError as err:
                self.conversation.set_system(before)
                if piped:
                    print(file=sys.stderr)  # the error on a line of its own, after the "> " prompt
                    raise
                print(f"error: {err}", file=sys.stderr, flush=True)
                return True
            said = f"set to {self.conversation.system!r}" if self.conversation.system else "cleared"
            print(f"[system message {said}]", file=sys.stderr, flush=True)
        else:
            print(f"[unknown command {command}; {HELP}]", file=sys.stderr, flush=True)
        return True

    def reply(self, ids: list[int]) -> str:
        """Stream the reply to prompt `ids` to stdout; its text (what was shown, if stopped with Ctrl-C)."""
        from talm.use.chat import ReplyStats, reply_limit, stream_reply

        most = reply_limit(self.context, len(ids), self.limit)
        config = self.config.model_copy(update={"max_new_tokens": most})
        stats, pieces = ReplyStats(), []
        try:
            for piece in stream_reply(
                self.model, self.tokenizer, ids, config, end_id=self.format.end_id, stats=stats
            ):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            if stats.ended_by == "max_new_tokens":
                print(f"[the reply reached --max-new-tokens ({most})]", file=sys.stderr)
            elif stats.ended_by == "context":
                print(f"[the reply filled the model's context of {self.context} tokens]", file=sys.stderr)
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            print("[stopped]", file=sys.stderr, flush=True)
        sys.stdout.flush()
        self.stats.add(stats.tokens, stats.seconds, stats.ended_by)
        return "".join(pieces)


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
