"""`export_model`: write a trained model as a Hugging Face transformers model directory, optionally pushing it,
or as one GGUF file for llama.cpp, Ollama and LM Studio.

--format transformers (the default): the directory (Llama architecture, safetensors weights,
PreTrainedTokenizerFast tokenizer, a model card) loads with `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)`, no talm needed. --push-to-hub uploads it to a Hub model repo (created if
needed) with the token from $HF_TOKEN or `hf auth login`.

--format gguf: -o names the .gguf file, its weights in --quant f32, f16 or q8_0 (llama.cpp's llama, qwen3, arcee
or apertus architecture, whichever computes the model's options; the tokenizer and talm's chat template inside);
run it with `llama-cli -m FILE.gguf` or an Ollama Modelfile.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from talm.cli.common import ArgumentParser, HelpFormatter, add_model_flags, run_main
from talm.errors import TalmError
from talm.use.config import DTYPES

FORMATS = ("transformers", "gguf")
QUANTS = ("f32", "f16", "q8_0")  # talm.use.gguf's (kept here so --help needs no torch)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="export_model",
        description=__doc__,
        formatter_class=HelpFormatter,
        epilog="Examples: export_model -m models/shakespeare -o exports/shakespeare --push-to-hub me/shakespeare\n"
        "          export_model -m models/shakespeare --format gguf -o shakespeare.gguf --quant q8_0",
    )
    add_model_flags(parser, device=False)
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="PATH",
        help="the directory to write (with --format gguf: the file)",
    )
    parser.add_argument(
        "--format",
        default="transformers",
        choices=FORMATS,
        help="transformers: a Hugging Face model directory; gguf: one file for llama.cpp (default: transformers)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="with --format transformers: dtype of the exported weights (default: float32)",
    )
    parser.add_argument(
        "--quant",
        choices=QUANTS,
        help="with --format gguf: f32, f16 or q8_0 (8-bit) weights, norms in f32 (default: f16)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the output directory (or .gguf file) if it exists"
    )
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
    if args.format == "gguf":
        return run_gguf(args)
    if args.quant is not None:
        raise TalmError(
            "--quant only applies to --format gguf: add it, or pass --dtype for a transformers export"
        )
    from talm.use.export import export_checkpoint, push_to_hub

    dtype = args.dtype or "float32"
    exported = export_checkpoint(
        args.model,
        args.output,
        checkpoint=args.checkpoint,
        dtype=dtype,
        overwrite=args.overwrite,
        hub_repo=args.push_to_hub,
    )
    out = exported.path
    print(
        f"exported {args.model} (step {exported.meta.get('step')}, {exported.num_params:,} parameters, "
        f"{dtype}) to {out}/: load it with transformers' AutoModelForCausalLM.from_pretrained({str(out)!r})",
        file=sys.stderr,
    )
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=args.private, token=exported.hub_token)
        print(f"pushed {out}/ to {url}", file=sys.stderr)


def run_gguf(args: argparse.Namespace) -> None:
    if args.dtype is not None:
        raise TalmError(
            "--dtype only applies to --format transformers: pass --quant f32, f16 or q8_0 instead"
        )
    if args.push_to_hub:
        raise TalmError(
            "--push-to-hub uploads a transformers export: leave it out with --format gguf, and upload the file "
            "with `hf upload REPO_ID FILE.gguf`"
        )
    from talm.use.gguf import export_gguf_checkpoint

    quant = args.quant or "f16"
    exported = export_gguf_checkpoint(
        args.model, args.output, checkpoint=args.checkpoint, quant=quant, overwrite=args.overwrite
    )
    print(
        f"exported {args.model} (step {exported.meta.get('step')}, {exported.num_params:,} parameters, {quant}) "
        f"to {exported.path}: run it with `llama-cli -m {exported.path}`",
        file=sys.stderr,
    )
