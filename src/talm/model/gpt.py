"""The transformer: a modern decoder-only GPT in plain PyTorch, architecture only.

Token embedding -> n_layer pre-norm blocks (RMSNorm, causal self-attention with rotary position embeddings and
optional grouped-query attention, SwiGLU MLP) -> RMSNorm -> output layer. No biases anywhere. This is the
Llama layout, so the weights map one to one onto Hugging Face's `LlamaForCausalLM` (see `talm.model.hf`).

`arch="gpt2"` is the GPT-2 family in the same blocks: a learned position embedding added to the token
embedding instead of rotations, LayerNorm (with bias) instead of RMSNorm, biases in every linear layer and a
GELU MLP, so OpenAI's GPT-2 weights (`GPT2LMHeadModel`) load one to one.

Options from the modded-nanogpt speedrun's record table, all off by default (`ModelConfig`): QK-norm, a ReLU²
MLP instead of SwiGLU, logit soft-capping, zero-initialised output projections; and an untied output layer.

Optimizers, distributed wrappers and files live elsewhere; this file only says what the network computes.
`KVCache` (left-padded rows) and `SlotCache` (rows of their own lengths, the engine's) let generation
(`talm.model.sample`, `talm.model.engine`) feed one new token at a time instead of the whole sequence.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from talm.model.config import ModelConfig

# Under bf16 autocast on CPU, RMSNorm's float32 gain sends torch to its unfused kernel (the same norm), with a
# UserWarning in every command's output that the user can do nothing about.
warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight", category=UserWarning)


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotation angles, shape (max_positions, head_dim), in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)  # "rotate half" layout, as in Llama
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i + d/2}) pair of x (..., T, head_dim) by its position's angle."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # under autocast x is bf16/fp16; keep it so
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position inside its document, (B, T), for rows of documents packed back to back (`doc_ids`
    constant along each document): 0 at every document's first token."""
    T = doc_ids.shape[1]
    index = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    first = torch.ones_like(doc_ids, dtype=torch.bool)
    first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return index - torch.where(first, index, 0).cummax(dim=1).values


def kv_buffers(
    config: ModelConfig, rows: int, max_len: int, device: torch.device | str, dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zeroed keys and values of every layer, (rows, kv_heads, max_len, head_dim) each: a cache's storage.
    ValueError if `max_len` exceeds the model's context."""
    if max_len > config.context_length:
        raise ValueError(f"max_len={max_len} exceeds the model's context_length={config.context_length}")
    shape = (rows, config.kv_heads, max_len, config.head_dim)
    k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
    v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
    return k, v


class KVCache:
    """Keys and values of every layer for a batch of sequences being generated.

    Prompts of different lengths are left-padded to one length; `pad[b]` is the number of padding positions in
    front of row b. Those positions are never attended to and each row's positions count from its first real
    token, so a padded row computes exactly what it would alone.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        pad: torch.Tensor | None = None,
    ) -> None:
        self.k, self.v = kv_buffers(config, batch_size, max_len, device, dtype)
        self.max_len = max_len
        self.length = 0  # positions filled so far (the same for every row)
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device) if pad is None else pad.to(device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values for `layer`; return all of them so far."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def layout(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The positions (B, T) of the next T tokens of every row and the attention mask (B, 1, T, S) over the
        cache once they are in."""
        start = self.length
        if start + T > self.max_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the cache's {self.max_len} positions")
        q_pos = torch.arange(start, start + T, device=device)
        k_pos = torch.arange(start + T, device=device)
        pos = (q_pos[None, :] - self.pad[:, None]).clamp(min=0)  # (B, T): each row counts from its start
        causal = k_pos[None, :] <= q_pos[:, None]  # (T, S)
        real = k_pos[None, None, :] >= self.pad[:, None, None]  # (B, 1, S): padding is never attended
        # A padding query may see itself, so no row of the mask is empty (which would give NaN).
        mask = ((causal[None] & real) | (k_pos[None, :] == q_pos[:, None])[None]).unsqueeze(1)
        return pos, mask

    def advance(self, T: int) -> None:
        self.length += T


class SlotCache:
    """A static (preallocated) KV cache of `slots` rows, each row one sequence with its own length: what the
    batched generation engine (`talm.model.engine`) decodes with. Rows 0 to `active - 1` take part in a decode
    step (one new token each, at its own position); `select(row, lengths)` makes the next forward pass fill rows
    from position 0 instead (prompts' prefill). Nothing is padded: each row computes what it would alone.

    Its owner (the engine) keeps the active rows first: `move(src, dst)` copies a row over one that left.
    """

    def __init__(
        self, config: ModelConfig, slots: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        self.k, self.v = kv_buffers(config, slots, max_len, device, dtype)
        self.config, self.max_len, self.slots = config, max_len, slots
        self.lengths = [0] * slots  # positions filled, per row
        self.active = 0
        self._prefill: int | None = None  # the first row the next forward fills from 0, if any
        self._prefill_lengths: list[int] = []
        self._rows = torch.arange(slots, device=device)
        self._pos = torch.zeros(slots, dtype=torch.long, device=device)  # where each active row writes next
        self._end = 0  # the keys the current forward attends over
        self._same = False  # whether the active rows are all at one length

    def set_active(self, rows: int) -> None:
        """Rows 0 to `rows` - 1 take part in the next decode step."""
        self.active = rows

    def grown(self, max_len: int) -> SlotCache:
        """A cache with room for `max_len` positions per row, holding every row of this one."""
        k = self.k[0]
        new = SlotCache(self.config, self.slots, max_len, k.device, k.dtype)
        for layer in range(len(self.k)):
            new.k[layer][:, :, : self.max_len] = self.k[layer]
            new.v[layer][:, :, : self.max_len] = self.v[layer]
        new.lengths, new.active = list(self.lengths), self.active
        return new

    def select(self, row: int, lengths: list[int]) -> None:
        """The next forward pass fills rows `row`, `row + 1`, ... from position 0, one per input row, right-padded:
        row i keeps `lengths[i]` positions (what follows is padding, overwritten by its next tokens and never
        attended before: a causal prefill never looks ahead)."""
        self._prefill, self._prefill_lengths = row, lengths

    def layout(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._prefill is not None:
            if T > self.max_len:
                raise ValueError(f"sequence of {T} tokens exceeds the cache's {self.max_len} positions")
            self._end = T
            return torch.arange(T, device=device)[None], None  # causal from 0: is_causal
        if T != 1:
            raise ValueError("a decode step feeds one token per row")
        lengths = self.lengths[: self.active]
        self._end = max(lengths) + 1
        if self._end > self.max_len:
            raise ValueError(f"sequence of {self._end} tokens exceeds the cache's {self.max_len} positions")
        pos = torch.tensor(lengths, dtype=torch.long).to(device, non_blocking=True)
        # Rows all at one length (one sequence, or a batch started together) write one slice and see every key:
        # no mask and no scattered write, the step's cheapest form.
        self._same = min(lengths) == self._end - 1
        self._pos = pos
        if self._same:
            return pos[:, None], None
        keys = torch.arange(self._end, device=device)
        return pos[:, None], (keys[None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kc, vc = self.k[layer], self.v[layer]
        if self._prefill is not None:
            rows, T = slice(self._prefill, self._prefill + k.shape[0]), k.shape[2]
            kc[rows, :, :T] = k
            vc[rows, :, :T] = v
            return kc[rows, :, :T], vc[rows, :, :T]
        if self._same:
            kc[: self.active, :, self._end - 1] = k[:, :, 0]
            vc[: self.active, :, self._end - 1] = v[:, :, 0]
        else:
            rows = self._rows[: self.active]
            kc[rows, :, self._pos] = k[:, :, 0].to(kc.dtype)
            vc[rows, :, self._pos] = v[:, :, 0].to(vc.dtype)
        return kc[: self.active, :, : self._end], vc[: self.active, :, : self._end]

    def advance(self, T: int) -> None:
        if self._prefill is not None:
            for i, n in enumerate(self._prefill_lengths):
                self.lengths[self._prefill + i] = n
            self._prefill = None
        else:
            for b in range(self.active):
                self.lengths[b] += 1

    def move(self, src: int, dst: int) -> None:
        """Copy row `src` (keys, values, length) over row `dst`."""
        n = self.lengths[src]
        for kc, vc in zip(self.k, self.v, strict=True):
            kc[dst, :, :n] = kc[src, :, :n]
            vc[dst, :, :n] = vc[src, :, :n]
        self.lengths[dst] = n


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    """The block family's norm: RMSNorm (llama) or LayerNorm with a bias (gpt2)."""
    if config.arch == "gpt2":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    return nn.RMSNorm(dim, eps=config.norm_eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.rope = config.rope
        bias = config.arch == "gpt2"
        # One matmul for queries, keys and values; the export splits it into Llama's q/k/v projections.
        self.qkv = nn.Linear(config.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=bias)
        self.dropout = config.dropout
        # QK-norm before RoPE, in modded-nanogpt's order (nanochat norms after it: the same thing for a gain-free
        # norm, since rotations keep the RMS). With a learned gain, as Qwen3: a gain-free norm caps attention
        # logits at sqrt(head_dim), tight for small heads; and so the export to Qwen3 is exact.
        self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | SlotCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim],
            dim=-1,
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            # No mask: causal over the T new positions, or (one new position per row, cache or not) every key.
            is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
            # Grouped-query attention: each kv head serves a group of q heads, without copying k and v per head.
            enable_gqa=self.n_kv_head != self.n_head,
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.hidden = config.hidden_dim
        # Gate and up projections in one matmul; the export splits them.
        self.gate_up = nn.Linear(config.d_model, 2 * self.hidden, bias=False)
        self.down = nn.Linear(self.hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        return self.down(F.silu(gate) * up)


class ReLU2(nn.Module):
    """The speedrun's MLP: relu(x)^2 between two matmuls, no gate."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.d_model, config.hidden_dim, bias=False)
        self.down = nn.Linear(config.hidden_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)).square())


class GELU(nn.Module):
    """GPT-2's MLP: GELU (tanh approximation, as OpenAI's code) between two biased matmuls."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        bias = config.arch == "gpt2"
        self.up = nn.Linear(config.d_model, config.hidden_dim, bias=bias)
        self.down = nn.Linear(config.hidden_dim, config.d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


MLPS = {"swiglu": SwiGLU, "relu2": ReLU2, "gelu": GELU}


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(config, config.d_model)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config, config.d_model)
        self.mlp = MLPS[config.mlp](config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | SlotCache | None,
    ) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, mask, cache))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.padded_vocab_size, config.d_model)
        # GPT-2's learned position embedding; llama rotates queries and keys instead.
        self.pos_emb = None if config.rope else nn.Embedding(config.context_length, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config, config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # Derived from the config, so not saved with the weights.
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_buffers()
        self.reset_parameters()

    def init_buffers(self) -> None:
        """(Re)compute the RoPE tables from the config, on the device the buffers are on: what a model built on
        the meta device and then moved with `to_empty` needs (its buffers are then uninitialised memory)."""
        cos, sin = rope_tables(self.config.head_dim, self.config.context_length, self.config.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)

    def reset_parameters(self) -> None:
        """The init of every parameter (`init_parameter`), in `named_parameters` order, drawing from the RNG."""
        for name, p in self.named_parameters():
            self.init_parameter(name, p)

    @torch.no_grad()
    def init_parameter(self, name: str, p: torch.Tensor) -> None:
        """GPT-2 init of parameter `name` into `p` (it or a tensor of its shape): N(0, 0.02), with the
        projections into the residual stream scaled by 1/sqrt(2 * n_layer) so the stream's variance does not
        grow with depth; or, with `zero_init_proj`, those at zero. Biases 0, norm gains 1."""
        into_residual = name.endswith(("attn.proj.weight", "mlp.down.weight"))
        if name.endswith(".bias"):
            nn.init.zeros_(p)
        elif p.dim() < 2:
            nn.init.ones_(p)  # the norm gains
        elif into_residual and self.config.zero_init_proj:
            nn.init.zeros_(p)
        else:
            residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(p, mean=0.0, std=residual_std if into_residual else 0.02)

    def fused_row_blocks(self) -> dict[str, list[int]]:
        """The projections stacked in each fused weight, as row counts by parameter name: q, k, v in an
        attention's qkv; gate, up in a SwiGLU's gate_up. For what treats each projection as its own matrix
        (Muon orthogonalises each alone, as with nanochat's separate q, k, v weights)."""
        c = self.config
        blocks = {}
        for i, block in enumerate(self.blocks):
            blocks[f"blocks.{i}.attn.qkv.weight"] = [c.n_head * c.head_dim] + [c.kv_heads * c.head_dim] * 2
            if isinstance(block.mlp, SwiGLU):
                blocks[f"blocks.{i}.mlp.gate_up.weight"] = [block.mlp.hidden] * 2
        return blocks

    @torch.no_grad()
    def store_weights_column_major(self) -> None:
        """Keep every linear layer's weight in column-major memory order: the same values and shape, transposed
        in memory. Generating on CPU multiplies each weight by one vector per token, and MKL's kernel for that
        reads this order 1.2-1.4x faster (the layouts tie at larger batches; docs/benchmarks.md). For models
        that only generate: training and saving expect the usual order."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.weight.is_contiguous():
                module.weight.data = module.weight.data.t().contiguous().t()

    def num_params(self, *, embeddings: bool = True) -> int:
        """Parameter count (shared tensors counted once); without the token (and position) embeddings if
        `embeddings=False`."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.tok_emb.weight.numel() + (
                self.pos_emb.weight.numel() if self.pos_emb is not None else 0
            )
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), as PaLM (app. B) and nanoGPT count them: 6 per weight
        of every matmul (SwiGLU's three, ReLU²'s two), the output layer included, plus 12 * n_layer * d_model *
        seq_len for the attention scores and their weighted sum. The token embedding is a lookup, not a matmul,
        so it is left out; with tied embeddings the same matrix is still the output layer's, and counted as
        such. (Norm gains add their few weights; elementwise work, the soft-cap's tanh included, is left out.)"""
        c = self.config
        t = seq_len or c.context_length
        matmul_params = self.num_params(embeddings=False)
        if c.tie_embeddings:  # the shared matrix, left out with the embedding, is the output layer's too
            matmul_params += self.lm_head.weight.numel()
        return 6 * matmul_params + 12 * c.n_layer * c.d_model * t

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | SlotCache | None = None,
        last_only: bool = False,
        doc_ids: torch.Tensor | None = None,
        at: torch.Tensor | None = None,
        reduction: str = "mean",
        attend: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) for token ids `idx` (B, T), and the mean cross-entropy if `targets` (B, T)
        are given (positions whose target is -1 are ignored); with reduction="sum", the sum, which is 0 with no
        target (where the mean is NaN): what a caller dividing by a count of its own needs.

        With a `cache`, `idx` continues the sequences the cache holds: only the new positions are computed.
        With `last_only`, only the last position's logits are computed (B, 1, vocab_size): what generation needs.
        With `at`, a boolean (B, T), only those positions' logits, in row-major order (N, vocab_size): what
        scoring a continuation needs (the output head is a large share of a small model's compute and memory).
        With `doc_ids` (B, T), a position attends only to earlier positions of the same id, and positions count
        from each document's first token: a document packed after others is computed exactly as if alone (a
        learned position table needs the reset; RoPE, being relative, gives the same either way).
        With `attend` (B, T, T), a boolean of which positions each position may attend to, and `positions` (B, T)
        (no cache): any such layout, e.g. a shared context followed by several continuations that each see the
        context and themselves only, each computed as if alone after the context (what scoring choices needs).
        """
        B, T = idx.shape
        if cache is None and T > self.config.context_length:
            raise ValueError(
                f"sequence of {T} tokens exceeds the model's context_length={self.config.context_length}"
            )
        if cache is not None:  # each cache knows where its rows' new tokens go and what they may attend to
            pos, mask = cache.layout(T, idx.device)
            cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)
        elif (
            attend is not None
        ):  # a layout of the caller's (scoring: a shared context, several continuations)
            mask, pos = attend.unsqueeze(1), positions
            cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)
        elif doc_ids is None:
            pos = torch.arange(T, device=idx.device)
            cos, sin, mask = self.rope_cos[:T], self.rope_sin[:T], None  # is_causal: flash kernels on GPU
        else:  # packed documents: block-diagonal causal mask (B, 1, T, T), positions per document
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal).unsqueeze(1)
            pos = document_positions(doc_ids)
            cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)

        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache)
        if last_only:
            x = x[:, -1:]
        elif at is not None:
            x = x[at]
        # The embedding's padding rows are never a token: their logits are cut off (a view, not a copy).
        logits = self.lm_head(self.norm(x))[..., : self.config.vocab_size]
        if self.config.logit_softcap is not None:  # smooth, bounded logits (modded-nanogpt: 30, then 15)
            logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
        if cache is not None:
            cache.advance(T)
        loss = None
        if targets is not None:
            # flatten keeps the sliced view a view; .float() then makes the one fp32 copy the loss needs.
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, reduction=reduction
            )
        return logits, loss
