"""Configuration as data: one pydantic model per concern, validated once at the edge.

Every config class derives from `Config`: typed fields whose docstrings become the `--help` text of the
command-line flags (see `talm.cli.common`), unknown keys rejected (`extra="forbid"`), cross-field rules as
validators. Configs can be read from TOML files and overridden field by field; a validation failure becomes a
one-line `TalmError` naming the field, the value and the rule.

Field values are strict (pydantic strict mode): a bool is not an int and a string is not a number, whether
the value comes from a TOML file or from Python (`n_layer = true` is refused, not read as 1). Command-line flags
are text, so `talm.cli.common` converts each flag to its field's type before validation. Every float field
refuses nan and inf ("must be a finite number"), for every config, through the base class.

This module is a leaf: it imports nothing else from talm but `errors`, and never torch.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from talm.errors import TalmError


class Config(BaseModel):
    """Base of every talm config: strict about unknown keys and value types, finite floats, documented field
    by field."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,  # a bool is not an int, a string is not a number (ints are still accepted as floats)
        allow_inf_nan=False,  # every float field of every config: nan and inf are refused
        use_attribute_docstrings=True,
        validate_assignment=True,
        validate_default=True,
    )


@dataclass(frozen=True)
class FlagType:
    """Field metadata for `talm.cli.common`: how to turn the text of the field's command-line flag into a value
    (used instead of the converter derived from the field's type). `parse` raises ValueError on bad text."""

    parse: Callable[[str], Any]
    expected: str
    """What the text should look like, for the error message ("a token count such as 1e9")."""


# A file or directory path: a string is a fine spelling of a path, so paths are not strict.
PathField = Annotated[Path, Strict(False)]

SEED_LIMIT = 2**63


def _check_seed(seed: int) -> int:
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"must be from 0 to 2**63-1 ({SEED_LIMIT - 1}): pass e.g. 0")
    return seed


# A random seed: torch and numpy take seeds in [0, 2**63).
Seed = Annotated[int, AfterValidator(_check_seed)]

# Names of value types in messages, as a TOML or Python user would call them.
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list"}
_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "path_type": "a path",
    "model_type": "a table",
    "dict_type": "a table",
}


def _type_name(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    return _TYPE_NAMES.get(type(value), f"a {type(value).__name__}")


def describe_validation_error(err: ValidationError, flag_names: dict[str, str] | None = None) -> str:
    """One line for a pydantic error: which field, which value, which rule.

    `flag_names` maps a dotted field path ("model.n_layer") to how the user spelled it ("--model.n_layer"),
    so the message names what the user typed.
    """
    flag_names = flag_names or {}
    parts = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        name = flag_names.get(path, path or "config")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown setting {name!r}: check its spelling (see --help for the valid ones)")
            continue
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        value = e.get("input")
        if e["type"] in _EXPECTED:
            msg = f"must be {_EXPECTED[e['type']]}, not {_type_name(value)}"
        elif e["type"] == "finite_number":
            msg = "must be a finite number"
        if isinstance(value, dict) or path == "":
            parts.append(f"{name}: {msg}")
        else:
            parts.append(f"{name}={value!r}: {msg}")
    return "; ".join(parts)


def validate(cls: type[Config], data: dict[str, Any], flag_names: dict[str, str] | None = None) -> Any:
    """Build `cls` from plain data, turning a validation failure into a one-line TalmError."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise TalmError(describe_validation_error(err, flag_names)) from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into plain data (validated later, together with any overrides)."""
    p = Path(path)
    if not p.is_file():
        raise TalmError(f"config file {str(p)!r} not found: pass the path of an existing .toml file")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise TalmError(f"config file {str(p)!r} is not valid TOML ({err}): fix the file") from None


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` into a copy of `base` (nested tables merge, other values replace)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """`set_dotted(d, "model.n_layer", 12)` sets d["model"]["n_layer"] = 12, creating tables as needed."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[leaf] = value


# ----------------------------------------------------------------------------------------------------------------
# The model's shape. (Each stage adds its own config class below, in the order of the pipeline.)


class ModelConfig(Config):
    """The transformer's architecture: everything needed to rebuild the same network from its weights."""

    vocab_size: int | None = Field(default=None, ge=2)
    """Token ids the model knows; taken from the tokenizer when not set. Padded to a multiple of 64 inside."""
    context_length: int = Field(default=256, ge=1)
    """Longest sequence (in tokens) the model attends over."""
    n_layer: int = Field(default=6, ge=1)
    """Number of transformer blocks."""
    n_head: int = Field(default=6, ge=1)
    """Attention heads per block (query heads)."""
    n_kv_head: int | None = Field(default=None, ge=1)
    """Key/value heads for grouped-query attention; must divide n_head. Unset means n_head (plain attention)."""
    d_model: int = Field(default=384, ge=2)
    """Width of the residual stream; must be a multiple of n_head with an even head size."""
    mlp_hidden: int | None = Field(default=None, ge=1)
    """Hidden width of the SwiGLU MLP. Unset means 8/3 * d_model rounded up to a multiple of 64."""
    rope_theta: float = Field(default=10000.0, gt=0)
    """Base of the rotary position embedding's frequencies."""
    norm_eps: float = Field(default=1e-5, gt=0)
    """Epsilon of the RMSNorm layers."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output layer."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on attention and residual outputs during training (0 for pretraining on enough data)."""

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}: "
                "pick a width that is a multiple of the head count"
            )
        if (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"head size d_model/n_head={self.d_model // self.n_head} is odd: rotary embeddings need an even "
                "head size"
            )
        if self.n_head % self.kv_heads:
            raise ValueError(
                f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}: pick a divisor of n_head"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_dim(self) -> int:
        return self.mlp_hidden or 64 * -(-(8 * self.d_model // 3) // 64)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding matrix: the vocab rounded up to a multiple of 64 for fast matmuls."""
        if self.vocab_size is None:
            raise ValueError("vocab_size is not set: take it from the tokenizer before building the model")
        return 64 * -(-self.vocab_size // 64)


# ================================================================================================================
# Tokenizer stage (tokenizer.py, cli/train_tokenizer.py)
# ================================================================================================================

# Special tokens every talm tokenizer reserves, in id order after the ordinary tokens: the document separator,
# then the chat roles (reserved like the original talm did, for later fine-tuning).
SPECIAL_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>")
# 256 byte tokens + the specials is the smallest useful vocabulary; 2**20 is far beyond any sensible one.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
MAX_VOCAB_SIZE = 2**20
_TOKENIZER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class TokenizerConfig(Config):
    """What `train_tokenizer` trains: a byte-level BPE written to tokenizers/NAME.json."""

    vocab_size: int
    """Total token ids, counting the 256 byte tokens and the 4 special tokens (so merges = vocab_size - 260)."""
    name: str
    """Name of the tokenizer: it is written to tokenizers/NAME.json."""
    text_files: list[PathField] = Field(default_factory=lambda: [Path("tiny-shakespeare.txt")], min_length=1)
    """UTF-8 text file(s) to train on, read as a stream (they may be larger than memory)."""
    force: bool = False
    """Overwrite tokenizers/NAME.json if it already exists."""

    @field_validator("vocab_size")
    @classmethod
    def _check_vocab_size(cls, vocab_size: int) -> int:
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"must be at least {MIN_VOCAB_SIZE} (256 byte tokens + {len(SPECIAL_TOKENS)} special tokens): "
                "pick e.g. 1024 for tiny-shakespeare, 32768 or more for web text"
            )
        if vocab_size > MAX_VOCAB_SIZE:
            raise ValueError(f"must be at most {MAX_VOCAB_SIZE}: pick e.g. 32768 to 131072 for web text")
        return vocab_size

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not name:
            raise ValueError("the name is empty: pass a plain name such as 'mytok'")
        if "/" in name or "\\" in name:
            raise ValueError("the name contains a path separator: pass a plain name such as 'mytok'")
        if name.endswith(".json"):
            raise ValueError(f"drop the .json suffix: pass {name[: -len('.json')]!r}")
        if len(name) > 100 or not _TOKENIZER_NAME.fullmatch(name):
            raise ValueError(
                "use only letters, digits, '.', '_' and '-' (at most 100, starting with a letter or digit)"
            )
        return name


# ================================================================================================================
# Data stage (corpus.py, shards.py, cli/download_data.py)
# ================================================================================================================

# Every Common Crawl dump is a config of fineweb / fineweb-edu, named like CC-MAIN-2024-10.
_CC_DUMP = r"CC-MAIN-\d{4}-\d{2}"
# A dataset or directory name the user types: no path separators, no leading dot.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


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
    """Column holding the documents' text."""
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
    """A preset (fineweb, fineweb-edu, smol, tinyshakespeare) or, with --data-files, any name for your corpus."""
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
    """Cores this process may use (tokenizing runs on all of them); unset means every core."""
    overwrite: bool = False
    """Delete what an earlier run (of this worker) wrote to the output directory and start afresh."""
    num_workers: int = Field(default=1, ge=1)
    """Number of processes (on one or many machines) that together fill one directory, each with its own part."""
    worker_index: int = Field(default=0, ge=0)
    """Which of the --num-workers parts this process prepares (0-based)."""
    data_files: list[str] | None = None
    """Your own text instead of the Hub: files, globs or directories of parquet, jsonl/json, csv or txt."""
    text_column: str | None = None
    """Column holding the text (default: the preset's, else "text"); txt files are split at blank lines."""

    @model_validator(mode="after")
    def _check(self) -> DownloadConfig:
        # TalmError (not ValueError) passes through pydantic as is: these messages are whole sentences.
        if not _PLAIN_NAME.fullmatch(self.dataset):
            raise TalmError(
                f"dataset name {self.dataset!r} is not a plain name: use letters, digits, '.', '-' or '_'"
            )
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
            if value is not None and not _PLAIN_NAME.fullmatch(value):
                raise TalmError(
                    f"{label} {value!r} is not a plain name: use letters, digits, '.', '-' or '_'"
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
    def column(self) -> str:
        return self.text_column or (self.preset.text_column if self.preset else "text")

    @property
    def out_dir(self) -> Path:
        """data/DATASET/[PREFIX_]SAMPLE"""
        name = f"{self.dir_prefix}_{self.sample}" if self.dir_prefix else self.sample
        return self.data_root / self.dataset / name

    @property
    def val_target(self) -> int:
        """Validation tokens asked for in total (over all workers)."""
        if self.val_tokens is not None:
            return self.val_tokens
        default = self.preset.val_tokens if self.preset else DEFAULT_VAL_TOKENS
        return min(default, self.max_tokens // 10) if self.max_tokens else default


# ================================================================================================================
# Training stage (loader.py, optim.py, trainer.py, checkpoint.py, cli/train_model.py)
# ================================================================================================================


class OptimConfig(Config):
    """AdamW and its learning-rate schedule: linear warmup, then cosine decay to a floor."""

    lr: float = Field(default=6e-4, gt=0)
    """Peak learning rate, reached at the end of warmup."""
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """The floor the cosine decays to, as a fraction of lr (0.1 = lr/10)."""
    warmup_steps: int = Field(default=100, ge=0)
    """Optimizer steps of linear warmup from ~0 to lr."""
    weight_decay: float = Field(default=0.1, ge=0.0)
    """AdamW weight decay, applied to matrices only (not to norms' gains)."""
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    """AdamW beta1 (momentum of the gradient average)."""
    beta2: float = Field(default=0.95, ge=0.0, lt=1.0)
    """AdamW beta2 (momentum of the squared-gradient average)."""
    eps: float = Field(default=1e-8, gt=0)
    """AdamW epsilon."""
    grad_clip: float = Field(default=1.0, ge=0.0)
    """Clip the global gradient norm to this value (0 disables clipping)."""


class TrainConfig(Config):
    """The training loop: batch, length, evaluation, checkpoints, device and precision."""

    max_steps: int = Field(default=5000, ge=1)
    """Optimizer steps to train for (the cosine schedule ends here)."""
    batch_size: int = Field(default=16, ge=1)
    """Sequences per micro-batch on each process."""
    tokens_per_step: int | None = Field(default=None, ge=1)
    """Tokens per optimizer step, over all processes; reached by gradient accumulation. Must be a multiple of
    batch_size * context_length * processes. Unset means one micro-batch per process per step."""
    eval_every: int = Field(default=250, ge=1)
    """Evaluate on the validation slice every this many steps (and at the end)."""
    eval_tokens: int = Field(default=262144, ge=1)
    """Tokens of the validation split evaluated each time (a fixed slice from its start)."""
    save_every: int = Field(default=500, ge=1)
    """Save the latest checkpoint every this many steps (and at the end, and on Ctrl-C)."""
    log_every: int = Field(default=10, ge=1)
    """Write a train-loss line to metrics.jsonl every this many steps."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where to train: auto picks cuda, then mps, then cpu."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Autocast precision: auto = bfloat16 on GPUs that support it, float16 (with loss scaling) on older GPUs,
    float32 on cpu and mps."""
    compile: bool = False
    """Compile the model with torch.compile (faster on GPU after a warm-up; slow to start)."""
    deterministic: bool = False
    """Bitwise-reproducible runs (deterministic kernels; on CPU a resumed run repeats the same losses)."""
    seed: Seed = 1337
    """Seed of the model initialisation, the data order and dropout."""
    report_to: list[Literal["tensorboard", "wandb"]] = []
    """Also send metrics to these trackers (optional extras: pip install talm[tensorboard] / talm[wandb])."""


class DataConfig(Config):
    """Where the training tokens come from."""

    dir: str = ""
    """Directory of .npy shards and meta*.json manifest(s) written by download_data."""
    tokenizer_path: str | None = None
    """Tokenizer file; unset means the one the data was made with (from the manifest)."""


class RunConfig(Config):
    """Everything one training run needs; saved beside every checkpoint."""

    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()


# Named starting points for `train_model --preset NAME`; a TOML file and flags override them field by field.
PRESETS: dict[str, dict[str, Any]] = {
    # Trains on tiny-shakespeare in about two minutes on a 2-core CPU (val bits/byte ~2.1 from ~5 at start).
    "tiny": {
        "model": {"context_length": 128, "n_layer": 4, "n_head": 4, "d_model": 128},
        "optim": {"lr": 3e-3, "warmup_steps": 30, "weight_decay": 0.1, "min_lr_ratio": 0.1},
        "train": {
            "max_steps": 600,
            "batch_size": 16,
            "eval_every": 100,
            "eval_tokens": 32768,
            "save_every": 200,
            "log_every": 10,
        },
    },
    # A ~10M-parameter model for one small GPU (or a patient CPU).
    "small": {
        "model": {"context_length": 512, "n_layer": 6, "n_head": 6, "d_model": 384},
        "optim": {"lr": 1e-3, "warmup_steps": 200},
        "train": {"max_steps": 5000, "batch_size": 32, "eval_every": 250, "save_every": 500},
    },
    # GPT-2 small (124M with GPT-2's vocab): 12 layers, 768 wide, 1024 context, ~0.5M tokens per step.
    "gpt2-124m": {
        "model": {"context_length": 1024, "n_layer": 12, "n_head": 12, "d_model": 768},
        "optim": {"lr": 6e-4, "warmup_steps": 700, "weight_decay": 0.1},
        "train": {
            "max_steps": 19073,
            "batch_size": 16,
            "tokens_per_step": 524288,
            "eval_every": 250,
            "eval_tokens": 524288,
            "save_every": 1000,
            "compile": True,
        },
    },
}


# ================================================================================================================
# Using the model (sample.py, export.py, metrics plots, cli/generate.py, cli/export_model.py)
# ================================================================================================================


class SampleConfig(Config):
    """How `generate` picks each next token, and how many."""

    max_new_tokens: int = Field(default=256, ge=1)
    """Most tokens to generate per sample; generation also stops at <|endoftext|>."""
    temperature: float = Field(default=0.8, ge=0.0)
    """Divides the logits before sampling: lower is more predictable, 0 always picks the likeliest token."""
    top_k: int | None = Field(default=None, ge=1)
    """Sample only among the k likeliest tokens (unset: no limit)."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling: sample only among the likeliest tokens whose probabilities add up to top_p (1: all)."""
    num_samples: int = Field(default=1, ge=1)
    """Samples to generate for each prompt."""
    seed: Seed | None = None
    """Random seed: the same seed, prompt and settings give the same text (unset: different every run)."""
