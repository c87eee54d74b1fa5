"""`serve`: an OpenAI-compatible API and a chat page for a chat model (needs `pip install 'talm[serve]'`).

Open http://127.0.0.1:8000/ for the chat page, or point any OpenAI client at http://127.0.0.1:8000/v1 (the model
id is the model directory's name: models/NAME -> NAME; any API key). Endpoints: POST /v1/chat/completions
(stream or not), POST /v1/completions, GET /v1/models, GET /health; each request is logged in one line on
stderr. Binds to 127.0.0.1 (this machine only) unless --host says otherwise; there is no authentication, so
--host 0.0.0.0 lets anyone on the network use it. Ctrl-C stops (open replies get 3 s to finish; Ctrl-C again
ends them at once). Concurrent requests are generated together in one batch (--slots at once; --queue more
wait; past that, 429).
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from talm.cli.common import ArgumentParser, HelpFormatter, add_model_flags, run_main
from talm.errors import TalmError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def port_number(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1 to 65535)")
    return int(text)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="serve",
        description=__doc__,
        formatter_class=HelpFormatter,
        epilog="Example: serve -m models/assistant --checkpoint best --port 8000",
    )
    add_model_flags(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument(
        "--slots",
        type=positive,
        default=8,
        help="replies generated at once, in one batch (default: 8); more wait for a slot",
    )
    parser.add_argument(
        "--queue",
        type=positive,
        default=64,
        help="replies that may wait for a slot (default: 64); a request past that is refused with 429",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    run_main(parser, lambda: run(args))


def model_name(model: str) -> str:
    """The model id clients use: the model directory's name (models/NAME, or models/NAME/best -> NAME)."""
    path = Path(model).resolve()
    return path.parent.name if (path / "checkpoint.json").is_file() else path.name


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise TalmError(
                f"cannot listen on {host}:{port} ({err.strerror}): pass another --port or --host"
            ) from None


def run(args: argparse.Namespace) -> None:
    try:
        import uvicorn  # noqa: F401 -- run_server's: checked here, before the model loads

        from talm.use.serve import create_app, run_server
    except ImportError:
        raise TalmError(
            "serve needs FastAPI and uvicorn, which are not installed: pip install 'talm[serve]'"
        ) from None
    from talm.use.load import describe_checkpoint, load_checkpoint

    check_port_free(args.host, args.port)
    model, tokenizer, meta = load_checkpoint(args.model, args.checkpoint, args.device, for_generation=True)
    name = model_name(args.model)
    app = create_app(
        model, tokenizer, name, slots=args.slots, queue=args.queue
    )  # refuses a tokenizer without role tokens
    if args.host not in LOOPBACK:
        print(
            f"serve: warning: listening on {args.host}, not only this machine: anyone who can reach it can use "
            "the model (there is no authentication)",
            file=sys.stderr,
        )
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"serving {describe_checkpoint(args.model, meta)} as model {name!r}: chat page http://{shown}:{args.port}/, "
        f"API http://{shown}:{args.port}/v1; Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    run_server(app, args.host, args.port)  # logs each request; Ctrl-C gives open replies 3 s, twice ends them
