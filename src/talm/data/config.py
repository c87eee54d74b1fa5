"""The data stage's configuration (talm.config holds the Config base: strict fields, TOML and flag layering, docstrings as --help)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    model_validator,
)

from talm.config import Config, FlagType, PathField
from talm.errors import TalmError
from talm.files import PLAIN_NAME_RULE, is_plain_name

# ================================================================================================================
# Data stage (sources.py, streaming.py, prepare.py, cli/download_data.py)
# ================================================================================================================

# Every Common Crawl dump is a config of fineweb / fineweb-edu, named like CC-MAIN-2024-10.
_CC_DUMP = r"CC-MAIN-\d{4}-\d{2}"
# A dataset or directory name the user types: no path separators, no leading dot.


class DatasetPreset(Config):
    """A dataset `download_data` knows by name: where its text lives and which subsets (configs) exist."""

    source: str
    """Hugging Face Hub dataset repo id; for kind="file", a text file relative to the current directory."""
    kind: Literal["hub", "file"] = "hub"
    """"hub": streamed from the Hub (or a local directory with the repo's name); "file": a local file."""
    configs: list[str] = Field(min_length=1)
    """Config (subset) names offered; the first is the default."""
    config_pattern: str | None = None
    """Regular expression matching further valid config names (e.g. every Common Crawl dump)."""
    no_text: dict[str, str] = Field(default_factory=dict)
    """Configs that exist but hold no text, each with the reason, so asking for them gets a clear refusal."""
    text_column: str = "text"
    """Column holding the documents' text (for conversations: the list of messages)."""
    conversations: bool = False
    """Rows are conversations (a list of {role, content} messages), written with loss masks for fine-tuning."""
    prompts: bool = False
    """Rows are prompts with reference answers (text_column: the question; "answer": its reference), written as
    prompt data for reinforcement learning and generative evaluation (talm.data.prompts)."""
    preferences: bool = False
    """Rows are preference pairs (columns prompt, chosen, rejected; talm.data.preferences), for preference tuning."""
    train_split: str = "train"
    """The repo's split read for training (and, without val_split, for the validation split at its start)."""
    val_split: str | None = None
    """The repo's own held-out split, read whole (before train_split) as the validation split."""
    val_tokens: int = Field(ge=0)
    """Default size of the validation split, in tokens (taken from the start of the stream)."""

    @property
    def default_config(self) -> str:
        return self.configs[0]

    def config_error(self, name: str) -> str | None:
        """Why `name` is not a usable config of this dataset (None if it is)."""
        if name in self.no_text:
            return f"config {name!r} of {self.source} {self.no_text[name]}"
        if name in self.configs or (self.config_pattern and re.fullmatch(self.config_pattern, name)):
            return None
        valid = ", ".join(self.configs) + (" or a dump like CC-MAIN-2024-10" if self.config_pattern else "")
        return f"unknown config {name!r} of {self.source}: pass --ds-sample with one of {valid}"


_FINEWEB_CONFIGS = ["sample-10BT", "sample-100BT", "sample-350BT", "default"]

DATASET_PRESETS: dict[str, DatasetPreset] = {
    "fineweb": DatasetPreset(
        source="HuggingFaceFW/fineweb",
        configs=_FINEWEB_CONFIGS,
        config_pattern=_CC_DUMP,
        val_tokens=10_000_000,
    ),
    "fineweb-edu": DatasetPreset(
        source="HuggingFaceFW/fineweb-edu",
        configs=_FINEWEB_CONFIGS,
        config_pattern=_CC_DUMP,
        val_tokens=10_000_000,
    ),
    "smol": DatasetPreset(
        source="HuggingFaceTB/smollm-corpus",
        configs=["cosmopedia-v2", "fineweb-edu-dedup"],
        no_text={
            "python-edu": "holds no text, only Software Heritage blob ids of Python files: download those files "
            "yourself and pass them with --data-files, or pick cosmopedia-v2 or fineweb-edu-dedup"
        },
        val_tokens=10_000_000,
    ),
    # Conversations for supervised fine-tuning (SmolLM2's SFT mix, arXiv:2502.02737): every config lives in
    # data/CONFIG/{train,test}-*.parquet with columns messages (list of {content, role}) and source.
    "smoltalk": DatasetPreset(
        source="HuggingFaceTB/smoltalk",
        configs=[
            "all",
            "smol-magpie-ultra",
            "smol-constraints",
            "smol-rewrite",
            "smol-summarize",
            "apigen-80k",
            "everyday-conversations",
            "explore-instruct-rewriting",
            "longalign",
            "metamathqa-50k",
            "numina-cot-100k",
            "openhermes-100k",
            "self-oss-instruct",
            "systemchats-30k",
        ],
        text_column="messages",
        conversations=True,
        val_tokens=1_000_000,
    ),
    # Grade-school math word problems (Cobbe et al. 2021) as prompts for RL with verifiable rewards: configs
    # main/ and socratic/, each {train,test}-00000-of-00001.parquet with columns question and answer (the
    # worked solution, ending "#### N").
    "gsm8k": DatasetPreset(
        source="openai/gsm8k",
        configs=["main", "socratic"],
        text_column="question",
        prompts=True,
        val_split="test",
        val_tokens=0,
    ),
    # Preference pairs (Zephyr's DPO data, arXiv:2310.16944): data/{train,test}_prefs-*.parquet with columns
    # prompt, prompt_id, chosen and rejected (lists of {content, role}), messages, score_chosen, score_rejected.
    "ultrafeedback": DatasetPreset(
        source="HuggingFaceH4/ultrafeedback_binarized",
        configs=["default"],
        text_column="chosen",
        preferences=True,
        train_split="train_prefs",
        val_split="test_prefs",
        val_tokens=0,
    ),
    "tinyshakespeare": DatasetPreset(
        source="tiny-shakespeare.txt", kind="file", configs=["default"], val_tokens=40_000
    ),
}

# Validation split of a corpus given with --data-files (when --val-tokens is not passed).
DEFAULT_VAL_TOKENS = 1_000_000


def _int_from_text(value: Any) -> Any:
    """Accept 1e8, 100_000_000 or 1,000,000 for token counts (other values are left to validation)."""
    if isinstance(value, str):
        text = value.strip().replace("_", "").replace(",", "")
        try:
            number = float(text)
        except ValueError:
            return value
        if number.is_integer():
            return int(number)
    return value


def _count_from_text(text: str) -> int:
    value = _int_from_text(text)
    if not isinstance(value, int):
        raise ValueError(text)
    return value


# A number of tokens: an int, or text such as "1e9", "100_000_000" or "1,000,000" (typed on the command line).
TokenCount = Annotated[
    int,
    BeforeValidator(_int_from_text),
    FlagType(_count_from_text, "a whole number of tokens (e.g. 100000, 1e9 or 1_000_000)"),
]


class DownloadConfig(Config):
    """What `download_data` streams, how it tokenizes it, and where the shards go."""

    dataset: str
    """A preset (fineweb, fineweb-edu, smol, smoltalk, ultrafeedback, gsm8k, tinyshakespeare) or, with
    --data-files, any name for your corpus."""
    ds_sample: str | None = None
    """The dataset's config (subset), e.g. sample-10BT or CC-MAIN-2024-10; unset means the preset's default."""
    tokenizer_path: PathField = Path("tokenizers/base.json")
    """Tokenizer file (talm or original talm format) used to encode the text."""
    dir_prefix: str | None = None
    """Prefix of the output directory's name: data/DATASET/PREFIX_SAMPLE/."""
    data_root: PathField = Path("data")
    """Directory holding all prepared datasets."""
    max_tokens: TokenCount | None = Field(default=None, ge=1)
    """Stop after this many training tokens (accepts 1e9); unset means the whole sample."""
    val_tokens: TokenCount | None = Field(default=None, ge=0)
    """Tokens of the validation split, whole documents from the start of the stream (0: none). Unset means the
    preset's default (10M for the web corpora), capped at a tenth of --max-tokens."""
    shard_size: TokenCount = Field(default=100_000_000, ge=1)
    """Tokens per shard file (the last shard of each split may be shorter)."""
    num_proc: int | None = Field(default=None, ge=1)
    """Threads the tokenizer encodes with; unset means one per core this process may use."""
    overwrite: bool = False
    """Delete what an earlier run (of this worker) wrote to the output directory and start afresh."""
    num_workers: int = Field(default=1, ge=1)
    """Number of processes (on one or many machines) that together fill one directory, each with its own part."""
    worker_index: int = Field(default=0, ge=0)
    """Which of the --num-workers parts this process prepares (0-based)."""
    data_files: list[str] | None = None
    """Your own text instead of the Hub: files, globs or directories of parquet, jsonl/json, csv or txt."""
    text_column: str | None = None
    """Column holding the text (default: the preset's, else "text", or "messages" with --conversations); txt files
    are split at blank lines."""
    conversations: bool = False
    """--data-files hold conversations, not text: each row's column (--text-column, default "messages") is a list
    of {"role": "system"|"user"|"assistant", "content": str} messages, rendered with talm's chat format and
    written with loss masks for supervised fine-tuning (presets such as smoltalk set this themselves)."""
    prompts: bool = False
    """--data-files hold prompts with reference answers, not text: each row's "prompt" (a user message, or a list
    of messages ending with the user's; --text-column names another column) and "answer" (the reference: a
    number, or text ending "#### N"), written as prompt data for train_model --preset grpo (presets such as
    gsm8k set this themselves)."""
    val_prompts: int | None = Field(default=None, ge=0)
    """Prompt data: prompts held out for validation, the first ones of --data-files (unset: a tenth of them, at
    most 500). A preset with a test split (gsm8k) holds that split out instead."""
    preferences: bool = False
    """--data-files hold preference pairs: each row has "chosen" and "rejected" (whole conversations: lists of
    messages ending with the assistant's reply), or "prompt" (messages, or the user's text) plus "chosen" and
    "rejected" replies (text, or assistant messages); written with loss masks on each side's reply, for
    train_model --preset dpo (presets such as ultrafeedback set this themselves)."""

    @model_validator(mode="after")
    def _check(self) -> DownloadConfig:
        # TalmError (not ValueError) passes through pydantic as is: these messages are whole sentences.
        if not is_plain_name(self.dataset):
            raise TalmError(f"dataset name {self.dataset!r} is not a plain name: {PLAIN_NAME_RULE}")
        preset = DATASET_PRESETS.get(self.dataset)
        if preset is None and not self.data_files:
            raise TalmError(
                f"unknown dataset {self.dataset!r}: choose one of {', '.join(DATASET_PRESETS)}, "
                "or pass your own files with --data-files"
            )
        if preset is not None and self.ds_sample is not None and not self.data_files:
            error = preset.config_error(self.ds_sample)
            if error:
                raise TalmError(error)
        for label, value in (("--ds-sample", self.ds_sample), ("--dir-prefix", self.dir_prefix)):
            if value is not None and not is_plain_name(value):
                raise TalmError(f"{label} {value!r} is not a plain name: {PLAIN_NAME_RULE}")
        if self.is_conversations and self.is_prompts:
            raise TalmError(
                "--conversations and --prompts exclude each other: pass --prompts for prompts with reference "
                "answers, --conversations for conversations to fine-tune on"
            )
        if self.prompts and not self.data_files and not (preset and preset.prompts):
            raise TalmError("--prompts reads your own files: pass them with --data-files FILE")
        if self.is_prompts and self.num_workers > 1:
            raise TalmError("prompt data is written by one process: drop --num-workers and --worker-index")
        token_flags = {"max_tokens", "val_tokens", "shard_size", "num_proc"} & self.model_fields_set
        if self.is_prompts and token_flags:
            flags = ", ".join(f"--{f.replace('_', '-')}" for f in sorted(token_flags))
            raise TalmError(
                f"prompt data is written whole as prompts, not token shards: drop {flags} (--val-prompts sets "
                "how many of your prompts are held out)"
            )
        if self.val_prompts is not None and not self.is_prompts:
            raise TalmError(
                "--val-prompts is for prompt data (gsm8k, --prompts): use --val-tokens for tokens"
            )
        if self.conversations and self.preferences:
            raise TalmError(
                "--conversations and --preferences exclude each other: pass the one your rows hold"
            )
        if self.is_preferences and self.text_column:
            raise TalmError(
                "--preferences reads the columns prompt, chosen and rejected: drop --text-column (rename the "
                "columns of your files if they are called otherwise)"
            )
        if preset is not None and preset.val_split and not self.data_files and self.val_tokens is not None:
            raise TalmError(
                f"{self.dataset} has its own validation split ({preset.val_split}), written whole: drop --val-tokens"
            )
        if self.worker_index >= self.num_workers:
            raise TalmError(
                f"--worker-index {self.worker_index} is out of range for --num-workers {self.num_workers}: "
                f"pass an index from 0 to {self.num_workers - 1}"
            )
        return self

    @property
    def preset(self) -> DatasetPreset | None:
        return DATASET_PRESETS.get(self.dataset)

    @property
    def sample(self) -> str:
        """The config (subset) name: the one asked for, else the preset's default, else "default"."""
        if self.ds_sample is not None:
            return self.ds_sample
        return self.preset.default_config if self.preset else "default"

    @property
    def is_conversations(self) -> bool:
        """Rows are conversations (--conversations, or a conversation preset such as smoltalk)."""
        return self.conversations or bool(self.preset and self.preset.conversations)

    @property
    def is_prompts(self) -> bool:
        """Rows are prompts with reference answers (--prompts, or a prompt preset such as gsm8k)."""
        return self.prompts or bool(self.preset and self.preset.prompts)

    @property
    def is_preferences(self) -> bool:
        """Rows are preference pairs (--preferences, or a preference preset such as ultrafeedback)."""
        return self.preferences or bool(self.preset and self.preset.preferences)

    @property
    def column(self) -> str:
        if self.text_column:
            return self.text_column
        if self.prompts and not (self.preset and self.preset.prompts):
            return "prompt"
        if self.is_preferences:
            return "chosen"  # the column every pair needs; the others are read beside it
        if self.preset:
            return self.preset.text_column
        return "messages" if self.is_conversations else "text"

    @property
    def out_dir(self) -> Path:
        """data/DATASET/[PREFIX_]SAMPLE"""
        name = f"{self.dir_prefix}_{self.sample}" if self.dir_prefix else self.sample
        return self.data_root / self.dataset / name

    @property
    def own_val_split(self) -> str | None:
        """The source's own held-out split, written whole as the val split (None: the stream's first tokens)."""
        return None if self.data_files or not self.preset else self.preset.val_split

    @property
    def val_target(self) -> int | None:
        """Validation tokens asked for in total (over all workers); None: the source's own val split, whole."""
        if self.own_val_split:
            return None
        if self.val_tokens is not None:
            return self.val_tokens
        default = self.preset.val_tokens if self.preset else DEFAULT_VAL_TOKENS
        return min(default, self.max_tokens // 10) if self.max_tokens else default
