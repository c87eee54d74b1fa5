"""`download_data DATASET [--ds-sample S] [-t TOKENIZER] ...`: stream a corpus into token shards.

Writes data/DATASET/[PREFIX_]SAMPLE/ (shards + meta.json, see talm.data.manifest), resumes an interrupted run, and
ends with one summary line. All the work is `talm.data.prepare.prepare`; this module only parses and reports.
"""

from __future__ import annotations

import argparse
import os
import sys

from talm.cli.common import ArgumentParser, HelpFormatter, add_config_flags, collect_config_flags, run_main
from talm.config import validate
from talm.data.config import DATASET_PRESETS, DownloadConfig


def run_prompts(cfg: DownloadConfig) -> None:
    """Prompt data (gsm8k, --prompts): written whole, then one summary line."""
    from talm.data.prompts import prepare_prompts

    result = prepare_prompts(cfg)
    splits = result.manifest["splits"]
    layout = ", ".join(
        f"{s['prompts']:,} {name} prompts ({s['tokens']:,} tokens)" for name, s in splits.items()
    )
    if result.status == "complete":
        print(f"{result.out_dir} is already complete ({layout}): nothing to do (--overwrite starts afresh)")
        return
    first = result.manifest["first_malformed"]
    named = f"; the first: {'; '.join(first)}" if first else ""
    print(
        f"wrote {result.out_dir}: {layout}; {result.manifest['malformed']:,} malformed skipped{named} in "
        f"{result.seconds:.1f} s"
    )


def run(cfg: DownloadConfig) -> None:
    from talm.data.prepare import prepare

    if cfg.is_prompts:
        run_prompts(cfg)
        return
    try:
        bar = sys.stderr.isatty() or os.environ.get("TALM_PROGRESS") == "1"
        result = prepare(cfg, progress=bar, progress_lines=not bar)
    except KeyboardInterrupt:
        print(
            "download_data: stopped; the complete shards are kept: rerun the same command to resume",
            file=sys.stderr,
        )
        raise
    from talm.data.manifest import data_kind

    conversations = bool(result.manifest.get("loss_mask"))
    docs = {"conversations": "conversations", "preferences": "preference pairs"}.get(
        data_kind(result.manifest), "documents"
    )
    layout = (
        f"{len(result.manifest['shards'])} shards, {result.split_tokens('train'):,} train + "
        f"{result.split_tokens('val'):,} val tokens, {result.manifest['totals']['documents']:,} {docs}"
    )
    if result.status == "complete":
        print(f"{result.out_dir} is already complete ({layout}): nothing to do (--overwrite starts afresh)")
        return
    stats = result.stats
    assert stats is not None
    resumed = " (resumed)" if result.status == "resume" else ""
    if result.repaired:
        resumed = f" (resumed from the last good shard: {result.repaired})"
    named = f"; the first: {'; '.join(stats.first_malformed)}" if stats.first_malformed else ""
    skipped = f"{stats.malformed:,} malformed skipped{named}"
    if not conversations:  # text: rows without text are skipped too, and are no error
        empty = f"{stats.empty_documents - stats.malformed:,} empty"
        skipped = f"{empty}, {skipped}" if stats.malformed else f"{empty} skipped"
    print(
        f"wrote {result.out_dir}{resumed}: {layout}; this run {stats.tokens:,} tokens, {stats.documents:,} {docs}"
        f" ({skipped}) in {stats.seconds:.1f} s, {stats.tokens_per_s:,.0f} tokens/s, "
        f"{stats.mb_per_s:.1f} MB/s"
    )


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    presets = "\n".join(
        f"  {name:<16}{p.source}  (configs: {', '.join(p.configs)}{', CC-MAIN-YYYY-WW' if p.config_pattern else ''})"
        for name, p in DATASET_PRESETS.items()
    )
    parser = ArgumentParser(
        prog="download_data",
        description=(
            "Stream a text corpus, tokenize it on all cores and write resumable token shards to "
            "data/DATASET/[PREFIX_]SAMPLE/.\n\ndatasets:\n"
            + presets
            + "\n  any name        with --data-files "
            "(parquet, jsonl, json, csv, txt)\n\n"
            "examples:\n  download_data tinyshakespeare\n  download_data fineweb --ds-sample sample-10BT --max-tokens 1e9\n"
            "  download_data mycorpus --data-files ~/corpus/*.parquet --text-column content\n"
            "  download_data smoltalk --ds-sample everyday-conversations   # conversations, for train_model --preset sft\n"
            "  download_data mychats --data-files chats.jsonl --conversations   # a messages column\n"
            "  download_data gsm8k --ds-sample main   # prompts and reference answers, for train_model --preset grpo\n"
            "  download_data sums --data-files sums.jsonl --prompts   # prompt and answer columns\n"
            "  download_data ultrafeedback   # preference pairs, for train_model --preset dpo\n"
            "  download_data mypairs --data-files pairs.jsonl --preferences   # prompt, chosen, rejected\n"
            "  download_data fineweb --ds-sample sample-100BT --num-workers 8 --worker-index 0   # one of 8"
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("dataset", help=DownloadConfig.model_fields["dataset"].description)
    flags = add_config_flags(parser, DownloadConfig, short={"tokenizer_path": "-t"}, skip=("dataset",))
    flags["dataset"] = "DATASET"
    return parser, flags


def main(argv: list[str] | None = None) -> None:
    parser, flags = build_parser()
    args = parser.parse_args(argv)

    def command() -> None:
        data = {"dataset": args.dataset, **collect_config_flags(args, DownloadConfig)}
        run(validate(DownloadConfig, data, flags))

    run_main(parser, command, flags)
