"""`export_model`: write a trained model as a Hugging Face transformers model directory, optionally pushing it.

The directory (Llama architecture, safetensors weights, PreTrainedTokenizerFast tokenizer, a model card) loads
with `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`, no talm needed.
--push-to-hub uploads it to a Hub model repo (created if needed) with the token from $HF_TOKEN or
`hf auth login`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from talm.cli.common import ArgumentParser, HelpFormatter, add_model_flags, run_main
from talm.errors import TalmError
from talm.use.config import DTYPES


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="export_model",
        description=__doc__,
        formatter_class=HelpFormatter,
        epilog="Example: export_model -m models/shakespeare -o exports/shakespeare --push-to-hub me/shakespeare",
    )
    add_model_flags(parser, device=False)
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="the directory to write")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="dtype of the exported weights (default: float32)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    parser.add_argument(
        "--push-to-hub", metavar="REPO_ID", help="also upload the export to this Hub repo (USER/NAME)"
    )
    parser.add_argument(
        "--private", action="store_true", help="with --push-to-hub: create the repo as private"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    run_main(parser, lambda: run(args))


def run(args: argparse.Namespace) -> None:
    if args.private and not args.push_to_hub:
        raise TalmError("--private only applies to --push-to-hub REPO_ID: add it, or leave out --private")
    from talm.use.export import export_checkpoint, push_to_hub

    exported = export_checkpoint(
        args.model,
        args.output,
        checkpoint=args.checkpoint,
        dtype=args.dtype,
        overwrite=args.overwrite,
        hub_repo=args.push_to_hub,
    )
    out = exported.path
    print(
        f"exported {args.model} (step {exported.meta.get('step')}, {exported.num_params:,} parameters, "
        f"{args.dtype}) to {out}/: load it with transformers' AutoModelForCausalLM.from_pretrained({str(out)!r})",
        file=sys.stderr,
    )
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=args.private, token=exported.hub_token)
        print(f"pushed {out}/ to {url}", file=sys.stderr)
