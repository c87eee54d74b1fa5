"""`train_tokenizer -vs N -n NAME [--text-file FILE ...] [--force]`: train a byte-level BPE tokenizer.

Writes tokenizers/NAME.json (Hugging Face tokenizers JSON) atomically and ends with one summary line.
All the work is `talm.tokenizer.train.train_file`; this module only parses and reports. Imports no torch and
no datasets, so it starts in well under a second.
"""

from __future__ import annotations

import argparse
import sys

from talm.cli.common import ArgumentParser, HelpFormatter, add_config_flags, collect_config_flags, run_main
from talm.config import validate
from talm.tokenizer.config import SPECIAL_TOKENS, TokenizerConfig


def run(config: TokenizerConfig) -> None:
    from talm.tokenizer.train import train_file

    tokenizer, stats = train_file(
        config.text_files,
        config.vocab_size,
        config.name,
        overwrite=config.force,
        progress=sys.stderr.isatty(),
        trainer=config.trainer,
    )
    short = ""
    if tokenizer.vocab_size < config.vocab_size:
        short = f" (asked for {config.vocab_size}: the text has no more pairs to merge)"
    print(
        f"wrote {tokenizer.path}: vocab {tokenizer.vocab_size}{short} ({len(SPECIAL_TOKENS)} special), "
        f"{stats.text_bytes / 1e6:.1f} MB in {stats.seconds:.2f} s ({stats.mb_per_s:.1f} MB/s), "
        f"{stats.bytes_per_token:.2f} bytes/token on the training text"
        + ("" if stats.sample_bytes >= stats.text_bytes else f" (first {stats.sample_bytes / 1e6:.0f} MB)")
    )


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    parser = ArgumentParser(
        prog="train_tokenizer",
        description=(
            "Train a byte-level BPE tokenizer (GPT-4-style regex pre-split, special tokens "
            + ", ".join(SPECIAL_TOKENS)
            + ") on UTF-8 text and write it to tokenizers/NAME.json.\n\n"
            "example: train_tokenizer -vs 4096 -n mytok --text-file corpus1.txt corpus2.txt"
        ),
        formatter_class=HelpFormatter,
    )
    flags = add_config_flags(
        parser,
        TokenizerConfig,
        short={"vocab_size": "-vs", "name": "-n", "text_files": "--text-file"},
    )
    return parser, flags


def main(argv: list[str] | None = None) -> None:
    parser, flags = build_parser()
    args = parser.parse_args(argv)
    run_main(
        parser,
        lambda: run(validate(TokenizerConfig, collect_config_flags(args, TokenizerConfig), flags)),
        flags,
    )


if __name__ == "__main__":
    main()
