"""The talm <-> transformers mapping (talm.model.hf): a transformers model read into talm's GPT computes the same
logits (GPT-2, Llama tied/untied/GQA, Qwen3), the GPT-2 family generates with its KV cache as without, the
mapping round trips, and what talm cannot compute is refused in one line."""

from __future__ import annotations

import pytest
import torch

from talm.errors import TalmError
from talm.model.config import ModelConfig
from talm.model.gpt import GPT
from talm.model.hf import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from talm.use.sample import generate_ids

transformers = pytest.importorskip("transformers")


def tiny_gpt2(**overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=101, n_positions=48, n_embd=32, n_layer=2, n_head=4, **overrides
    )
    return randomized(transformers.GPT2LMHeadModel(config))


def tiny_llama(*, tie: bool, n_kv_head: int, cls: str = "Llama") -> torch.nn.Module:
    torch.manual_seed(0)
    config = getattr(transformers, f"{cls}Config")(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_head, max_position_embeddings=48, tie_word_embeddings=tie, rms_norm_eps=1e-6,
        head_dim=8,
    )  # fmt: skip
    return randomized(getattr(transformers, f"{cls}ForCausalLM")(config))


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Weights (biases and norm gains too) far from their init, so a wrong or missing mapping shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name or "ln_" in name else 0.0, 0.2 if p.dim() == 1 else 0.1)
    return model.float().eval()


def imported(hf_model: torch.nn.Module) -> GPT:
    config = from_hf_config(hf_model.config.to_dict(), "the test model")
    model = GPT(config)
    model.load_state_dict(from_hf_state_dict(config, hf_model.state_dict(), "the test model"))
    return model.eval()


MODELS = {
    "gpt2": lambda: tiny_gpt2(),
    "gpt2-untied": lambda: tiny_gpt2(tie_word_embeddings=False),
    "llama-tied": lambda: tiny_llama(tie=True, n_kv_head=4),
    "llama-untied-gqa": lambda: tiny_llama(tie=False, n_kv_head=2),
    "llama-mqa": lambda: tiny_llama(tie=True, n_kv_head=1),
    "qwen3-gqa": lambda: tiny_llama(tie=False, n_kv_head=2, cls="Qwen3"),
}


@pytest.mark.parametrize("name", MODELS)
def test_imported_model_computes_the_same_logits(name: str) -> None:
    hf_model = MODELS[name]()
    model = imported(hf_model)
    assert model.config.arch == ("gpt2" if name.startswith("gpt2") else "llama")
    ids = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids)[0], hf_model(ids).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_the_mapping_round_trips(name: str) -> None:
    hf_model = MODELS[name]()
    model = imported(hf_model)
    out = to_hf_state_dict(model)
    theirs = hf_model.state_dict()
    assert set(out) == set(theirs) - ({"lm_head.weight"} if model.config.tie_embeddings else set())
    for k, v in out.items():
        assert torch.equal(v, theirs[k]), k
    config = to_hf_config(model.config, 100, "float32")
    assert from_hf_config(config, "the export") == model.config


def test_gpt2_family_generates_the_same_with_and_without_the_cache() -> None:
    model = imported(tiny_gpt2())
    prompts = [[5, 6, 7], [9]]  # different lengths: the shorter row is left-padded
    with_cache = list(generate_ids(model, prompts, max_new_tokens=60, temperature=0))
    without = list(generate_ids(model, prompts, max_new_tokens=60, temperature=0, use_cache=False))
    assert with_cache == without
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**to_hf_config(model.config, 0, "float32")))
    hf.load_state_dict(to_hf_state_dict(model), strict=False)
    out = hf.eval().generate(torch.tensor([[5, 6, 7]]), max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert out[0, 3:].tolist() == [step[0] for step in with_cache[:20]]


def test_gpt2_family_trains_from_scratch_too() -> None:
    config = ModelConfig(
        arch="gpt2", mlp="gelu", vocab_size=50, context_length=16, n_layer=1, n_head=2, d_model=16
    )
    model = GPT(config)
    assert model.blocks[0].attn.qkv.bias is not None and not model.blocks[0].attn.qkv.bias.detach().any()
    _, loss = model(torch.zeros(2, 16, dtype=torch.long), torch.ones(2, 16, dtype=torch.long))
    loss.backward()
    assert model.pos_emb is not None and model.pos_emb.weight.grad is not None
    with pytest.raises(ValueError, match="arch gpt2 takes mlp=gelu"):
        ModelConfig(arch="gpt2", vocab_size=50)


def test_a_shorter_context_keeps_the_first_positions() -> None:
    hf_model = tiny_gpt2()
    config = from_hf_config(hf_model.config.to_dict(), "x").model_copy(update={"context_length": 16})
    model = GPT(config)
    model.load_state_dict(from_hf_state_dict(config, hf_model.state_dict(), "x"))
    ids = torch.arange(16)[None]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids)[0], hf_model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"architectures": ["MistralForCausalLM"]},
            "is a MistralForCausalLM, which talm cannot load: supported",
        ),
        ({"model_type": "bert"}, "model_type 'bert', which talm cannot load: supported are LlamaForCausalLM"),
        ({"architectures": ["GPT2LMHeadModel"], "activation_function": "relu"}, "activation_function='relu'"),
        ({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "llama3"}}, "rope scaling"),
        ({"architectures": ["LlamaForCausalLM"], "attention_bias": True}, "attention_bias=true"),
        ({"architectures": ["LlamaForCausalLM"]}, "has no 'hidden_size'"),
    ],
)
def test_what_talm_cannot_compute_is_refused(config: dict, message: str) -> None:
    with pytest.raises(TalmError, match=message):
        from_hf_config(config, "x")


def test_missing_extra_and_misshapen_tensors_are_refused() -> None:
    hf_model = tiny_llama(tie=False, n_kv_head=2)
    config = from_hf_config(hf_model.config.to_dict(), "m")
    tensors = dict(hf_model.state_dict())
    with pytest.raises(TalmError, match="has no tensor 'lm_head.weight'"):
        from_hf_state_dict(config, {k: v for k, v in tensors.items() if k != "lm_head.weight"}, "m")
    with pytest.raises(TalmError, match="has tensor 'model.extra', which LlamaForCausalLM does not have"):
        from_hf_state_dict(config, tensors | {"model.extra": torch.zeros(1)}, "m")
    bad = tensors | {"model.norm.weight": torch.zeros(7)}
    with pytest.raises(TalmError, match="'model.norm.weight' has shape \\(7,\\)"):
        from_hf_state_dict(config, bad, "m")
