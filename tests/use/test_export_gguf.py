"""Export to GGUF: the file read back with gguf's own reader (keys, tensors, shapes, dtypes, q8_0 within its
rounding), the rope layout change checked by its math, apertus's xIELU parameters checked to be relu^2 bit for
bit, the refusals (one line, nothing written); and, where llama-cpp-python is installed, llama.cpp itself: the
same token ids, the same greedy tokens, a chat turn, in each architecture talm's options map to."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BASE_TOKENIZER, ORIGINAL_TOKENIZER, one_line_error, save_model_dir
from test_export import model_for as export_model_for

from talm.errors import TalmError
from talm.model.gpt import GPT, apply_rope, rope_tables
from talm.tokenizer.api import Tokenizer
from talm.tokenizer.chat import ChatFormat, chat_template
from talm.tokenizer.formats import hf_token_bytes
from talm.use.gguf import XIELU, export_gguf, gguf_tensors, neighbour_rope_rows
from talm.use.sample import generate_ids

gguf = pytest.importorskip("gguf")

TRICKY = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "All:\tSpeak, speak!  3.14159 1234567 -- naïve café, 日本語, 🙂 <b>HTML</b>\r\n   trailing spaces   ",
    "  leading spaces, don't WE'LL it's\n\n\n  \n x",
    "special spellings as text: <|user|>hi<|assistant|><|endoftext|>",
]
# talm's options -> the llama.cpp architecture that computes them (the presets train with both).
OPTIONS = {
    "llama": {},
    "qwen3": {"qk_norm": True},
    "arcee": {"mlp": "relu2"},
    "apertus": {"qk_norm": True, "mlp": "relu2"},
}


def model_for(
    tokenizer: Tokenizer, *, tie: bool = True, n_kv_head: int | None = None, seed: int = 0, **options
) -> GPT:
    """test_export's tiny GPT with weights large enough that a wrong mapping shows and greedy decoding does not
    repeat one token."""
    return export_model_for(tokenizer, tie=tie, n_kv_head=n_kv_head, seed=seed, matrix_std=0.3, **options)


def fields(path: Path) -> tuple[dict, dict]:
    """The file's key/values (plain Python values) and its tensors by name."""
    reader = gguf.GGUFReader(path)
    kv = {name: f.contents() for name, f in reader.fields.items()}
    return kv, {t.name: t for t in reader.tensors}


# ------------------------------------------------------------------------------------------------------------
# The file, read back


# (tokenizer, tied, n_kv_head, ids beyond the tokenizer, llama.cpp architecture)
VARIANTS = [
    (BASE_TOKENIZER, True, None, 0, "llama"),
    (ORIGINAL_TOKENIZER, False, 2, 26, "llama"),
    (BASE_TOKENIZER, True, 2, 0, "qwen3"),
    (ORIGINAL_TOKENIZER, False, None, 26, "arcee"),
    (BASE_TOKENIZER, True, None, 0, "apertus"),
    (ORIGINAL_TOKENIZER, False, 2, 26, "apertus"),
]
VARIANT_IDS = [
    f"{arch}-{'base' if t == BASE_TOKENIZER else 'original'}{'-tied' if tie else '-untied'}"
    f"{'-gqa' if kv else ''}{'-padded' if extra else ''}"
    for t, tie, kv, extra, arch in VARIANTS
]


@pytest.mark.parametrize(
    ("tokenizer_file", "tie", "n_kv_head", "extra_ids", "arch"), VARIANTS, ids=VARIANT_IDS
)
def test_the_file_holds_the_architecture_and_the_tokenizer(
    tmp_path: Path, tokenizer_file: Path, tie: bool, n_kv_head: int | None, extra_ids: int, arch: str
) -> None:
    tokenizer = Tokenizer.from_file(tokenizer_file)
    model = model_for(
        tokenizer, tie=tie, n_kv_head=n_kv_head, vocab_size=tokenizer.vocab_size + extra_ids, **OPTIONS[arch]
    )
    c = model.config
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", quant="f32")
    kv, tensors = fields(path)
    assert kv["general.architecture"] == arch
    assert (kv[f"{arch}.block_count"], kv[f"{arch}.embedding_length"], kv[f"{arch}.feed_forward_length"]) == (
        2,
        64,
        96,
    )
    assert (kv[f"{arch}.attention.head_count"], kv[f"{arch}.attention.head_count_kv"]) == (4, c.kv_heads)
    assert kv[f"{arch}.context_length"] == 128 and kv[f"{arch}.rope.dimension_count"] == 16
    assert kv[f"{arch}.rope.freq_base"] == 5000.0
    assert kv[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    if arch == "apertus":  # one value per layer
        for key in ("alpha_p", "alpha_n", "beta", "eps"):
            assert kv[f"xielu.{key}"] == pytest.approx([XIELU[key]] * 2), key
    assert not any(k.startswith("xielu.") for k in kv) or arch == "apertus"
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "llama-bpe"
    assert kv["tokenizer.ggml.bos_token_id"] == kv["tokenizer.ggml.eos_token_id"] == tokenizer.eot_id
    assert kv["tokenizer.ggml.add_bos_token"] is False
    assert kv["tokenizer.chat_template"] == chat_template()

    # One token per embedding row: the tokenizer's bytes, its specials as control tokens, then unused padding.
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == c.vocab_size == kv[f"{arch}.vocab_size"]
    special = set(tokenizer.special_tokens.values())
    for i in range(tokenizer.vocab_size):
        if i in special:
            assert types[i] == gguf.TokenType.CONTROL and tokens[i] == tokenizer.decode([i])
        else:
            assert types[i] == gguf.TokenType.NORMAL
            assert hf_token_bytes(tokens[i]).decode("utf-8", "replace") == tokenizer.decode([i])
    assert all(t == gguf.TokenType.UNUSED for t in types[tokenizer.vocab_size :])
    assert len(kv["tokenizer.ggml.merges"]) == tokenizer.vocab_size - len(special) - 256

    check_tensors(model, tensors, arch)


def check_tensors(model: GPT, tensors: dict, arch: str) -> None:
    """The file's tensors are the architecture's set (llama.cpp refuses any other), with talm's weights."""
    c = model.config
    names = {"token_embd.weight", "output_norm.weight"}
    names |= {"output.weight"} if not c.tie_embeddings or arch == "apertus" else set()  # apertus needs one
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_up", "ffn_down"]
    per_layer += ["attn_q_norm", "attn_k_norm"] if c.qk_norm else []
    per_layer += ["ffn_gate"] if c.mlp == "swiglu" else []
    names |= {f"blk.{i}.{n}.weight" for i in range(2) for n in per_layer}
    assert set(tensors) == names

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(tensors[name].data.copy())

    state = model.state_dict()
    assert list(tensors["token_embd.weight"].shape) == [
        64,
        c.vocab_size,
    ]  # ggml's order: the row length first
    torch.testing.assert_close(tensor("token_embd.weight"), state["tok_emb.weight"][: c.vocab_size])
    if "output.weight" in names:
        output = state["tok_emb.weight" if c.tie_embeddings else "lm_head.weight"][: c.vocab_size]
        torch.testing.assert_close(tensor("output.weight"), output)
    # Reordered for the architectures that rotate neighbouring pairs; as talm's for those that rotate halves.
    q, k = (
        state["blocks.1.attn.qkv.weight"][:64],
        state["blocks.1.attn.qkv.weight"][64 : 64 + 16 * c.kv_heads],
    )
    neighbours = arch in ("llama", "arcee")
    torch.testing.assert_close(tensor("blk.1.attn_q.weight"), neighbour_rope_rows(q, 4) if neighbours else q)
    torch.testing.assert_close(
        tensor("blk.1.attn_k.weight"), neighbour_rope_rows(k, c.kv_heads) if neighbours else k
    )
    torch.testing.assert_close(tensor("blk.0.ffn_down.weight"), state["blocks.0.mlp.down.weight"])
    if c.qk_norm:
        torch.testing.assert_close(tensor("blk.1.attn_q_norm.weight"), state["blocks.1.attn.q_norm.weight"])
        torch.testing.assert_close(tensor("blk.0.attn_k_norm.weight"), state["blocks.0.attn.k_norm.weight"])
    if c.mlp == "relu2":
        torch.testing.assert_close(tensor("blk.0.ffn_up.weight"), state["blocks.0.mlp.up.weight"])
    else:
        gate, up = state["blocks.0.mlp.gate_up.weight"].chunk(2)
        torch.testing.assert_close(tensor("blk.0.ffn_gate.weight"), gate)
        torch.testing.assert_close(tensor("blk.0.ffn_up.weight"), up)


def test_apertus_xielu_parameters_make_it_relu_squared_bit_for_bit() -> None:
    """llama.cpp's ggml_xielu turns the file's alpha_p, alpha_n into alpha_p' = softplus(alpha_p), alpha_n' =
    beta + softplus(alpha_n), softplus(a) = logf(1 + expf(a)) in float32 (the C library's), then computes
    alpha_p' x^2 + beta x for x > 0, alpha_n' (expm1(min(x, eps)) - x) + beta x otherwise: with talm's
    parameters, relu(x)^2 as talm computes it, to the bit."""
    name = ctypes.util.find_library("m")
    if name is None:
        pytest.skip("no C math library to compute softplus as llama.cpp does")
    libm = ctypes.CDLL(name)
    for f in (libm.logf, libm.expf):
        f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]

    def softplus(a: float) -> np.float32:
        a = np.float32(a)
        return a if a > 20 else np.float32(libm.logf(np.float32(1) + np.float32(libm.expf(a))))

    beta, eps = np.float32(XIELU["beta"]), np.float32(XIELU["eps"])
    alpha_p, alpha_n = softplus(XIELU["alpha_p"]), beta + softplus(XIELU["alpha_n"])
    assert (alpha_p, alpha_n, beta) == (1, 0, 0)
    torch.manual_seed(0)
    x = torch.cat([torch.randn(100_000) * 10, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3e4, -3e4])])
    a = x.numpy()
    theirs = np.where(
        a > 0, alpha_p * a * a + beta * a, (np.expm1(np.minimum(a, eps)) - a) * alpha_n + beta * a
    )
    assert theirs.dtype == np.float32
    assert torch.equal(torch.from_numpy(theirs), torch.relu(x).square())


@pytest.mark.parametrize(("quant", "matrix_type"), [("f32", "F32"), ("f16", "F16"), ("q8_0", "Q8_0")])
def test_each_quant_stores_matrices_in_its_type_norms_in_f32_within_its_rounding(
    tmp_path: Path, quant: str, matrix_type: str
) -> None:
    tokenizer = Tokenizer.from_file(BASE_TOKENIZER)
    model = model_for(tokenizer, n_kv_head=2)
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", quant=quant)
    kv, tensors = fields(path)
    assert kv["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[quant]
    ours = gguf_tensors(model)
    for name, t in tensors.items():
        want = ours[name]
        assert t.tensor_type.name == ("F32" if want.dim() == 1 else matrix_type), name
        got = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).reshape(want.shape).float()
        if t.tensor_type.name == "Q8_0":
            # Blocks of 32 in steps of their largest magnitude / 127: half a step off, and the step itself is an
            # f16 (up to 127 steps times its relative rounding of 2^-11: 0.062 steps more).
            step = want.abs().reshape(-1, 32).amax(dim=1, keepdim=True) / 127
            assert bool(((got - want).abs().reshape(-1, 32) <= step * 0.57).all()), name
        else:
            torch.testing.assert_close(
                got, want.half().float() if matrix_type == "F16" and want.dim() > 1 else want
            )


def test_q8_0_keeps_a_matrix_whose_rows_are_not_blocks_of_32_in_f16(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_file(BASE_TOKENIZER)
    model = model_for(tokenizer, mlp_hidden=80)  # ffn_down's rows are 80 long
    _, tensors = fields(export_gguf(model, tokenizer, tmp_path / "m.gguf", quant="q8_0"))
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "F16"
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "Q8_0"


def test_neighbour_rope_rows_give_the_attention_scores_of_rotate_half() -> None:
    """llama.cpp's llama rotates neighbouring pairs (2i, 2i+1) by pos * theta^(-2i/d); talm rotates (i, i + d/2)
    by the same angle. With the rows reordered, every query.key score is the same."""
    torch.manual_seed(0)
    n_heads, d, d_model, T = 3, 8, 24, 5
    wq, wk = torch.randn(n_heads * d, d_model), torch.randn(n_heads * d, d_model)
    x = torch.randn(T, d_model)
    cos, sin = rope_tables(d, T, 10000.0)

    def heads(y: torch.Tensor) -> torch.Tensor:
        return y.reshape(T, n_heads, d).transpose(0, 1)  # (heads, T, d)

    def rotate_neighbours(y: torch.Tensor) -> torch.Tensor:
        angle = torch.outer(torch.arange(T).float(), 10000.0 ** (-torch.arange(0, d, 2).float() / d))
        a, b = y[..., 0::2], y[..., 1::2]
        out = torch.empty_like(y)
        out[..., 0::2], out[..., 1::2] = a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()
        return out

    ours = apply_rope(heads(x @ wq.T), cos, sin) @ apply_rope(heads(x @ wk.T), cos, sin).transpose(1, 2)
    q2, k2 = x @ neighbour_rope_rows(wq, n_heads).T, x @ neighbour_rope_rows(wk, n_heads).T
    theirs = rotate_neighbours(heads(q2)) @ rotate_neighbours(heads(k2)).transpose(1, 2)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Refusals: one line, before any work, nothing written


@pytest.mark.parametrize(
    ("options", "starts"),
    [
        (
            {"logit_softcap": 15.0},
            "model.logit_softcap=15.0 has no counterpart in llama.cpp's llama architecture",
        ),
        (
            {"logit_softcap": 15.0, "qk_norm": True, "mlp": "relu2"},
            "model.logit_softcap=15.0 has no counterpart in llama.cpp's apertus architecture",
        ),
        (
            {"mlp": "gelu"},
            "model.mlp=gelu has no counterpart in llama.cpp's architectures of the llama family",
        ),
        ({"arch": "gpt2", "mlp": "gelu"}, "model.arch=gpt2 is not llama.cpp's llama architecture"),
    ],
    ids=str,
)
def test_an_option_llama_cpp_does_not_compute_is_refused_in_one_line(
    tmp_path: Path, options: dict, starts: str
) -> None:
    tokenizer = Tokenizer.from_file(BASE_TOKENIZER)
    model = model_for(tokenizer, **options)
    with pytest.raises(TalmError) as err:
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert str(err.value).startswith(starts) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_tokenizer_whose_split_llama_cpp_lacks_is_refused(tmp_path: Path) -> None:
    document = json.loads(BASE_TOKENIZER.read_text(encoding="utf-8"))
    document["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+"
    (tmp_path / "tok.json").write_text(json.dumps(document), encoding="utf-8")
    tokenizer = Tokenizer.from_file(tmp_path / "tok.json")
    with pytest.raises(
        TalmError, match=r"which no llama.cpp pre-tokenizer implements: export it with --format"
    ):
        export_gguf(model_for(tokenizer), tokenizer, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_an_existing_file_is_replaced_only_with_overwrite_and_only_if_it_is_gguf(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_file(BASE_TOKENIZER)
    path = export_gguf(model_for(tokenizer), tokenizer, tmp_path / "m.gguf")
    before = path.read_bytes()
    with pytest.raises(TalmError, match="already exists: pass --overwrite"):
        export_gguf(model_for(tokenizer, seed=1), tokenizer, path)
    assert path.read_bytes() == before
    export_gguf(model_for(tokenizer, seed=1), tokenizer, path, overwrite=True)
    assert path.read_bytes() != before
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    with pytest.raises(TalmError, match="is not a GGUF file, and --overwrite only replaces an export"):
        export_gguf(model_for(tokenizer), tokenizer, notes, overwrite=True)
    assert notes.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "notes.gguf"]  # no temporary left


# ------------------------------------------------------------------------------------------------------------
# The command


def test_export_model_format_gguf(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from talm.cli.export_model import main

    out = tmp_path / "tiny.gguf"
    main(["-m", str(tiny_model_dir), "--format", "gguf", "-o", str(out), "--quant", "q8_0"])
    assert f"run it with `llama-cli -m {out}`" in capsys.readouterr().err
    kv, tensors = fields(out)
    assert kv["general.name"] == "tiny" and kv["general.file_type"] == 7
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"


def test_export_model_writes_the_presets_options_as_apertus(tmp_path: Path, capsys) -> None:
    from talm.cli.export_model import main

    tokenizer = Tokenizer.from_file(BASE_TOKENIZER)
    model = model_for(tokenizer, **OPTIONS["apertus"])
    model_dir = save_model_dir(tmp_path / "models" / "preset", model, step=1)
    out = tmp_path / "preset.gguf"
    main(["-m", str(model_dir), "--format", "gguf", "-o", str(out)])
    assert f"run it with `llama-cli -m {out}`" in capsys.readouterr().err
    kv, tensors = fields(out)
    assert kv["general.architecture"] == "apertus" and kv["general.name"] == "preset"
    assert "blk.1.attn_k_norm.weight" in tensors and "blk.1.ffn_gate.weight" not in tensors


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--format", "gguf", "--dtype", "bfloat16"], "--dtype only applies to --format transformers"),
        (["--quant", "q8_0"], "--quant only applies to --format gguf"),
        (["--format", "gguf", "--push-to-hub", "me/x"], "--push-to-hub uploads a transformers export"),
    ],
    ids=str,
)
def test_export_model_refuses_flags_of_the_other_format(
    tiny_model_dir: Path, tmp_path: Path, capsys, args: list[str], says: str
) -> None:
    from talm.cli.export_model import main

    err = one_line_error(capsys, main, "-m", str(tiny_model_dir), "-o", str(tmp_path / "out"), *args)
    assert says in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"logit_softcap": 30.0}, "model.logit_softcap=30.0 has no counterpart"),
        ({"mlp": "gelu"}, "model.mlp=gelu has no counterpart"),
        ({"arch": "gpt2", "mlp": "gelu"}, "model.arch=gpt2 is not llama.cpp's llama architecture"),
    ],
    ids=str,
)
def test_export_model_refuses_an_option_before_loading_the_weights(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, options: dict, says: str
) -> None:
    import talm.use.gguf
    from talm.cli.export_model import main

    tokenizer = Tokenizer.from_file(BASE_TOKENIZER)
    model_dir = save_model_dir(tmp_path / "models" / "m", model_for(tokenizer, **options), step=1)
    monkeypatch.setattr(talm.use.gguf, "load_checkpoint", lambda *a, **k: pytest.fail("weights were loaded"))
    err = one_line_error(
        capsys, main, "-m", str(model_dir), "--format", "gguf", "-o", str(tmp_path / "m.gguf")
    )
    assert says in err and ("--format transformers" in err or "talm's generate" in err)
    assert not (tmp_path / "m.gguf").exists()


def test_the_command_lists_the_quants_the_exporter_writes() -> None:
    from talm.cli import export_model
    from talm.use import gguf as exporter

    assert export_model.QUANTS == exporter.QUANTS


# ------------------------------------------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python)


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip(
            "llama-cpp-python is not installed (it builds llama.cpp from source): "
            "pip install 'talm[llamacpp]' to run llama.cpp on the exported file"
        )
    return llama_cpp


def load_in_llama_cpp(llama_cpp, path: Path):
    return llama_cpp.Llama(str(path), n_ctx=128, n_threads=1, n_batch=128, verbose=False, seed=0)


@pytest.mark.parametrize(
    ("tokenizer_file", "tie", "n_kv_head", "extra_ids", "arch"), VARIANTS, ids=VARIANT_IDS
)
def test_llama_cpp_tokenizes_and_generates_as_talm(
    tmp_path: Path,
    llama_cpp,
    tokenizer_file: Path,
    tie: bool,
    n_kv_head: int | None,
    extra_ids: int,
    arch: str,
) -> None:
    tokenizer = Tokenizer.from_file(tokenizer_file)
    model = model_for(
        tokenizer, tie=tie, n_kv_head=n_kv_head, vocab_size=tokenizer.vocab_size + extra_ids, **OPTIONS[arch]
    )
    llm = load_in_llama_cpp(llama_cpp, export_gguf(model, tokenizer, tmp_path / "m.gguf", quant="f32"))
    for text in TRICKY:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(
            text, allow_special=True
        ), text
        assert llm.detokenize(tokenizer.encode(text)).decode() == text

    prompt = tokenizer.encode(TRICKY[0])[:10]
    ours = [s[0] for s in generate_ids(model, [prompt], max_new_tokens=32, temperature=0.0)]
    llm.reset()
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        theirs.append(token)
        if len(theirs) == 32:
            break
    assert len(set(ours)) > 4  # a varied continuation, not one token repeated
    assert theirs == ours


def test_llama_cpp_tokenizes_as_talm_a_tokenizer_with_llama_3_s_spelling_of_the_split(
    tmp_path: Path, llama_cpp
) -> None:
    from talm.use.gguf import LLAMA3_PATTERN

    document = json.loads(BASE_TOKENIZER.read_text(encoding="utf-8"))
    document["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = LLAMA3_PATTERN
    (tmp_path / "tok.json").write_text(json.dumps(document), encoding="utf-8")
    tokenizer = Tokenizer.from_file(tmp_path / "tok.json")
    llm = load_in_llama_cpp(llama_cpp, export_gguf(model_for(tokenizer), tokenizer, tmp_path / "m.gguf"))
    for text in TRICKY:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text


@pytest.mark.parametrize("arch", OPTIONS)
def test_a_chat_turn_through_llama_cpp_uses_talm_s_chat_format(tmp_path: Path, llama_cpp, arch: str) -> None:
    tokenizer = Tokenizer.from_file(BASE_TOKENIZER)
    model = model_for(tokenizer, n_kv_head=2, **OPTIONS[arch])
    llm = load_in_llama_cpp(llama_cpp, export_gguf(model, tokenizer, tmp_path / "m.gguf", quant="f32"))
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 12 + 30?"},
    ]
    prompt = ChatFormat(tokenizer).render_prompt(messages)
    reply = llm.create_chat_completion(
        messages=messages, max_tokens=12, temperature=0.0, top_k=1, repeat_penalty=1.0
    )
    assert reply["usage"]["prompt_tokens"] == len(prompt)
    assert list(llm.input_ids[: len(prompt)]) == prompt  # what llama.cpp evaluated: talm's chat tokens
    ours = []
    for step in generate_ids(model, [prompt], max_new_tokens=12, temperature=0.0, eot_id=tokenizer.eot_id):
        if step[0] == tokenizer.eot_id:
            break
        ours.append(step[0])
    evaluated = list(
        llm.input_ids[len(prompt) : len(prompt) + len(ours) - 1]
    )  # the reply, fed back but its last
    assert len(ours) > 4 and evaluated == ours[:-1]
    # llama-cpp-python drops bytes that are no UTF-8 character, where talm writes U+FFFD.
    assert reply["choices"][0]["message"]["content"] == tokenizer.decode(ours).replace("\ufffd", "")
