"""talm.train.init: foreign Hugging Face tokenizers read with transformers' ids, Hub ids resolved through
snapshot_download (mocked: the Hub is unreachable here), offline mode, weights in pytorch_model.bin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SHAKESPEARE

from talm.errors import TalmError
from talm.tokenizer.api import Tokenizer
from talm.train import init

transformers = pytest.importorskip("transformers")

TEXT = "First Citizen:\nBefore we proceed 1234 further, hear me speak.  naïve café 🙂\n\nAll:\tSpeak!<|endoftext|>"


def hf_tokenizer(path: Path, style: str) -> Path:
    """A byte-level BPE tokenizer.json as GPT-2's (<|endoftext|> added last) or SmolLM's (its special tokens
    first, digits split one by one before the byte-level step)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if style == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    else:
        tok.pre_tokenizer, specials = byte_level, []
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator([SHAKESPEARE.read_text(encoding="utf-8")[:50_000]], trainer)
    if style == "gpt2":
        tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return path


@pytest.mark.parametrize("style", ["gpt2", "smollm"])
def test_foreign_tokenizers_give_the_ids_of_transformers(tmp_path: Path, style: str) -> None:
    path = hf_tokenizer(tmp_path / "tokenizer.json", style)
    ours = Tokenizer.from_file(path)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert ours.vocab_size == len(theirs) and ours.eot_id == theirs.convert_tokens_to_ids("<|endoftext|>")
    assert ours.eot_id == (0 if style == "smollm" else ours.vocab_size - 1)
    plain = TEXT.removesuffix("<|endoftext|>")
    assert ours.encode(plain) == theirs(plain)["input_ids"]
    assert ours.encode(TEXT, allow_special=True) == theirs(TEXT)["input_ids"]
    assert ours.encode(TEXT)[-1] != ours.eot_id  # the spelling is plain text unless allowed
    assert ours.decode(ours.encode(TEXT)) == TEXT
    batch = ours.encode_batch([plain, "1 2 3"])
    assert [b.tolist() for b in batch] == [theirs(plain)["input_ids"], theirs("1 2 3")["input_ids"]]


def llama_dir(path: Path, *, weights: str = "safetensors") -> Path:
    from conftest import BASE_TOKENIZER

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=Tokenizer.from_file(BASE_TOKENIZER).vocab_size, hidden_size=32, intermediate_size=48,
        num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64, head_dim=8,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)
    if weights == "bin":
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    (path / "tokenizer.json").write_bytes(BASE_TOKENIZER.read_bytes())
    return path


def test_a_hub_id_is_downloaded_with_snapshot_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    local = llama_dir(tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append((repo_id, kwargs))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(
        huggingface_hub.HfApi, "model_info", lambda self, repo_id, timeout: calls.append(timeout)
    )
    init.download.cache_clear()
    source = init.resolve_source("someone/tiny-llama")
    assert source.kind == "transformers" and source.path == local and source.config.n_layer == 1
    assert source.tokenizer_path == local / "tokenizer.json"
    timeout, (repo_id, kwargs), *more = calls
    assert timeout <= 10  # the Hub's reachability is checked within seconds
    assert repo_id == "someone/tiny-llama" and not more  # safetensors found: no pytorch_model.bin fetched
    assert kwargs["local_files_only"] is False
    assert (
        "model.safetensors" in kwargs["allow_patterns"]
        and "pytorch_model.bin" not in kwargs["allow_patterns"]
    )
    assert kwargs["etag_timeout"] <= 10
    init.resolve_source("someone/tiny-llama")
    assert len(calls) == 2  # once per process
    init.download.cache_clear()


def test_offline_mode_without_a_cached_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    init.download.cache_clear()
    with pytest.raises(TalmError, match="Hub is unreachable and 'someone/absent' is not in the local cache"):
        init.resolve_source("someone/absent")


def test_weights_in_pytorch_model_bin_load_without_executing_code(tmp_path: Path) -> None:
    local = llama_dir(tmp_path / "m", weights="bin")
    tensors = init.read_weights(local, "m")
    assert "model.embed_tokens.weight" in tensors
    (local / "pytorch_model.bin").write_bytes(b"not a zip")
    with pytest.raises(TalmError, match="cannot load .*pytorch_model.bin"):
        init.read_weights(local, "m")


def test_a_config_that_is_not_json(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(TalmError, match="cannot read .*config.json"):
        init.resolve_source(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text(json.dumps([1]))
    with pytest.raises(TalmError, match="is not a JSON object"):
        init.resolve_source(str(tmp_path / "m"))


def test_an_unreachable_hub_falls_back_to_the_local_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    local = llama_dir(tmp_path / "cached")
    asked = []

    def unreachable(self: object, repo_id: str, timeout: float) -> None:
        raise ConnectionError("Name or service not known")

    def cached_snapshot(repo_id: str, *, local_files_only: bool, **kwargs: object) -> str:
        asked.append(local_files_only)
        return str(local)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached_snapshot)
    init.download.cache_clear()
    assert init.resolve_source("someone/cached").path == local and asked == [True]
    init.download.cache_clear()
