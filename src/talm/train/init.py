"""Where an `--init-from` run's first weights come from: a talm model directory, a local transformers model
directory, or a Hugging Face Hub id (downloaded with `huggingface_hub.snapshot_download` into its cache).

`resolve_source` reads what the run's config needs (the source's architecture and tokenizer) without loading
the weights; `initialize` checks the data's tokenizer is the source's and loads the weights into the freshly
built model. The architecture mapping of transformers models is `talm.model.hf`'s. Loading never executes code:
safetensors, or pytorch_model.bin through torch.load(weights_only=True), and JSON.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from talm.config import validate
from talm.errors import TalmError
from talm.model.config import ModelConfig
from talm.model.gpt import GPT
from talm.model.hf import from_hf_config, from_hf_state_dict, is_network_error
from talm.train.checkpoint import META, WEIGHTS, damaged, first_non_finite, is_checkpoint, read_meta

if TYPE_CHECKING:
    from talm.tokenizer.api import Tokenizer
    from talm.train.config import RunConfig
    from talm.train.parallel import Parallel

WHAT = (
    "pass a talm model directory (models/NAME, or its best/ or latest/), a transformers model directory "
    "(config.json and model.safetensors) or a Hugging Face Hub id (gpt2, HuggingFaceTB/SmolLM2-135M)"
)
# What a Hub download fetches: the weights as safetensors (else pytorch_model.bin), config and tokenizer.
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
SAFETENSORS = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
TORCH_BIN = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]
HUB_TIMEOUT_S = 5.0  # per request: an unreachable Hub is reported within seconds


@dataclass(frozen=True)
class Source:
    """A resolved --init-from: what it is, where its files are, its architecture and its tokenizer."""

    name: str  # as the user gave it
    kind: str  # "talm" or "transformers"
    path: Path  # the checkpoint directory (talm) or the model directory (transformers)
    config: ModelConfig
    tokenizer_path: Path

    @property
    def config_file(self) -> Path:
        """The file the source's architecture was read from."""
        return self.path / (META if self.kind == "talm" else "config.json")

    def describe(self) -> str:
        where = "" if str(self.path) == self.name else f" ({self.path})"
        return f"{self.name}{where}, a {self.kind} model"


def resolve_source(name: str) -> Source:
    """The source `name` names (read only: config and tokenizer location, never the weights); TalmError in one
    line for a directory that is not a model, an architecture talm cannot compute, or an unreachable Hub."""
    path = Path(name).expanduser()
    if path.is_dir():
        return _talm_source(name, path) or _transformers_source(name, path)
    if path.exists():
        raise TalmError(f"--init-from {name!r} is a file, not a model directory: {WHAT}")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.startswith("models/"):
        raise TalmError(f"--init-from {name!r}: no such directory: {WHAT}")
    return _transformers_source(name, download(name))


def _talm_source(name: str, path: Path) -> Source | None:
    for checkpoint in (path, path / "latest", path / "best"):
        if is_checkpoint(checkpoint):
            meta = read_meta(checkpoint)
            try:
                config = validate(
                    ModelConfig, meta["config"]["model"], names_in(f"{checkpoint / META}'s model.")
                )
            except TalmError as err:
                raise TalmError(f"--init-from {name!r}: {err}: pass an intact talm model") from None
            tokenizer = (meta["tokenizer"] or {}).get("file", "tokenizer.json")
            found = [p for p in (checkpoint / tokenizer, checkpoint.parent / tokenizer) if p.is_file()]
            return Source(
                name, "talm", checkpoint, config, found[0] if found else checkpoint.parent / tokenizer
            )
    return None


def _transformers_source(name: str, path: Path) -> Source:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise TalmError(f"--init-from {name!r} holds no model (no checkpoint.json nor config.json): {WHAT}")
    try:
        hf = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TalmError(f"cannot read {str(config_file)!r} ({err}): pass an intact model directory") from None
    if not isinstance(hf, dict):
        raise TalmError(f"{str(config_file)!r} is not a JSON object: pass an intact model directory")
    config = from_hf_config(hf, f"--init-from {name!r} ({config_file})")
    return Source(name, "transformers", path, config, path / "tokenizer.json")


def names_in(prefix: str) -> dict[str, str]:
    """How a refusal of a ModelConfig read from a file names each field: `prefix` + the field's name (not the
    run's --model.* flag, which the user did not pass)."""
    return {field: prefix + field for field in ModelConfig.model_fields} | {"": prefix.rstrip(".")}


@functools.cache  # once per process: the run resolves its source more than once
def download(repo_id: str) -> Path:
    """The local snapshot of Hub model `repo_id` (the cache's, if the Hub cannot be reached), config,
    tokenizer and weights only."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    local_copy = f"download it where the Hub is reachable (`hf download {repo_id} --local-dir DIR`) and pass --init-from DIR"

    def fetch(patterns: list[str], local_only: bool) -> Path:
        return Path(
            snapshot_download(
                repo_id, allow_patterns=patterns, local_files_only=local_only, etag_timeout=HUB_TIMEOUT_S
            )
        )

    try:
        try:  # one bounded request first (the Hub client itself waits without a limit on a silent network)
            HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
            local_only = False
        except Exception as err:
            if not is_network_error(err):
                raise
            local_only = True  # unreachable or HF_HUB_OFFLINE: the local cache's copy, if it has one
        path = fetch(HUB_FILES + SAFETENSORS, local_only)
        if not any(path.glob("*.safetensors")):  # an older repo: its weights only as pytorch_model.bin
            path = fetch(TORCH_BIN, local_only)
    except HFValidationError:
        raise TalmError(f"--init-from {repo_id!r} is neither a directory nor a Hub id: {WHAT}") from None
    except GatedRepoError:
        raise TalmError(
            f"Hub model {repo_id!r} is gated: accept its license on huggingface.co and log in (`hf auth login`), "
            f"or {local_copy}"
        ) from None
    except RepositoryNotFoundError:
        raise TalmError(
            f"--init-from {repo_id!r}: no such directory, nor a model on the Hub: {WHAT}"
        ) from None
    except Exception as err:
        if is_network_error(err) or isinstance(err, LocalEntryNotFoundError):
            raise TalmError(
                f"--init-from {repo_id!r}: no such directory, and as a Hub id: the Hugging Face Hub is "
                f"unreachable and {repo_id!r} is not in the local cache: check your "
                f"network connection, or {local_copy}"
            ) from None
        raise
    return path


def read_weights(path: Path, where: str) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers model directory: model.safetensors (or its shards), else
    pytorch_model.bin (or its shards) through torch.load(weights_only=True)."""
    from safetensors.torch import load_file

    files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise TalmError(f"{where} has no weights (model.safetensors or pytorch_model.bin): {WHAT}")
    tensors: dict[str, Any] = {}
    for file in files:
        try:
            if file.suffix == ".safetensors":
                tensors |= load_file(str(file))
            else:
                tensors |= torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 -- truncated or garbled: safetensors, zip, pickle or EOF errors
            raise TalmError(
                f"cannot load {str(file)!r} ({type(err).__name__}): pass an intact model"
            ) from None
    return tensors


def source_state_dict(source: Source, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The source's weights as a state dict of `GPT(config)` (the source's architecture, perhaps a shorter
    context: GPT-2's position table then keeps its first rows)."""
    where = f"--init-from {source.name!r}"
    if source.kind == "transformers":
        state = from_hf_state_dict(config, read_weights(source.path, where), where)
        bad = first_non_finite(state)
        if bad:  # a damaged download: a model's weights are finite
            raise TalmError(f"{where} holds non-finite values in {bad}: pass an intact model to --init-from")
        return state
    from safetensors.torch import load_file

    # A damaged talm checkpoint is a DamagedCheckpoint: train_model words its fix (--init-from).
    try:
        state = load_file(str(source.path / WEIGHTS))
    except Exception as err:  # noqa: BLE001 -- truncated or garbled
        raise damaged(source.path / WEIGHTS, err) from None
    bad = first_non_finite(state)
    if bad:  # bytes overwritten: a checkpoint never holds NaN or infinity (see talm.train.checkpoint)
        raise damaged(source.path / WEIGHTS, f"non-finite values in {bad}")
    if "pos_emb.weight" in state:
        state["pos_emb.weight"] = state["pos_emb.weight"][: config.context_length]
    if config.tie_embeddings:  # safetensors stores a shared tensor under one of its names
        shared = state.get("tok_emb.weight", state.get("lm_head.weight"))
        if shared is not None:
            state["tok_emb.weight"] = state["lm_head.weight"] = shared
    return state


def source_fingerprint(source: Source) -> str:
    """The fingerprint of the source's tokenizer (what the data must be made with)."""
    from talm.tokenizer.api import Tokenizer  # noqa: F811 -- the runtime import of the name checked above

    if source.kind == "talm":
        return read_meta(source.path)["tokenizer"]["fingerprint"]
    if not source.tokenizer_path.is_file():
        raise TalmError(
            f"--init-from {source.name!r} has no tokenizer.json (talm reads the tokenizers JSON format): "
            "start from a model that ships one"
        )
    try:
        return Tokenizer.from_file(source.tokenizer_path).fingerprint
    except TalmError as err:
        raise TalmError(
            f"the tokenizer of --init-from {source.name!r} cannot be used by talm: {err}"
        ) from None


def check_tokenizer(source: Source, fingerprint: str | None, tokenizer: str | None, data_dir: str) -> None:
    """Refuse training the source on data made with another tokenizer (`tokenizer`, of that `fingerprint`)."""
    if fingerprint != source_fingerprint(source):
        raise TalmError(
            f"{data_dir!r} was made with tokenizer {tokenizer!r}, not with the one of --init-from "
            f"{source.name!r}: prepare the data with the source's tokenizer (download_data ... -t "
            f"{source.tokenizer_path})"
        )


def check_data(name: str, data_dir: str) -> None:
    """Before the run builds anything: the data directory must be made with the source's tokenizer."""
    from talm.data.manifest import read_data
    from talm.data.prompts import directory_kind, read_prompts

    data = (
        read_prompts(data_dir)
        if directory_kind(data_dir) == "prompts"
        else read_data(data_dir, splits=("train",))
    )
    check_tokenizer(
        resolve_source(name), data.tokenizer.get("fingerprint"), data.tokenizer.get("path"), data_dir
    )


def build_model(cfg: RunConfig, tokenizer: Tokenizer, parallel: Parallel, *, resumed: bool) -> GPT:
    """The run's GPT on its device, whole or sharded as `parallel` builds it: with --init-from (and not resuming:
    the checkpoint's weights come next), the source's weights, once the data's tokenizer is checked to be the
    source's; else the random init."""
    model = parallel.build()
    if cfg.train.init_from and not resumed:
        initialize(model, cfg.train.init_from, tokenizer, cfg.data.dir)
    return model


def describe(name: str) -> str:
    """The source for the run's banner: `NAME (its path), a talm|transformers model`."""
    return resolve_source(name).describe()


def initialize(model: GPT, name: str, tokenizer: Tokenizer, data_dir: str) -> Source:
    """Load the weights of source `name` into `model` (built from the source's architecture), once the data's
    tokenizer is checked to be the source's."""
    source = resolve_source(name)
    check_tokenizer(source, tokenizer.fingerprint, str(tokenizer.path), data_dir)
    if any(isinstance(p, DTensor) for p in model.parameters()):
        load_sharded(model, source)
        return source
    state = source_state_dict(source, model.config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise TalmError(misfit_line(source, " ".join(str(err).split()))) from None
    return source


def misfit_line(source: Source, why: str) -> str:
    return f"the weights of --init-from {source.name!r} do not fit its config ({why[:300]}): pass an intact model"


def misfit(model: GPT, state: dict[str, torch.Tensor]) -> str | None:
    """Why `state` cannot load into `model` (whole or sharded: the shapes compared are the whole ones), or None."""
    want = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    have = {name: tuple(t.shape) for name, t in state.items()}
    missing, unexpected = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    wrong = [f"{n}: {have[n]} for {want[n]}" for n in sorted(want.keys() & have.keys()) if want[n] != have[n]]
    problems = [f"missing {', '.join(missing)}"] if missing else []
    problems += [f"unexpected {', '.join(unexpected)}"] if unexpected else []
    problems += [f"shape of {w}" for w in wrong]
    return "; ".join(problems) or None


def load_sharded(model: GPT, source: Source) -> None:
    """The source's weights into an FSDP model: rank 0 alone reads them (no other process holds the whole
    model) and sends each tensor to the others, each keeping its rows. Every process first learns whether rank 0
    could read and fit them, so a bad source stops all of them with the same line instead of leaving the others
    waiting."""
    state, problem = {}, None
    if torch.distributed.get_rank() == 0:
        try:
            state = source_state_dict(source, model.config)
            why = misfit(model, state)
            problem = misfit_line(source, why) if why else None
        except TalmError as err:
            problem = str(err)
    verdict = [problem]
    torch.distributed.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise TalmError(verdict[0])
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state, options=options)


def apply_source(
    data: dict[str, Any], layers: list[dict[str, Any]], flag_names: dict[str, str] | None
) -> dict[str, Any]:
    """The run's settings `data` (merged layers) with the model section taken from the --init-from source;
    a model setting of the layers (preset, TOML, flags) that contradicts it is refused, naming it. The
    dropout, and a context no longer than the source's, may be chosen."""
    name = (data.get("train") or {}).get("init_from")
    if not name:
        return data
    source = resolve_source(name)
    arch = source.config.model_dump(mode="json")
    model = dict(arch)
    for layer in layers:
        for key, value in (layer.get("model") or {}).items():
            flag = (flag_names or {}).get(f"model.{key}", f"model.{key}")
            if key == "dropout" or (
                key == "context_length" and isinstance(value, int) and value <= arch[key]
            ):
                model[key] = value
            elif key not in arch or value != arch[key]:
                raise TalmError(
                    f"{flag} {value} contradicts --init-from {name!r} (model.{key}={arch.get(key)}): a run started "
                    f"from a model takes its architecture; drop {flag} (from the flags, --config or --preset)"
                    + (", or lower it: a shorter context is allowed" if key == "context_length" else "")
                )
    return {**data, "model": model}
