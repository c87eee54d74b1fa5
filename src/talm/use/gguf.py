"""Export a trained model to one GGUF file: what llama.cpp, Ollama and LM Studio run.

The file is written with `gguf` (ggml's own Python writer) in the llama.cpp architecture that computes exactly
what the model computes (`ARCHITECTURES`, by model.qk_norm and model.mlp): talm's llama family without options
(RMSNorm, rotary embeddings, SwiGLU, no biases, grouped-query attention, tied or untied output layer) is `llama`;
with QK-norm (per-head RMSNorm with a gain on queries and keys, before RoPE, in the model's norm_eps) `qwen3`;
with the ReLU² MLP (relu(x W_up)^2 W_down, no gate) `arcee`; with both `apertus`, whose MLP is xIELU between two
matmuls, with its parameters chosen so that it is relu(x)^2 exactly (`XIELU`). The weights go through the
transformers mapping (`talm.model.hf.to_hf_state_dict`, which splits the fused qkv and gate/up matrices) and
gguf's own table of tensor names. One change of layout for llama and arcee: talm rotates (x_i, x_{i + d/2}) pairs
("rotate half", as Hugging Face's Llama) where they rotate neighbours (x_2i, x_2i+1), so each head's query and
key rows are reordered to put pair i's two rows side by side; attention scores are unchanged, since queries and
keys get the same order. qwen3 and apertus rotate halves, as talm: nothing is reordered. apertus has no tied
output layer: a tied model's embedding is written a second time as its output matrix.

What none of them computes is refused before any work, naming the option (`gguf_problem`): logit soft-capping,
the GELU MLP, the GPT-2 family. (zero_init_proj is only an initialisation and dropout only training: both
export.)

The tokenizer goes along as llama.cpp's "gpt2" (byte-level BPE) model: every token in GPT-2's byte-to-character
spelling, the merges, the special tokens as control tokens (so llama.cpp reads their spellings as text unless
asked to parse specials, as talm does), `<|endoftext|>` as bos and eos (never added to a prompt), and the
pre-tokenizer whose regex is the tokenizer's: "llama-bpe" (Llama 3's split, which is GPT-4's) for talm's
SPLIT_PATTERN, which is the same expression written with possessive quantifiers, `'(?i:...)` for Llama 3's
spelled-out contractions, and `\\s*[\\r\\n]` for `\\s*[\\r\\n]+`, which match the same text. A tokenizer whose
split has no llama.cpp pre-tokenizer is refused. talm's chat format goes along as `tokenizer.chat_template`
(Jinja, `talm.tokenizer.chat.chat_template`). Ids a model knows beyond its tokenizer (training may round the
vocabulary up) become unused "[PAD<id>]" tokens, since llama.cpp needs one token per embedding row.

--quant: f32, f16 (2-D weights in half precision) or q8_0 (2-D weights in ggml's 8-bit blocks of 32, a matrix
whose rows are not a multiple of 32 stays f16, as llama.cpp's converter does); norm gains stay f32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import ValidationError

from talm.errors import TalmError
from talm.files import check_output_file, write_atomically
from talm.model.config import ModelConfig
from talm.model.gpt import GPT
from talm.model.hf import ARCHITECTURES as HF_ARCHITECTURES
from talm.model.hf import to_hf_state_dict
from talm.tokenizer.api import Tokenizer
from talm.tokenizer.chat import chat_template, missing_chat_tokens
from talm.tokenizer.formats import SPLIT_PATTERN, is_talm_pipeline
from talm.train.checkpoint import read_meta, resolve_checkpoint
from talm.use.export import Exported
from talm.use.load import check_vocab, find_tokenizer, load_checkpoint

if TYPE_CHECKING:
    import gguf

QUANTS = ("f32", "f16", "q8_0")
# (qk_norm, mlp) of the llama family -> the llama.cpp architecture that computes exactly that (its
# general.architecture): the transformers family the export writes (`talm.model.hf`), whose names llama.cpp keeps.
ARCHITECTURES = {options: family.lower() for options, family in HF_ARCHITECTURES.items()}
# Those that rotate neighbouring pairs (llama.cpp's LLAMA_ROPE_TYPE_NORM); the others rotate halves (NEOX), as talm.
NEIGHBOUR_ROPE = ("llama", "arcee")
# apertus's xIELU: alpha_p' x^2 + beta x for x > 0, else alpha_n' (expm1(min(x, eps)) - x) + beta x, where llama.cpp
# computes alpha_p' = softplus(alpha_p) and alpha_n' = beta + softplus(alpha_n) as logf(1 + expf(a)) in float32.
# relu(x)^2 is alpha_p' = 1, alpha_n' = beta = 0: 1 + expf(0.54132497) is the float just above e, whose logf is
# exactly 1 (log(e - 1) itself lands on the float below e, and gives 1 - 2^-24); expf(-100) is 0 in float32.
XIELU = {"alpha_p": 0.54132497, "alpha_n": -100.0, "beta": 0.0, "eps": 0.0}
GGUF_MAGIC = b"GGUF"
INSTEAD = "choose another -o/--output"
# The split regexes llama.cpp implements, by the `tokenizer.ggml.pre` name that selects them: talm's, and Llama
# 3's own spelling of it. ("llama-bpe" also makes llama.cpp take a word that is a token whole, without its
# merges, as tiktoken does, which encodes talm's tokenizers.)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {SPLIT_PATTERN: "llama-bpe", LLAMA3_PATTERN: "llama-bpe"}
FORMAT_INSTEAD = "export it with --format transformers instead"


def gguf_problem(config: ModelConfig) -> str | None:
    """Why no llama.cpp architecture talm writes computes what `config`'s GPT computes (one line naming the
    option and what to do), or None when one does (`gguf_architecture`)."""
    if config.arch != "llama":
        return f"model.arch={config.arch} is not llama.cpp's llama architecture: {FORMAT_INSTEAD}"
    if (config.qk_norm, config.mlp) not in ARCHITECTURES:
        return (
            f"model.mlp={config.mlp} has no counterpart in llama.cpp's architectures of the llama family: use this "
            "model with talm's generate instead"
        )
    if config.logit_softcap is not None:
        return (
            f"model.logit_softcap={config.logit_softcap} has no counterpart in llama.cpp's "
            f"{ARCHITECTURES[config.qk_norm, config.mlp]} architecture (its logits would not be capped): use this "
            "model with talm's generate instead"
        )
    return None


def gguf_architecture(config: ModelConfig) -> str:
    """The llama.cpp architecture computing what `config`'s GPT computes; TalmError (`gguf_problem`) if none."""
    problem = gguf_problem(config)
    if problem:
        raise TalmError(problem)
    return ARCHITECTURES[config.qk_norm, config.mlp]


def pre_tokenizer(tokenizer: Tokenizer) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for the tokenizer's split regex; TalmError if it has none, or if the
    tokenizer is not a plain byte-level BPE behind a regex split (a foreign file's own pipeline)."""
    document = json.loads(tokenizer.to_hf().to_str())
    if not is_talm_pipeline(document):
        raise TalmError(
            f"tokenizer {str(tokenizer.path)!r} is not a plain byte-level BPE behind a regex split (it has its own "
            f"normalizer or pre-tokenizer), which llama.cpp's gpt2 tokenizer cannot reproduce: {FORMAT_INSTEAD}"
        )
    name = PRE_TOKENIZERS.get(tokenizer.pattern)
    if name is None:
        raise TalmError(
            f"tokenizer {str(tokenizer.path)!r} splits text with the regex {tokenizer.pattern!r}, which no "
            f"llama.cpp pre-tokenizer implements: {FORMAT_INSTEAD}"
        )
    return name


def check_gguf_output(path: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work, a .gguf target that cannot be written, exists (unless `overwrite`) or, even with
    `overwrite`, is some other file than a GGUF file: the user's other files are never replaced."""
    path = check_output_file(path, overwrite=overwrite, instead=INSTEAD)
    if path.exists():
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as err:
            raise TalmError(f"cannot read {str(path)!r} ({err.strerror or err}): {INSTEAD}") from None
        if magic != GGUF_MAGIC:
            raise TalmError(
                f"{str(path)!r} is not a GGUF file, and --overwrite only replaces an export: {INSTEAD}"
            )
    return path


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise TalmError(f"unknown --quant {quant!r}: use one of {', '.join(QUANTS)}")


# ------------------------------------------------------------------------------------------------------------
# The file's content


def neighbour_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """A query or key projection's rows (n_heads * head_dim, d_model) reordered from rotate-half pairs (i,
    i + d/2) to llama.cpp's neighbouring pairs (2i, 2i + 1), head by head."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The GPT's weights under the names of its llama.cpp architecture, float32, in that architecture's rope
    layout."""
    import gguf

    c = model.config
    arch = gguf_architecture(c)
    by_name = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}
    names = gguf.get_tensor_name_map(by_name[arch], c.n_layer)
    out = {}
    for hf_name, t in to_hf_state_dict(model, torch.float32).items():
        if arch in NEIGHBOUR_ROPE and hf_name.endswith("self_attn.q_proj.weight"):
            t = neighbour_rope_rows(t, c.n_head)
        elif arch in NEIGHBOUR_ROPE and hf_name.endswith("self_attn.k_proj.weight"):
            t = neighbour_rope_rows(t, c.kv_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        assert name is not None, f"gguf has no {arch} name for {hf_name}"
        out[name] = t.contiguous()
    if arch == "apertus" and c.tie_embeddings:  # apertus requires an output matrix
        out["output.weight"] = out["token_embd.weight"]
    return out


def _encoded(t: torch.Tensor, quant: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """A tensor as --quant stores it: the array to write and, for a quantized one, its ggml type."""
    import gguf

    a = t.numpy()
    if a.ndim == 1 or quant == "f32":
        return a.astype(np.float32), None
    if quant == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return a.astype(np.float16), None


def vocabulary(tokenizer: Tokenizer, n_tokens: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens (GPT-2 byte-to-character spelling), their llama.cpp types and the merges ("a b"), for a model
    with `n_tokens` embedding rows (ids past the tokenizer's become unused "[PAD<id>]" tokens)."""
    import gguf

    model = json.loads(tokenizer.to_hf().to_str())["model"]
    by_id = {i: token for token, i in model["vocab"].items()}
    by_id |= {i: token for token, i in tokenizer.special_tokens.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_tokens)]
    special = set(tokenizer.special_tokens.values())
    types = [
        gguf.TokenType.CONTROL
        if i in special
        else gguf.TokenType.NORMAL
        if i in by_id
        else gguf.TokenType.UNUSED
        for i in range(n_tokens)
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, [int(t) for t in types], merges


def add_metadata(writer: gguf.GGUFWriter, name: str, model: GPT, tokenizer: Tokenizer, quant: str) -> None:
    """The architecture's hyperparameters and the tokenizer, under llama.cpp's keys."""
    import gguf

    c = model.config
    assert c.vocab_size is not None  # a built GPT has one
    writer.add_name(name)
    if writer.arch == "apertus":
        writer.add_xielu_alpha_p([XIELU["alpha_p"]] * c.n_layer)
        writer.add_xielu_alpha_n([XIELU["alpha_n"]] * c.n_layer)
        writer.add_xielu_beta([XIELU["beta"]] * c.n_layer)
        writer.add_xielu_eps([XIELU["eps"]] * c.n_layer)
    writer.add_file_type(
        {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}.get(
            quant, gguf.LlamaFileType.MOSTLY_Q8_0
        )
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(c.context_length)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.hidden_dim)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.kv_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    tokens, types, merges = vocabulary(tokenizer, c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.eot_id)
    writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if not missing_chat_tokens(tokenizer):
        writer.add_chat_template(chat_template())


def export_gguf(
    model: GPT,
    tokenizer: Tokenizer,
    path: str | Path,
    *,
    quant: str = "f16",
    overwrite: bool = False,
    name: str | None = None,
) -> Path:
    """Write `model` and `tokenizer` as the GGUF file `path` (see the module doc), atomically: `path` is
    either absent, the old file, or the complete new one. Everything refusable is refused before writing."""
    import gguf

    path = check_gguf_output(path, overwrite)
    check_quant(quant)
    arch = gguf_architecture(model.config)
    check_vocab(model, tokenizer, "the model")
    pre_tokenizer(tokenizer)
    writer = gguf.GGUFWriter(None, arch)
    add_metadata(writer, name or path.stem, model, tokenizer, quant)
    for tensor_name, t in gguf_tensors(model).items():
        data, raw_dtype = _encoded(t, quant)
        writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)

    def write(f: Any) -> None:
        # gguf's writer opens files by name: it writes the temporary that write_atomically opened (and fsyncs
        # and renames after this returns); `f` itself stays empty, so nothing of it is flushed over the data.
        writer.write_header_to_file(Path(f.name))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    try:
        write_atomically(path, write, overwrite=overwrite)
    except FileExistsError:
        raise TalmError(f"{str(path)!r} appeared while exporting: pass --overwrite, or {INSTEAD}") from None
    except OSError as err:  # a full disk, say: the temporary is removed, the old file (if any) stays
        raise TalmError(
            f"could not write {str(path)!r} ({err.strerror or err}): free some disk space or {INSTEAD}"
        ) from None
    return path


# ------------------------------------------------------------------------------------------------------------
# A trained model directory, start to end (what `export_model --format gguf` runs)


def refuse_before_loading(model_dir: str | Path, checkpoint: str) -> None:
    """`gguf_problem` and `pre_tokenizer` from checkpoint.json and the tokenizer alone, before the weights
    are read. A checkpoint that cannot be read is left to `load_checkpoint`, which says what is wrong."""
    try:
        checkpoint_dir = resolve_checkpoint(model_dir, checkpoint)
        meta = read_meta(checkpoint_dir)
        config = ModelConfig.model_validate(meta["config"]["model"])
    except (TalmError, ValidationError, KeyError, TypeError):
        return
    gguf_architecture(config)
    pre_tokenizer(find_tokenizer(checkpoint_dir, meta, Path(model_dir)))


def export_gguf_checkpoint(
    model_dir: str | Path,
    path: str | Path,
    *,
    checkpoint: str = "latest",
    quant: str = "f16",
    overwrite: bool = False,
) -> Exported:
    """Export checkpoint `checkpoint` ("latest", "best" or a path) of the trained model `model_dir` to the GGUF
    file `path` (see `export_gguf`), everything refusable refused before the weights are loaded."""
    path = check_gguf_output(path, overwrite)
    check_quant(quant)
    refuse_before_loading(model_dir, checkpoint)
    model, tokenizer, meta = load_checkpoint(model_dir, checkpoint, "cpu")
    export_gguf(model, tokenizer, path, quant=quant, overwrite=overwrite, name=Path(model_dir).name)
    return Exported(path, meta, model.num_params())
