"""The model stage's configuration (talm.config holds the Config base: strict fields, TOML and flag layering, docstrings as --help)."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from talm.config import Config

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
    """Width of the residual stream; a multiple of n_head (with an even head size in the llama family)."""
    arch: Literal["llama", "gpt2"] = "llama"
    """The block family. llama: RMSNorm, rotary position embeddings, no biases (talm's own, and Llama's).
    gpt2: learned position embeddings, LayerNorm and linear layers with biases, GELU MLP (OpenAI's GPT-2, so
    its weights load with `--init-from gpt2`); it takes mlp="gelu" and no rope or qk_norm options."""
    mlp: Literal["swiglu", "relu2", "gelu"] = "swiglu"
    """The MLP: swiglu (gated, three matmuls, as Llama), relu2 (relu(x)^2 between two matmuls, as the
    modded-nanogpt speedrun and nanochat) or gelu (GELU, tanh approximation, between two matmuls, as GPT-2)."""
    mlp_hidden: int | None = Field(default=None, ge=1)
    """Hidden width of the MLP. Unset means 8/3 * d_model rounded up to a multiple of 64 for swiglu (the same
    weights as 4 * d_model without a gate), 4 * d_model for relu2 and gelu."""
    rope_theta: float = Field(default=10000.0, gt=0)
    """Base of the rotary position embedding's frequencies."""
    norm_eps: float = Field(default=1e-5, gt=0)
    """Epsilon of the RMSNorm (LayerNorm with arch gpt2) layers."""
    qk_norm: bool = False
    """RMSNorm each head's queries and keys (with a learned gain) before the rotary embedding, as modded-nanogpt
    (and Qwen3): bounded attention logits, so higher learning rates stay stable."""
    logit_softcap: float | None = Field(default=None, gt=0)
    """Soft-cap the output logits to (-cap, cap) as cap * tanh(logits / cap), in training and sampling
    (modded-nanogpt used 30, from Gemma 2, then 15). Unset: no cap."""
    zero_init_proj: bool = False
    """Initialise the projections into the residual stream (attention output, MLP down) to zero, so every block
    starts as the identity (modded-nanogpt). Off: N(0, 0.02 / sqrt(2 * n_layer)), as GPT-2."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output layer."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on attention and residual outputs during training (0 for pretraining on enough data)."""

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.arch == "gpt2" and (self.mlp != "gelu" or self.qk_norm):
            raise ValueError(
                f"arch gpt2 takes mlp=gelu and no qk_norm (got mlp={self.mlp}, qk_norm={self.qk_norm}): set "
                "mlp gelu, or use arch llama"
            )
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}: "
                "pick a width that is a multiple of the head count"
            )
        if self.arch == "llama" and (self.d_model // self.n_head) % 2:
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
    def rope(self) -> bool:
        """Whether positions are rotary embeddings (llama) rather than a learned table (gpt2)."""
        return self.arch == "llama"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        return 4 * self.d_model if self.mlp in ("relu2", "gelu") else 64 * -(-(8 * self.d_model // 3) // 64)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding matrix: the vocab rounded up to a multiple of 64 for fast matmuls."""
        if self.vocab_size is None:
            raise ValueError("vocab_size is not set: take it from the tokenizer before building the model")
        return 64 * -(-self.vocab_size // 64)
