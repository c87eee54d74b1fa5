"""`train_model`: pretrain a GPT on the shards of a data directory, resuming models/NAME if it exists.

Settings come from, in increasing precedence: the defaults, `--preset NAME`, `--config FILE.toml` (tables
[model], [optim], [train]), and flags: one per config field (`--model.n_layer 12`, `--optim.lr 6e-4`,
`--train.batch_size 32`) plus plain spellings of the common ones (`--max-steps`, `--batch-size`, ...).
Multi-process: `torchrun --nproc-per-node N $(which train_model) ...`.
"""

from __future__ import annotations

import argparse
from typing import Any

from talm.cli.common import ArgumentParser, HelpFormatter, add_config_flags, collect_config_flags, run_main
from talm.config import merge
from talm.model.config import ModelConfig
from talm.train.config import PRESETS, DPOConfig, GRPOConfig, OptimConfig, TrainConfig

# TrainConfig fields that also get a plain flag (`--max-steps` beside `--train.max_steps`).
PLAIN_TRAIN_FLAGS = (
    "max_steps",
    "batch_size",
    "eval_every",
    "eval_tokens",
    "eval_tasks",
    "eval_tasks_every",
    "eval_tasks_limit",
    "eval_tasks_dir",
    "save_every",
    "log_every",
    "device",
    "dtype",
    "compile",
    "deterministic",
    "seed",
    "report_to",
    "init_from",
    "sample_every",
)
SECTIONS = {
    "model": ModelConfig, "optim": OptimConfig, "train": TrainConfig, "dpo": DPOConfig, "grpo": GRPOConfig,
}  # fmt: skip


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    parser = ArgumentParser(
        prog="train_model",
        description=__doc__,
        formatter_class=HelpFormatter,
        epilog="Presets: " + ", ".join(PRESETS) + ". Example: train_model -n shakespeare "
        "-d data/tinyshakespeare/default --preset tiny",
    )
    parser.add_argument("-n", "--model-name", required=True, help="the run's name: writes models/NAME/")
    parser.add_argument(
        "-d", "--data-dir", required=True, help="directory of shards written by download_data"
    )
    parser.add_argument(
        "-t",
        "--tokenizer-path",
        help="tokenizer file (default: the one the data was made with; must match it)",
    )
    parser.add_argument("--preset", choices=list(PRESETS), help="named starting config (flags override it)")
    parser.add_argument(
        "--config", metavar="FILE.toml", help="TOML file with [model], [optim], [train] (and [dpo]) tables"
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="start models/NAME over, deleting its checkpoints and metrics once every other input is checked "
        "(default: resume it from latest/, or best/ if latest/ is gone)",
    )
    parser.add_argument(
        "--resume-from",
        choices=["latest", "best"],
        default="latest",
        help="the checkpoint an existing run resumes from: latest/, or best/ (rewinding the run to its step; the "
        "metrics after it are dropped)",
    )
    common = parser.add_argument_group("common settings (shortcuts for --train.*)")
    common.add_argument(
        "--sample-prompt",
        action="append",
        dest="sample_prompt",
        metavar="TEXT",
        help="a prompt for --sample-every; repeat the flag for several (same as --train.sample_prompts)",
    )
    names = {"train.sample_prompts": "--sample-prompt/--train.sample_prompts"}
    skip = tuple(f for f in TrainConfig.model_fields if f not in PLAIN_TRAIN_FLAGS)
    plain = add_config_flags(common, TrainConfig, short={"seed": "-s"}, skip=skip)
    names.update({f"train.{k}": v for k, v in plain.items()})
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} settings")
        for path, flag in add_config_flags(group, cls, prefix=f"{section}.").items():
            names.setdefault(path, flag)
    return parser, names


def main(argv: list[str] | None = None) -> None:
    parser, names = build_parser()
    args = parser.parse_args(argv)

    def command() -> None:
        # torch is imported only once the arguments parsed
        from talm.train.run import train_model

        overrides: dict[str, Any] = {}
        for section, cls in SECTIONS.items():
            given = collect_config_flags(args, cls, prefix=f"{section}.")
            if given:
                overrides[section] = given
        plain = collect_config_flags(args, TrainConfig)
        if args.sample_prompt:
            plain["sample_prompts"] = args.sample_prompt
        if plain:
            overrides = merge(overrides, {"train": plain})
        train_model(
            args.model_name,
            args.data_dir,
            tokenizer_path=args.tokenizer_path,
            preset_name=args.preset,
            config_file=args.config,
            overrides=overrides,
            restart=args.restart,
            flag_names=names,
            resume_from=args.resume_from,
        )

    run_main(parser, command, names)


if __name__ == "__main__":
    main()
