"""The one mapping between talm's GPT and Hugging Face transformers models: config.json and weight names, both
ways. `talm.use.export` writes with it, the importer (`talm.train.init`) reads with it.

talm's llama family is the Llama architecture (RMSNorm, rotary embeddings in the rotate-half layout, SwiGLU, no
biases), so the mapping is a renaming: the fused qkv and gate/up matrices are split into Llama's separate
projections, nothing is permuted. Options Llama lacks map to the transformers model that is Llama plus exactly
those (`ARCHITECTURES`): qk_norm to Qwen3 (per-head q/k RMSNorm with a gain, before RoPE), mlp="relu2" to Arcee
(up/down MLP, relu2), both to Apertus. The gpt2 family is `GPT2LMHeadModel`, whose Conv1D layers store their
weights transposed (in, out). logit_softcap has no transformers counterpart that computes the rest exactly.

The embedding's padding rows (talm pads it to a multiple of 64) are dropped on the way out and filled with zeros
on the way in: they are never a token.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import ValidationError

from talm.config import describe_validation_error
from talm.errors import TalmError
from talm.model.config import ModelConfig
from talm.model.gpt import GPT

# (qk_norm, mlp) of the llama family -> the transformers model (its model_type is the name in lower case).
ARCHITECTURES = {
    (False, "swiglu"): "Llama",
    (True, "swiglu"): "Qwen3",
    (False, "relu2"): "Arcee",
    (True, "relu2"): "Apertus",
}
GPT2_CLASS = "GPT2LMHeadModel"
# The transformers classes talm reads (and writes), for the refusal of any other.
SUPPORTED = (*(f"{name}ForCausalLM" for name in ARCHITECTURES.values()), GPT2_CLASS)
# GPT-2's activation names that are the tanh approximation talm computes.
GPT2_GELUS = ("gelu_new", "gelu_pytorch_tanh")
# Tensors some checkpoints carry that are not weights: GPT-2's causal-mask buffers, old Llama rotary tables.
IGNORED = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$|rotary_emb\.inv_freq$")


def architecture(config: ModelConfig) -> str:
    """The transformers class computing what `config`'s GPT computes; TalmError for options none expresses."""
    if config.logit_softcap is not None:
        raise TalmError(
            f"model.logit_softcap={config.logit_softcap} cannot be expressed in the Llama format (nor in any "
            "transformers architecture that computes the rest exactly): use this model with generate instead"
        )
    if config.arch == "gpt2":
        if config.kv_heads != config.n_head:
            raise TalmError(
                f"model.n_kv_head={config.n_kv_head} (grouped-query attention) cannot be expressed as GPT-2: "
                "use this model with generate instead"
            )
        return GPT2_CLASS
    if (config.qk_norm, config.mlp) not in ARCHITECTURES:
        raise TalmError(
            f"model.mlp={config.mlp} with rotary attention (arch llama) has no transformers architecture that "
            "computes it exactly: use this model with generate instead, or train with --model.mlp swiglu or relu2"
        )
    return f"{ARCHITECTURES[config.qk_norm, config.mlp]}ForCausalLM"


# ------------------------------------------------------------------------------------------------------------
# config.json


def to_hf_config(config: ModelConfig, eot_id: int, dtype: str) -> dict[str, Any]:
    """config.json of the transformers model (`architecture`) that computes what `config`'s GPT computes."""
    cls = architecture(config)
    common = {
        "architectures": [cls],
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if cls == GPT2_CLASS:
        return common | {
            "model_type": "gpt2",
            "n_positions": config.context_length,
            "n_ctx": config.context_length,
            "n_embd": config.d_model,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": config.hidden_dim,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
    return common | {
        "model_type": cls.removesuffix("ForCausalLM").lower(),
        "hidden_size": config.d_model,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu" if config.mlp == "swiglu" else "relu2",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        # transformers >= 5 reads rope_parameters, earlier versions rope_theta.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
    }


def from_hf_config(hf: Mapping[str, Any], where: str) -> ModelConfig:
    """The ModelConfig of a transformers config.json (`where` names it in errors); TalmError, naming the
    supported classes or the setting, for anything talm's GPT does not compute exactly, and naming the HF key
    and the problem for a value of the wrong type or out of range."""
    by_type = {"gpt2": GPT2_CLASS, **{name.lower(): f"{name}ForCausalLM" for name in ARCHITECTURES.values()}}
    classes = hf.get("architectures") or [
        by_type.get(hf.get("model_type"))
    ]  # a config made in memory has none
    if not isinstance(classes, list):
        classes = [classes]
    cls = next((c for c in classes if c in SUPPORTED), None)
    if cls is None:
        found = ", ".join(map(str, filter(None, classes))) or f"model_type {hf.get('model_type')!r}"
        raise TalmError(f"{where} is a {found}, which talm cannot load: supported are {', '.join(SUPPORTED)}")
    read = HFReader(hf, where)
    fields = _gpt2_fields(read, cls) if cls == GPT2_CLASS else _llama_fields(read, cls)
    return read.model_config(fields)


REQUIRED = object()  # HFReader's default for a key config.json must have


class HFReader:
    """Reads config.json values by their HF key, each checked for its type (and, for counts, to be at least 1)
    before any arithmetic, and remembers which HF key gave each talm field, so that a model talm's validation
    refuses is reported in the file's own terms."""

    KINDS = {
        "count": "a positive integer",
        "number": "a number",
        "bool": "true or false",
        "table": "an object",
    }

    def __init__(self, hf: Mapping[str, Any], where: str) -> None:
        self.hf, self.where = hf, where
        self.keys: dict[str, str] = {}  # talm field -> the HF key it came from

    def __call__(self, key: str, kind: str, default: Any = REQUIRED, *, field: str | None = None) -> Any:
        """The value of `key` (null or absent: `default`; TalmError if it has none), of `kind` (KINDS)."""
        if field:
            self.keys[field] = key
        value = self.hf.get(key)
        if value is None:
            if default is REQUIRED:
                raise TalmError(f"{self.where} has no {key!r}: pass an intact transformers config.json")
            return default
        return self.check(key, value, kind)

    def check(self, key: str, value: Any, kind: str) -> Any:
        """`value` (of HF key `key`) if it is of `kind`, else TalmError naming the key, the value and the kind."""
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {
            "count": number and isinstance(value, int) and value >= 1,
            "number": number and math.isfinite(value),
            "bool": isinstance(value, bool),
            "table": isinstance(value, dict),
        }[kind]
        if not ok:
            raise TalmError(
                f"{self.where}: {key!r} is {json.dumps(value, default=repr)}, not {self.KINDS[kind]}: fix the "
                "config.json or start from another model"
            )
        return value

    def refuse(self, cls: str, setting: str) -> TalmError:
        return TalmError(
            f"{self.where} sets {setting}, which talm's {cls} does not compute: start from a model without it"
        )

    def model_config(self, fields: dict[str, Any]) -> ModelConfig:
        """`fields` validated as a ModelConfig, a refusal naming the HF keys instead of talm's fields."""
        try:
            return ModelConfig.model_validate(fields)
        except ValidationError as err:
            names = {field: repr(key) for field, key in self.keys.items()} | {"": "config.json"}
            why = describe_validation_error(err, names)
            for field, key in self.keys.items():  # a cross-field rule's message names talm's fields
                why = re.sub(rf"\b{field}\b", key, why)
            raise TalmError(
                f"{self.where} describes a model talm cannot build ({why}): fix the config.json or start from "
                "another model"
            ) from None


def _gpt2_fields(read: HFReader, cls: str) -> dict[str, Any]:
    act = read.hf.get("activation_function", "gelu_new")
    if act not in GPT2_GELUS:
        raise read.refuse(cls, f"activation_function={act!r}")
    for flag, plain in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):  # fmt: skip
        if read(flag, "bool", plain) != plain:
            raise read.refuse(cls, f"{flag}={read.hf.get(flag)}")
    d_model = read("n_embd", "count", field="d_model")
    return {
        "arch": "gpt2",
        "mlp": "gelu",
        "vocab_size": read("vocab_size", "count", field="vocab_size"),
        "context_length": read("n_positions", "count", 1024, field="context_length"),
        "n_layer": read("n_layer", "count", field="n_layer"),
        "n_head": read("n_head", "count", field="n_head"),
        "d_model": d_model,
        "mlp_hidden": read("n_inner", "count", 4 * d_model, field="mlp_hidden"),
        "norm_eps": read("layer_norm_epsilon", "number", 1e-5, field="norm_eps"),
        "tie_embeddings": read("tie_word_embeddings", "bool", True, field="tie_embeddings"),
    }


def _llama_fields(read: HFReader, cls: str) -> dict[str, Any]:
    name = cls.removesuffix("ForCausalLM")
    qk_norm, mlp = next(key for key, value in ARCHITECTURES.items() if value == name)
    act = "silu" if mlp == "swiglu" else "relu2"
    if read.hf.get("hidden_act", act) != act:
        raise read.refuse(cls, f"hidden_act={read.hf.get('hidden_act')!r}")
    for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if read(flag, "bool", False):
            raise read.refuse(cls, f"{flag}=true")
    rope = read("rope_parameters", "table", None) or read("rope_scaling", "table", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise read.refuse(cls, f"rope scaling {rope.get('rope_type', rope.get('type'))!r}")
    d_model = read("hidden_size", "count", field="d_model")
    n_head = read("num_attention_heads", "count", field="n_head")
    if read("head_dim", "count", None) not in (None, d_model // n_head) or d_model % n_head:
        raise read.refuse(
            cls, f"head_dim={read.hf.get('head_dim')} (talm's is hidden_size / num_attention_heads)"
        )
    theta = read("rope_theta", "number", 10000.0, field="rope_theta")
    if rope.get("rope_theta") is not None:  # transformers >= 5 keeps it in rope_parameters
        theta = read.check("rope_theta", rope["rope_theta"], "number")
    return {
        "arch": "llama",
        "mlp": mlp,
        "qk_norm": qk_norm,
        "vocab_size": read("vocab_size", "count", field="vocab_size"),
        "context_length": read("max_position_embeddings", "count", 2048, field="context_length"),
        "n_layer": read("num_hidden_layers", "count", field="n_layer"),
        "n_head": n_head,
        "n_kv_head": read("num_key_value_heads", "count", None, field="n_kv_head"),
        "d_model": d_model,
        "mlp_hidden": read("intermediate_size", "count", field="mlp_hidden"),
        "rope_theta": theta,
        "norm_eps": read("rms_norm_eps", "number", 1e-6, field="norm_eps"),
        "tie_embeddings": read("tie_word_embeddings", "bool", False, field="tie_embeddings"),
    }


# ------------------------------------------------------------------------------------------------------------
# Weights: talm name -> (transformers name, how the tensor is stored there)


def _pairs(config: ModelConfig) -> list[tuple[str, list[str], str]]:
    """(talm name, transformers names, layout): the transformers tensors are concatenated along dim 0 to give
    talm's ("t": after transposing each, GPT-2's Conv1D layout)."""
    c = config
    if c.arch == "gpt2":
        pairs = [
            ("tok_emb.weight", ["transformer.wte.weight"], ""),
            ("pos_emb.weight", ["transformer.wpe.weight"], ""),
        ]
        for i in range(c.n_layer):
            p, h = f"blocks.{i}.", f"transformer.h.{i}."
            pairs += [
                (p + "attn_norm.weight", [h + "ln_1.weight"], ""),
                (p + "attn_norm.bias", [h + "ln_1.bias"], ""),
                (p + "attn.qkv.weight", [h + "attn.c_attn.weight"], "t"),
                (p + "attn.qkv.bias", [h + "attn.c_attn.bias"], ""),
                (p + "attn.proj.weight", [h + "attn.c_proj.weight"], "t"),
                (p + "attn.proj.bias", [h + "attn.c_proj.bias"], ""),
                (p + "mlp_norm.weight", [h + "ln_2.weight"], ""),
                (p + "mlp_norm.bias", [h + "ln_2.bias"], ""),
                (p + "mlp.up.weight", [h + "mlp.c_fc.weight"], "t"),
                (p + "mlp.up.bias", [h + "mlp.c_fc.bias"], ""),
                (p + "mlp.down.weight", [h + "mlp.c_proj.weight"], "t"),
                (p + "mlp.down.bias", [h + "mlp.c_proj.bias"], ""),
            ]
        pairs += [
            ("norm.weight", ["transformer.ln_f.weight"], ""),
            ("norm.bias", ["transformer.ln_f.bias"], ""),
        ]
    else:
        apertus = ARCHITECTURES[c.qk_norm, c.mlp] == "Apertus"  # which names its two pre-norms its own way
        norms = ("attention", "feedforward") if apertus else ("input", "post_attention")
        pairs = [("tok_emb.weight", ["model.embed_tokens.weight"], "")]
        for i in range(c.n_layer):
            p, h = f"blocks.{i}.", f"model.layers.{i}."
            attn = [h + f"self_attn.{x}_proj.weight" for x in "qkv"]
            pairs += [
                (p + "attn_norm.weight", [h + f"{norms[0]}_layernorm.weight"], ""),
                (p + "attn.qkv.weight", attn, ""),
                (p + "attn.proj.weight", [h + "self_attn.o_proj.weight"], ""),
                (p + "mlp_norm.weight", [h + f"{norms[1]}_layernorm.weight"], ""),
                (p + "mlp.down.weight", [h + "mlp.down_proj.weight"], ""),
            ]
            if c.qk_norm:
                pairs += [
                    (p + "attn.q_norm.weight", [h + "self_attn.q_norm.weight"], ""),
                    (p + "attn.k_norm.weight", [h + "self_attn.k_norm.weight"], ""),
                ]
            if c.mlp == "swiglu":
                pairs.append(
                    (p + "mlp.gate_up.weight", [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"], "")
                )
            else:
                pairs.append((p + "mlp.up.weight", [h + "mlp.up_proj.weight"], ""))
        pairs.append(("norm.weight", ["model.norm.weight"], ""))
    if not c.tie_embeddings:
        pairs.append(("lm_head.weight", ["lm_head.weight"], ""))
    return pairs


def _split_sizes(config: ModelConfig, talm_name: str, n: int) -> list[int]:
    if n == 1:
        return []
    if talm_name.endswith("qkv.weight"):
        return [
            config.n_head * config.head_dim,
            config.kv_heads * config.head_dim,
            config.kv_heads * config.head_dim,
        ]
    return [config.hidden_dim, config.hidden_dim]  # gate, up


def to_hf_state_dict(model: GPT, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The GPT's weights under the transformers model's names (`architecture`), the vocabulary padding rows
    dropped; own contiguous copies (safetensors refuses views and shared storage)."""
    c = model.config
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, theirs, layout in _pairs(c):
        t = ours[name]
        if name in ("tok_emb.weight", "lm_head.weight"):
            t = t[: c.vocab_size]
        parts = t.split(_split_sizes(c, name, len(theirs)), dim=0) if len(theirs) > 1 else [t]
        for hf_name, part in zip(theirs, parts, strict=True):
            out[hf_name] = part.t() if layout == "t" else part
    return {name: t.detach().to("cpu", dtype).contiguous().clone() for name, t in out.items()}


def from_hf_state_dict(
    config: ModelConfig, tensors: Mapping[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """talm's state dict (for `GPT(config).load_state_dict`) from a transformers model's tensors, in float32.
    Names may lack GPT-2's "transformer." prefix (as OpenAI's checkpoints do); a tied model's lm_head, if
    present, is ignored. TalmError naming the tensor for one missing, left over or of the wrong shape."""
    c = config
    if c.arch == "gpt2":  # GPT2Model files (no LM head) name everything without "transformer."
        tensors = {
            k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v
            for k, v in tensors.items()
        }
    with torch.device("meta"):  # shapes only: nothing allocated
        shapes = {k: tuple(v.shape) for k, v in GPT(c).state_dict().items()}
    used = set()
    out = {}
    for name, theirs, layout in _pairs(c):
        missing = [n for n in theirs if n not in tensors]
        if missing:
            raise TalmError(f"{where} has no tensor {missing[0]!r}: it is not a complete {architecture(c)}")
        parts = [tensors[n].t() if layout == "t" else tensors[n] for n in theirs]
        t = torch.cat(parts, dim=0).float() if len(parts) > 1 else parts[0].float()
        used.update(theirs)
        want = shapes[name]
        if name in ("tok_emb.weight", "lm_head.weight") and t.shape == (c.vocab_size, c.d_model):
            t = torch.cat((t, t.new_zeros(want[0] - c.vocab_size, c.d_model)))  # the padding rows
        if name == "pos_emb.weight" and t.shape[0] >= want[0]:
            t = t[: want[0]]  # a shorter context keeps the first positions
        if tuple(t.shape) != want:
            raise TalmError(
                f"{where}: tensor {theirs[0]!r} has shape {tuple(tensors[theirs[0]].shape)}, not the one its "
                f"config.json implies: pass an intact model"
            )
        out[name] = t.contiguous()
    left = [k for k in tensors if k not in used and not IGNORED.search(k) and k != "lm_head.weight"]
    if left:
        raise TalmError(
            f"{where} has tensor {left[0]!r}, which {architecture(c)} does not have: pass an intact model"
        )
    if c.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out


# ------------------------------------------------------------------------------------------------------------
# The Hub's network errors (for the export's push and the import's download)


def is_network_error(err: BaseException) -> bool:
    """Whether the Hub could not be reached at all (no network, DNS, proxy, timeout, offline mode), whatever
    HTTP client this huggingface_hub version uses (requests, httpx)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(err, (OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    for cls in type(err).__mro__:
        if cls.__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3") and any(
            word in cls.__name__ for word in ("Connect", "Timeout", "Network", "Proxy", "Transport")
        ):
            return True
    return False
