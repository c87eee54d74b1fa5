"""`evaluate`: score a trained model on the standard zero-shot benchmarks and/or a data directory's bits per byte.

Prints a table (task, metric, value, random-guessing baseline, centered score, examples) and writes it to
models/NAME/evals/<step>.json. Multiple-choice tasks are scored as lm-evaluation-harness scores them (see
docs/evaluation.md); with --harness, the harness itself runs its tasks on the checkpoint (pip install 'talm[eval]').
"""

from __future__ import annotations

import argparse
import sys
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
from talm.eval.config import EvalConfig


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    parser = ArgumentParser(
        prog="evaluate",
        description=__doc__,
        formatter_class=HelpFormatter,
        epilog="Example: evaluate -m models/gpt2 --tasks hellaswag arc_easy piqa --data-dir data/fineweb/val",
    )
    add_model_flags(parser)
    names = add_config_flags(parser, EvalConfig)
    parser.add_argument(
        "--harness",
        nargs="+",
        metavar="TASK",
        help="run these lm-evaluation-harness tasks (any task name or yaml it knows) instead of talm's scorer",
    )
    parser.add_argument(
        "--include-path", metavar="DIR", help="with --harness: a folder of your own harness task yamls"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="autocast precision (auto: bfloat16 where the device computes it natively, else float32)",
    )
    return parser, names


def main(argv: Sequence[str] | None = None) -> None:
    parser, names = build_parser()
    args = parser.parse_args(argv)
    run_main(parser, lambda: run(args, names), names)


def run(args: argparse.Namespace, names: dict[str, str]) -> None:
    config = validate(EvalConfig, collect_config_flags(args, EvalConfig), names)
    if args.harness:
        from talm.use.lm_eval import run_harness

        table, _ = run_harness(
            args.model,
            args.harness,
            checkpoint=args.checkpoint,
            device=args.device,
            limit=config.limit,
            batch_size=config.batch_size,
            include_path=args.include_path,
        )
        print(table)
        return
    from talm.eval.runner import format_table
    from talm.use.evaluate import evaluate_model

    done = evaluate_model(
        args.model, config, checkpoint=args.checkpoint, device=args.device, dtype=args.dtype
    )
    if done.results:
        print(format_table(done.results))
    if done.data is not None:
        bpb = done.data["val_bpb"]
        print(
            f"{done.data['dir']}: val loss {done.data['val_loss']:.4f}, bits/byte "
            + (f"{bpb:.4f}" if bpb is not None else "n/a")
            + f" over {done.data['tokens']:,} tokens"
        )
    examples = sum(r.examples for r in done.results)
    print(
        f"evaluated step {done.step}: {examples:,} examples in {done.seconds:.1f} s "
        f"({examples / done.seconds:.1f} examples/s), wrote {done.path}",
        file=sys.stderr,
    )
