"""Export a trained model to the Hugging Face transformers format, and push it to the Hub.

talm's GPT is the Llama architecture (or, with arch gpt2, GPT-2's), so an export is a renaming, defined once
in `talm.model.hf` (which the importer reads with): Llama, or Qwen3/Arcee/Apertus for the options Llama lacks,
or GPT2LMHeadModel. logit_softcap is refused: the models that cap logits (Gemma 2, NanoChat) differ elsewhere
(sandwich or gain-free norms). zero_init_proj is only an initialisation. The directory holds

    config.json              LlamaForCausalLM (or Qwen3/Arcee/Apertus/GPT2) config (vocab_size = the model's)
    model.safetensors        the weights, under transformers' names (lm_head omitted when tied)
    generation_config.json   bos/eos = <|endoftext|>
    tokenizer.json           the tokenizer, as a tokenizers JSON (loads as PreTrainedTokenizerFast)
    tokenizer_config.json    tokenizer class, bos/eos tokens, context length, talm's chat format as chat_template
    special_tokens_map.json
    README.md                a model card: architecture, training tokens, validation loss, how to load it

and `AutoModelForCausalLM.from_pretrained(DIR)` / `AutoTokenizer.from_pretrained(DIR)` load it as is. The
embedding's padding rows (it is padded to a multiple of 64 for speed) are dropped: they are never a real
token. The model keeps its own vocab_size, which training allows above the tokenizer's (the tokenizer keeps its
own size): its extra rows are exported, since the Llama weights must match the config's vocab_size.

The target directory is checked before any work (`check_export_dir`); --overwrite replaces only an earlier
export (or an empty directory), never other files.
talm writes these files itself; transformers is needed only by whoever loads the export.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from talm.errors import TalmError
from talm.files import check_writable_dir, replace_dir, staging_dir
from talm.model.gpt import GPT
from talm.model.hf import architecture, is_network_error, to_hf_config, to_hf_state_dict
from talm.tokenizer.api import Tokenizer
from talm.tokenizer.chat import EOT, chat_template, missing_chat_tokens  # (EOT: talm.tokenizer.formats')
from talm.use.config import DTYPES
from talm.use.load import check_vocab, load_checkpoint


def write_tokenizer_files(tokenizer: Tokenizer, out_dir: Path, context_length: int) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json: a PreTrainedTokenizerFast."""
    tokenizer.to_hf().save(str(out_dir / "tokenizer.json"))
    special = {"bos_token": EOT, "eos_token": EOT}
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "model_max_length": context_length,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
            **({} if missing_chat_tokens(tokenizer) else {"chat_template": chat_template()}),
        },
    )
    _write_json(out_dir / "special_tokens_map.json", special)


def model_card(name: str, model: GPT, tokenizer: Tokenizer, meta: dict[str, Any] | None) -> str:
    c = model.config
    meta = meta or {}
    arch = architecture(c).removesuffix("LMHeadModel").removesuffix("ForCausalLM")
    init_from = ((meta.get("config") or {}).get("train") or {}).get("init_from")
    origin = f"trained from `{init_from}`" if init_from else "trained from scratch"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [talm, {arch.lower()}]",
        "---",
        "",
        f"# {name}",
        "",
        f"A GPT-style language model {origin} with talm and exported to the {arch} format.",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {model.num_params():,} |",
        f"| layers / heads / kv heads / width | {c.n_layer} / {c.n_head} / {c.kv_heads} / {c.d_model} |",
        f"| context length | {c.context_length} |",
        f"| vocabulary | {c.vocab_size} (byte-level BPE, end of text = `{EOT}`) |",
        f"| tied embeddings | {c.tie_embeddings} |",
    ]
    if meta.get("tokens_seen") is not None:
        lines.append(f"| training tokens | {meta['tokens_seen']:,} (step {meta.get('step')}) |")
    if meta.get("val_loss") is not None:
        lines.append(f"| validation loss | {meta['val_loss']:.4f} nats/token |")
    if meta.get("val_bpb") is not None:
        lines.append(f"| validation bits per byte | {meta['val_bpb']:.4f} |")
    lines += [
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_ID")',
        'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO_ID")',
        'ids = tokenizer("Once upon a time", return_tensors="pt").input_ids',
        "out = model.generate(ids, max_new_tokens=100, do_sample=True, temperature=0.8)",
        "print(tokenizer.decode(out[0]))",
        "```",
        "",
    ]
    return "\n".join(lines)


def export_hf(
    model: GPT,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write `model` and `tokenizer` as a transformers model directory `out_dir` (see the module doc).

    The directory is built beside its target and renamed into place, so `out_dir` is either absent, the old
    export, or the complete new one. An existing `out_dir` is refused unless `overwrite`. `meta` is the
    checkpoint.json, for the model card.
    """
    out_dir = Path(out_dir)
    check_export_dir(out_dir, overwrite)
    check_dtype(dtype)
    architecture(model.config)  # refuses what no transformers model computes
    check_vocab(model, tokenizer, "the model")
    tmp = staging_dir(out_dir)
    try:
        _write_json(tmp / "config.json", to_hf_config(model.config, tokenizer.eot_id, dtype))
        _write_json(
            tmp / "generation_config.json",
            {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id},
        )
        save_file(
            to_hf_state_dict(model, getattr(torch, dtype)),
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        write_tokenizer_files(tokenizer, tmp, model.config.context_length)
        (tmp / "README.md").write_text(model_card(out_dir.name, model, tokenizer, meta), encoding="utf-8")
        replace_dir(tmp, out_dir)
    except OSError as err:  # a full disk, say: nothing half-written is left, the old export (if any) stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise TalmError(
            f"could not write the export {str(out_dir)!r} ({err.strerror or err}): free some disk space or "
            f"{INSTEAD}"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


INSTEAD = "choose another -o/--output"


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise TalmError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")


def check_export_dir(out_dir: Path, overwrite: bool, *, source: str | Path | None = None) -> None:
    """Refuse, before any work, an export target that cannot be written or must not be replaced: a file where
    the directory (or one of its parents) must be, a place that cannot be written (the export is built beside
    it), the `source` model directory or a directory holding it, an existing directory unless `overwrite`, and,
    even with `overwrite`, a non-empty directory that is not an earlier export (it has no config.json): the
    user's other files (models, checkpoints) are never replaced."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TalmError(f"{str(out_dir)!r} exists and is not a directory: {INSTEAD}")
    if source is not None:
        src, dst = Path(source).resolve(), out_dir.resolve()
        if dst == src or dst in src.parents:
            raise TalmError(
                f"-o/--output {str(out_dir)!r} would replace the model being exported ({str(source)!r}): {INSTEAD}"
            )
    if out_dir.is_dir():
        if not overwrite:
            raise TalmError(
                f"export directory {str(out_dir)!r} already exists: pass --overwrite to replace it, or {INSTEAD}"
            )
        if not (out_dir / "config.json").is_file() and any(out_dir.iterdir()):
            raise TalmError(
                f"{str(out_dir)!r} is not an earlier export (it has files but no config.json), and --overwrite "
                f"only replaces an export: {INSTEAD}, or empty it yourself"
            )
    check_writable_dir(out_dir.parent, instead=INSTEAD)


# ------------------------------------------------------------------------------------------------------------
# The Hub


def hub_token() -> str:
    """The Hugging Face token: $HF_TOKEN, else the one saved by `hf auth login`."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise TalmError(
            "no Hugging Face token found: set HF_TOKEN=hf_... or run `hf auth login`, then push again "
            "(create a token with write access at https://huggingface.co/settings/tokens)"
        )
    return token


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise TalmError(
            f"--push-to-hub {repo_id!r} is not a valid repo id ({str(err).splitlines()[0]}): use USER/NAME"
        ) from None


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload an export directory to the Hub model repo `repo_id` (created if needed); return its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    check_repo_id(repo_id)
    api = HfApi(token=token or hub_token())
    try:
        repo = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message=f"Upload {folder.name}, exported by talm",
        )
    except Exception as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        if is_network_error(err):
            raise TalmError(
                f"the Hugging Face Hub is unreachable ({first_line}): check your network connection; the export "
                f"in {str(folder)!r} is complete, push it later with `hf upload {repo_id} {folder}`"
            ) from None
        status = getattr(getattr(err, "response", None), "status_code", None)
        if isinstance(err, HfHubHTTPError) and status in (401, 403):
            raise TalmError(
                f"the Hub refused the token for {repo_id!r} ({first_line}): use a token with write access to "
                "that namespace (HF_TOKEN or `hf auth login`)"
            ) from None
        if isinstance(err, HfHubHTTPError):
            raise TalmError(f"the Hub refused the upload to {repo_id!r}: {first_line}") from None
        raise
    return str(getattr(repo, "url", f"https://huggingface.co/{repo_id}"))


# ------------------------------------------------------------------------------------------------------------
# A trained model directory, start to end (what `export_model` runs)


@dataclass
class Exported:
    path: Path  # the export directory written
    meta: dict[str, Any]  # the exported checkpoint's checkpoint.json
    num_params: int
    hub_token: str | None = None  # the token checked before the export, for `push_to_hub`


def export_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    checkpoint: str = "latest",
    dtype: str = "float32",
    overwrite: bool = False,
    hub_repo: str | None = None,
) -> Exported:
    """Export checkpoint `checkpoint` ("latest", "best" or a path) of the trained model `model_dir` to `out_dir`
    (see `export_hf`). Everything that can be refused is refused before the model is loaded: an output that
    cannot or must not be written (the model directory itself included), an unknown dtype and, when the export
    is to be pushed to `hub_repo`, a bad repo id or a missing token. Then push it with
    `push_to_hub(exported.path, hub_repo, token=exported.hub_token)`.
    """
    out_dir = Path(out_dir)
    check_export_dir(out_dir, overwrite, source=model_dir)
    check_dtype(dtype)
    token = None
    if hub_repo:
        check_repo_id(hub_repo)
        token = hub_token()
    model, tokenizer, meta = load_checkpoint(model_dir, checkpoint, "cpu")
    export_hf(model, tokenizer, out_dir, dtype=dtype, overwrite=overwrite, meta=meta)
    return Exported(out_dir, meta, model.num_params(), token)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
