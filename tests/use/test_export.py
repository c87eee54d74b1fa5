"""Export to Hugging Face transformers: same logits, same ids, same greedy text, for every architecture option
that a transformers model expresses (the rest refused); the push, with the Hub mocked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import BASE_TOKENIZER, ORIGINAL_TOKENIZER, SHAKESPEARE
from safetensors import safe_open

from talm.errors import TalmError
from talm.model.config import ModelConfig
from talm.model.gpt import GPT
from talm.tokenizer.api import Tokenizer
from talm.tokenizer.train import train as train_tokenizer
from talm.use.export import export_checkpoint, export_hf, push_to_hub
from talm.use.sample import generate_ids

transformers = pytest.importorskip("transformers")

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\tSpeak, speak!  3.14159 -- naïve café, 日本語, 🙂 <b>HTML</b>\r\n   trailing spaces   "
)


def model_for(
    tokenizer: Tokenizer,
    *,
    tie: bool,
    n_kv_head: int | None,
    seed: int = 0,
    vocab_size: int | None = None,
    matrix_std: float = 0.1,
    **options: object,
) -> GPT:
    """A tiny GPT; `options` are more ModelConfig fields (mlp_hidden=None: the MLP's default width);
    `matrix_std` the spread of its weight matrices."""
    torch.manual_seed(seed)
    config = dict(
        vocab_size=vocab_size or tokenizer.vocab_size,
        context_length=128,
        n_layer=2,
        n_head=4,
        n_kv_head=n_kv_head,
        d_model=64,
        mlp_hidden=96,
        tie_embeddings=tie,
        rope_theta=5000.0,
        norm_eps=1e-6,
    )
    model = GPT(ModelConfig(**(config | options)))
    with torch.no_grad():  # weights larger than at init, and norm gains not all 1, so a wrong mapping shows
        for p in model.parameters():
            p.normal_(1.0, 0.1) if p.dim() == 1 else p.normal_(0.0, matrix_std)
    return model.eval()


LLAMA: dict = {}


@pytest.mark.parametrize(
    ("tokenizer_file", "tie", "n_kv_head", "options", "architecture"),
    [
        (BASE_TOKENIZER, True, None, LLAMA, "LlamaForCausalLM"),
        (BASE_TOKENIZER, False, 2, LLAMA, "LlamaForCausalLM"),
        (
            ORIGINAL_TOKENIZER,
            False,
            None,
            LLAMA,
            "LlamaForCausalLM",
        ),  # vocab 1004: padding rows (to 1024) dropped
        (ORIGINAL_TOKENIZER, True, 1, LLAMA, "LlamaForCausalLM"),
        (BASE_TOKENIZER, True, 2, {"zero_init_proj": True}, "LlamaForCausalLM"),  # an initialisation only
        # Per-head q/k RMSNorm with a gain before RoPE (the gains are not all 1, so the order is checked too).
        (BASE_TOKENIZER, False, 2, {"qk_norm": True}, "Qwen3ForCausalLM"),
        (ORIGINAL_TOKENIZER, True, None, {"qk_norm": True}, "Qwen3ForCausalLM"),
        (BASE_TOKENIZER, False, 2, {"mlp": "relu2", "mlp_hidden": None}, "ArceeForCausalLM"),
        (ORIGINAL_TOKENIZER, True, None, {"mlp": "relu2"}, "ArceeForCausalLM"),
        (BASE_TOKENIZER, False, 2, {"qk_norm": True, "mlp": "relu2"}, "ApertusForCausalLM"),
        (
            ORIGINAL_TOKENIZER,
            True,
            1,
            {"qk_norm": True, "mlp": "relu2", "mlp_hidden": None},
            "ApertusForCausalLM",
        ),
        # The GPT-2 family: learned positions, LayerNorm and biases (not 0 nor 1 after model_for), GELU.
        (BASE_TOKENIZER, True, None, {"arch": "gpt2", "mlp": "gelu"}, "GPT2LMHeadModel"),
        (
            ORIGINAL_TOKENIZER,
            False,
            None,
            {"arch": "gpt2", "mlp": "gelu", "mlp_hidden": None},
            "GPT2LMHeadModel",
        ),
    ],
    ids=str,
)
def test_transformers_loads_the_export_with_the_same_logits_and_ids(
    tmp_path: Path, tokenizer_file: Path, tie: bool, n_kv_head: int | None, options: dict, architecture: str
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = Tokenizer.from_file(tokenizer_file)
    model = model_for(tokenizer, tie=tie, n_kv_head=n_kv_head, **options)
    out = export_hf(model, tokenizer, tmp_path / "export")

    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert type(hf_model).__name__ == architecture
    c = model.config  # every weight is exported, but the padding rows of the embedding (and untied head)
    padding = (c.padded_vocab_size - c.vocab_size) * c.d_model * (1 if tie else 2)
    assert sum(p.numel() for p in hf_model.parameters()) == model.num_params() - padding
    assert hf_model.config.vocab_size == tokenizer.vocab_size
    assert hf_model.config.tie_word_embeddings == tie

    ids = tokenizer.encode(TEXT)
    assert hf_tok(TEXT)["input_ids"] == ids
    assert hf_tok.decode(ids) == TEXT
    assert hf_tok.eos_token == hf_tok.bos_token == "<|endoftext|>"
    assert hf_tok.eos_token_id == tokenizer.eot_id == hf_model.config.eos_token_id

    x = torch.tensor([ids[:100]])
    with torch.no_grad():
        ours = model(x)[0]
        theirs = hf_model(x).logits
    assert ours.shape == theirs.shape
    assert ours.std() > 0.5  # logits that actually depend on the weights
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)

    # transformers' own greedy decoding (its KV cache, its positions) continues the text as talm does.
    prompt = ids[:12]
    ours_greedy = [s[0] for s in generate_ids(model, [prompt], max_new_tokens=20, temperature=0.0)]
    with torch.no_grad():
        theirs_greedy = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert theirs_greedy == ours_greedy


def test_export_files(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_file(ORIGINAL_TOKENIZER)
    model = model_for(tokenizer, tie=True, n_kv_head=None)
    meta = {"step": 7, "tokens_seen": 1234, "val_loss": 3.25, "val_bpb": 1.5}
    out = export_hf(model, tokenizer, tmp_path / "export", meta=meta, dtype="bfloat16")
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 1004 and config["num_key_value_heads"] == 4
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        emb = f.get_tensor("model.embed_tokens.weight")
    assert "lm_head.weight" not in keys  # tied: transformers ties it back
    assert emb.dtype == torch.bfloat16 and emb.shape == (1004, 64)
    card = (out / "README.md").read_text()
    assert "1,234" in card and "1.5000" in card
    assert not list(tmp_path.glob(".export*"))  # no temporary directory left behind


def test_export_refuses_an_existing_directory_unless_overwrite(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_file(BASE_TOKENIZER)
    model = model_for(tokenizer, tie=True, n_kv_head=None)
    out = tmp_path / "export"
    export_hf(model, tokenizer, out)
    (out / "stale.txt").write_text("from an older export")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(TalmError, match="already exists: pass --overwrite"):
        export_hf(model, tokenizer, out)
    assert (out / "model.safetensors").read_bytes() == before and (out / "stale.txt").is_file()
    export_hf(model_for(tokenizer, tie=True, n_kv_head=None, seed=1), tokenizer, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with pytest.raises(TalmError, match="not a directory"):
        export_hf(model, tokenizer, out / "config.json", overwrite=True)


def test_overwrite_never_replaces_what_is_not_an_export(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_file(BASE_TOKENIZER)
    model = model_for(tokenizer, tie=True, n_kv_head=None)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with pytest.raises(TalmError, match="is not an earlier export .*: choose another -o/--output"):
        export_hf(model, tokenizer, mine, overwrite=True)
    assert sorted(p.name for p in mine.iterdir()) == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_hf(model, tokenizer, empty, overwrite=True)  # an empty directory is fine
    assert (empty / "config.json").is_file()


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ("afile/sub", "'.*afile' is a file, not a directory: move it away or choose another -o/--output"),
        ("afile/sub/deeper", "'.*afile' is a file, not a directory"),
        ("/proc/x", "cannot write to '/proc' .*choose another -o/--output"),
    ],
)
def test_export_to_a_place_that_cannot_be_written_is_refused_before_any_work(
    tmp_path: Path, target: str, match: str
) -> None:
    tokenizer = Tokenizer.from_file(BASE_TOKENIZER)
    model = model_for(tokenizer, tie=True, n_kv_head=None)
    (tmp_path / "afile").write_text("a file")
    out = Path(target) if target.startswith("/") else tmp_path / target
    with pytest.raises(TalmError, match=match):
        export_hf(model, tokenizer, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize(
    "options", [{"logit_softcap": 15.0}, {"logit_softcap": 30.0, "qk_norm": True}], ids=str
)
def test_a_soft_capped_model_is_refused_in_one_line_before_any_work(tmp_path: Path, options: dict) -> None:
    model = model_for(Tokenizer.from_file(BASE_TOKENIZER), tie=True, n_kv_head=None, **options)
    with pytest.raises(TalmError) as err:
        export_hf(model, Tokenizer.from_file(BASE_TOKENIZER), tmp_path / "export")
    cap = options["logit_softcap"]
    assert str(err.value).startswith(f"model.logit_softcap={cap} cannot be expressed in the Llama format")
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("qk_norm", [False, True])
def test_a_llama_family_gelu_mlp_is_refused_in_one_line_before_any_work(
    tmp_path: Path, qk_norm: bool
) -> None:
    model = model_for(
        Tokenizer.from_file(BASE_TOKENIZER), tie=True, n_kv_head=None, mlp="gelu", qk_norm=qk_norm
    )
    with pytest.raises(TalmError) as err:
        export_hf(model, Tokenizer.from_file(BASE_TOKENIZER), tmp_path / "export")
    assert str(err.value).startswith("model.mlp=gelu with rotary attention (arch llama) has no transformers")
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_tokenizer_with_more_ids_than_the_model(tmp_path: Path) -> None:
    model = model_for(Tokenizer.from_file(ORIGINAL_TOKENIZER), tie=True, n_kv_head=None)  # 1004 ids
    with pytest.raises(TalmError, match="has a vocabulary of 1004 tokens but its tokenizer makes 1024"):
        export_hf(model, Tokenizer.from_file(BASE_TOKENIZER), tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("tie", [True, False])
def test_a_model_with_more_ids_than_its_tokenizer_exports_with_its_own_vocab_size(
    tmp_path: Path, tie: bool
) -> None:
    """Training allows model.vocab_size above the tokenizer's (e.g. 1004 rounded up to 1030): the export keeps
    the model's size (the Llama weights must match it), the HF tokenizer keeps its own, the logits are equal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = Tokenizer.from_file(ORIGINAL_TOKENIZER)
    model = model_for(tokenizer, tie=tie, n_kv_head=2, vocab_size=tokenizer.vocab_size + 26)
    out = export_hf(model, tokenizer, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 1030
    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert len(hf_tok) == tokenizer.vocab_size == 1004
    ids = tokenizer.encode(TEXT)
    assert hf_tok(TEXT)["input_ids"] == ids
    x = torch.tensor([ids[:64]])
    with torch.no_grad():
        ours, theirs = model(x)[0], hf_model(x).logits
    assert ours.shape == theirs.shape == (1, 64, 1030)
    assert ours.std() > 0.5
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_tokenizers_trained_by_talm_load_as_pretrained_tokenizer_fast(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:200_000] + "\nnaïve café 日本語 🙂\n")
    trained, _ = train_tokenizer([corpus], 600, name="small", progress=False)
    path = trained.save(tmp_path / "small.json")
    for file in (path, BASE_TOKENIZER):
        ours = Tokenizer.from_file(file)
        theirs = PreTrainedTokenizerFast(tokenizer_file=str(file))
        text = SHAKESPEARE.read_text(encoding="utf-8")[300_000:310_000] + TEXT
        assert theirs(text)["input_ids"] == ours.encode(text)
        assert theirs.decode(ours.encode(text)) == text


# ------------------------------------------------------------------------------------------------ the Hub


class FakeHfApi:
    """Records what push_to_hub asks of the Hub client."""

    calls: list[tuple[str, dict]] = []
    fail_with: Exception | None = None

    def __init__(self, token: str | None = None) -> None:
        FakeHfApi.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id: str, **kwargs) -> str:
        FakeHfApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if FakeHfApi.fail_with is not None:
            raise FakeHfApi.fail_with
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs) -> None:
        FakeHfApi.calls.append(("upload_folder", kwargs))


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> type[FakeHfApi]:
    import huggingface_hub

    FakeHfApi.calls = []
    FakeHfApi.fail_with = None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return FakeHfApi


def test_push_creates_the_repo_then_uploads_the_folder(tmp_path: Path, fake_hub: type[FakeHfApi]) -> None:
    url = push_to_hub(tmp_path, "someone/tiny", private=True)
    assert url == "https://huggingface.co/someone/tiny"
    assert [name for name, _ in fake_hub.calls] == ["init", "create_repo", "upload_folder"]
    assert fake_hub.calls[0][1] == {"token": "hf_test_token"}
    assert fake_hub.calls[1][1] == {
        "repo_id": "someone/tiny",
        "private": True,
        "repo_type": "model",
        "exist_ok": True,
    }
    upload = fake_hub.calls[2][1]
    assert upload["repo_id"] == "someone/tiny" and Path(upload["folder_path"]) == tmp_path


def test_push_without_a_token(
    tmp_path: Path, fake_hub: type[FakeHfApi], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(TalmError, match="no Hugging Face token found: set HF_TOKEN"):
        push_to_hub(tmp_path, "someone/tiny")
    assert fake_hub.calls == []


def test_push_with_a_bad_repo_id(tmp_path: Path, fake_hub: type[FakeHfApi]) -> None:
    with pytest.raises(TalmError, match="not a valid repo id"):
        push_to_hub(tmp_path, "not a/valid//id")


def test_export_checkpoint_checks_the_hub_before_loading_then_exports(
    tiny_model_dir: Path, tmp_path: Path, fake_hub: type[FakeHfApi], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "export"
    with pytest.raises(TalmError, match="not a valid repo id"):
        export_checkpoint(tiny_model_dir, out, hub_repo="not a/valid//id")
    with pytest.raises(TalmError, match="unknown dtype 'int8'"):
        export_checkpoint(tiny_model_dir, out, dtype="int8")
    with pytest.raises(TalmError, match="would replace the model being exported"):
        export_checkpoint(tiny_model_dir, tiny_model_dir, overwrite=True)
    assert not out.exists()
    exported = export_checkpoint(tiny_model_dir, out, checkpoint="best", hub_repo="someone/tiny")
    assert exported.path == out and (out / "model.safetensors").is_file()
    assert (
        exported.hub_token == "hf_test_token"
        and exported.meta["step"]
        == json.loads((tiny_model_dir / "best" / "checkpoint.json").read_text())["step"]
    )
    from talm.use.load import load

    assert exported.num_params == load(tiny_model_dir, device="cpu")[0].num_params()
    assert fake_hub.calls == []  # pushing is the caller's next step


@pytest.mark.parametrize("error", [ConnectionError("Name or service not known"), TimeoutError("timed out")])
def test_push_without_network_says_the_hub_is_unreachable(
    tmp_path: Path, fake_hub: type[FakeHfApi], error: Exception
) -> None:
    fake_hub.fail_with = error
    with pytest.raises(TalmError, match="Hugging Face Hub is unreachable .*check your network connection"):
        push_to_hub(tmp_path, "someone/tiny")


def test_push_with_the_real_client_and_no_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real huggingface_hub client against an address where nothing listens: whatever HTTP library this
    huggingface_hub version uses, the failure is reported as an unreachable Hub."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with pytest.raises(TalmError, match="unreachable"):
        push_to_hub(tmp_path, "someone/tiny")
