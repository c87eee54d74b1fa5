"""Starting from pretrained weights, end to end through the console scripts: a GPT-2 and a Llama model built
locally with transformers (tiny, random) -> download_data with the source's tokenizer -> train_model
--init-from (samples during training) -> generate -> export_model -> transformers computes the same logits as
the source; a talm model directory as the source; --resume-from best; and every bad input in one line."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import BASE_TOKENIZER, SHAKESPEARE, one_line_error

from talm.cli import download_data, export_model, generate, train_model
from talm.model.gpt import GPT
from talm.tokenizer.api import Tokenizer
from talm.train import init
from talm.train.checkpoint import read_meta
from talm.train.metrics import read_metrics
from talm.use.load import load

transformers = pytest.importorskip("transformers")

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.  naïve café 🙂\n\nAll:\tSpeak, speak!"
# lr 1e-12: the weights stay the source's (to 1e-4), so the export is checked against the source's logits.
TRAIN = (
    "--device cpu --model.context_length 32 --batch-size 4 --max-steps 2 --eval-every 1 --eval-tokens 256 "
    "--save-every 2 --log-every 1 --optim.lr 1e-12 --optim.warmup_steps 0"
).split()


def gpt2_style_tokenizer(path: Path) -> Path:
    """A tokenizer.json as GPT-2's: byte-level BPE with GPT-2's own pre-tokenizer regex (ByteLevel's), and
    <|endoftext|> added after training as the last id."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([SHAKESPEARE.read_text(encoding="utf-8")[:50_000]], trainer)
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return path


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name or "ln_" in name else 0.0, 0.2 if p.dim() == 1 else 0.1)
    return model.eval()


def hf_model_dir(path: Path, family: str) -> tuple[Path, torch.nn.Module]:
    """A transformers model directory as the Hub holds them: config.json, model.safetensors, tokenizer.json."""
    torch.manual_seed(0)
    path.mkdir()
    if family == "gpt2":
        tokenizer = gpt2_style_tokenizer(path / "tokenizer.json")
        vocab = Tokenizer.from_file(tokenizer).vocab_size
        config = transformers.GPT2Config(
            vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=vocab - 1,
            eos_token_id=vocab - 1,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    else:
        shutil.copyfile(BASE_TOKENIZER, path / "tokenizer.json")
        config = transformers.LlamaConfig(
            vocab_size=Tokenizer.from_file(BASE_TOKENIZER).vocab_size, hidden_size=32, intermediate_size=48,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=False, head_dim=8,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    model = randomized(model)
    model.save_pretrained(path)
    return path, model


def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_import_train_generate_export(family: str, in_tmp: Path, tiny_data: Path, capsys) -> None:
    source, hf_model = hf_model_dir(in_tmp / "hf", family)
    if family == "gpt2":  # data made with the source's tokenizer, as the docs say
        Path("corpus.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
        download_data.main(
            ["mine", "--data-files", "corpus.txt", "--val-tokens", "600", "-t", "hf/tokenizer.json"]
        )
        data = "data/mine/default"
    else:
        data = str(tiny_data)  # made with tokenizers/base.json, the Llama source's tokenizer
    capsys.readouterr()
    args = [
        "-n",
        "ft",
        "-d",
        data,
        "--init-from",
        "hf",
        *TRAIN,
        "--sample-every",
        "1",
        "--train.sample_tokens",
        "6",
    ]
    train_model.main([*args, "--sample-prompt", "First", "--sample-prompt", ""])
    out, err = capsys.readouterr()
    assert "training models/ft from hf, a transformers model" in err
    assert out.strip().splitlines()[-1].startswith("done: 2 steps")
    assert "[step 1] 'First'\n  greedy:  " in err and "sampled: " in err
    evals = [r for r in read_metrics("models/ft") if "val_loss" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert [s["prompt"] for s in evals[0]["samples"]] == ["First", ""]
    assert all(isinstance(s["greedy"], str) and isinstance(s["sampled"], str) for s in evals[0]["samples"])
    saved = read_meta("models/ft/latest")["config"]
    assert saved["model"]["arch"] == family and saved["model"]["context_length"] == 32
    assert saved["train"]["init_from"] == "hf"
    # the tokenizer came with the source: same ids as transformers' tokenizer, copied into models/ft
    tok = Tokenizer.from_file("models/ft/tokenizer.json")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(source / "tokenizer.json"))
    assert tok.encode(TEXT) == hf_tok(TEXT)["input_ids"] and tok.decode(tok.encode(TEXT)) == TEXT

    generate.main(
        ["-m", "models/ft", "-p", "First", "--max-new-tokens", "5", "--seed", "0", "--device", "cpu"]
    )
    assert "First" in capsys.readouterr().out

    export_model.main(["-m", "models/ft", "-o", "exported"])
    exported = transformers.AutoModelForCausalLM.from_pretrained("exported", dtype=torch.float32).eval()
    assert type(exported) is type(hf_model)
    assert "trained from `hf` with talm" in Path("exported/README.md").read_text()
    ids = tok.encode(TEXT)[:30]
    assert transformers.AutoTokenizer.from_pretrained("exported")(TEXT)["input_ids"] == tok.encode(TEXT)
    torch.testing.assert_close(logits(exported, ids), logits(hf_model, ids), rtol=1e-4, atol=1e-4)
    # import -> export -> import: the export read back is the trained model, tensor for tensor
    again = init.resolve_source("exported")
    reread = GPT(again.config)
    reread.load_state_dict(init.source_state_dict(again, again.config))
    trained = load("models/ft", device="cpu")[0]
    assert again.config == trained.config
    for (name, a), b in zip(reread.state_dict().items(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    # Rerunning the command resumes the run: the checkpoint wins over --init-from, and the banner says so.
    train_model.main([*args, "--max-steps", "3"])
    err = capsys.readouterr().err
    assert "resuming models/ft from step 2" in err and "--init-from hf ignored" in err
    # --restart starts over from the source
    train_model.main([*args, "--max-steps", "1", "--restart"])
    assert (
        "training models/ft from hf" in capsys.readouterr().err and read_meta("models/ft/latest")["step"] == 1
    )


# A base run small enough to train in a second, for the tests that start from a talm model directory.
SMALL_BASE = [
    *TRAIN,
    "--model.n_layer",
    "1",
    "--model.d_model",
    "32",
    "--model.n_head",
    "2",
    "--optim.lr",
    "1e-2",
]


def test_a_talm_model_directory_as_the_source(in_tmp: Path, tiny_data: Path, capsys) -> None:
    train_model.main(["-n", "base", "-d", str(tiny_data), *SMALL_BASE])
    capsys.readouterr()
    for source in ("models/base", "models/base/best"):
        name = source.replace("/", "-")
        train_model.main(["-n", name, "-d", str(tiny_data), "--init-from", source, *TRAIN])
        assert f"from {source}" in capsys.readouterr().err
        assert read_meta(f"models/{name}/latest")["config"]["model"]["n_layer"] == 1  # the source's
    from safetensors.torch import load_file

    ours, theirs = (
        load_file("models/models-base/latest/model.safetensors"),
        load_file("models/base/latest/model.safetensors"),
    )
    for k, v in theirs.items():
        torch.testing.assert_close(ours[k], v, rtol=1e-4, atol=1e-4)


def test_resume_from_best_rewinds_the_run(in_tmp: Path, tiny_data: Path, capsys) -> None:
    train_model.main(["-n", "r", "-d", str(tiny_data), *SMALL_BASE, "--max-steps", "1"])
    shutil.copytree("models/r/best", "best-at-1")
    train_model.main(["-n", "r", "-d", str(tiny_data), *SMALL_BASE, "--max-steps", "3"])
    shutil.rmtree("models/r/best")
    shutil.copytree("best-at-1", "models/r/best")  # as if step 1 had scored best
    capsys.readouterr()
    train_model.main(
        ["-n", "r", "-d", str(tiny_data), *SMALL_BASE, "--max-steps", "3", "--resume-from", "best"]
    )
    err = capsys.readouterr().err
    assert "resuming from models/r/best (step 1), the best checkpoint, as asked" in err
    assert "resuming models/r from step 1" in err
    steps = [r["step"] for r in read_metrics("models/r") if "train_loss" in r]
    assert steps == [1, 2, 3]  # the records after step 1 were dropped, then written again
    assert read_meta("models/r/latest")["step"] == 3


def test_an_unreachable_hub_is_reported_within_seconds(
    in_tmp: Path, tiny_data: Path, capsys, monkeypatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    err = one_line_error(
        capsys, train_model.main, "-n", "x", "-d", str(tiny_data), "--init-from", "someone/tiny"
    )
    assert time.perf_counter() - start < 10
    assert "Hugging Face Hub is unreachable and 'someone/tiny' is not in the local cache" in err
    assert "hf download someone/tiny --local-dir DIR" in err and not Path("models/x").exists()


def config_dir(path: Path, config: dict) -> str:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


BAD = {
    "not a model": (
        lambda d: str(Path(d).mkdir() or d),
        "holds no model (no checkpoint.json nor config.json)",
    ),
    "a missing directory": (lambda d: "./nowhere", "no such directory: pass a talm model directory"),
    "mistral": (
        lambda d: config_dir(
            Path(d), transformers.MistralConfig(architectures=["MistralForCausalLM"]).to_dict()
        ),
        "is a MistralForCausalLM, which talm cannot load: supported are LlamaForCausalLM, Qwen3ForCausalLM",
    ),
    "bert": (
        lambda d: config_dir(Path(d), {"architectures": ["BertModel"], "model_type": "bert"}),
        "is a BertModel, which talm cannot load: supported are",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_a_source_talm_cannot_use_is_refused(case: str, in_tmp: Path, tiny_data: Path, capsys) -> None:
    make, message = BAD[case]
    source = make("src")
    err = one_line_error(
        capsys, train_model.main, "-n", "x", "-d", str(tiny_data), "--init-from", source, *TRAIN
    )
    assert message in err and not Path("models/x").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model.n_layer", "3"], "--model.n_layer 3 contradicts --init-from 'hf' (model.n_layer=2)"),
        (["--model.context_length", "128"], "or lower it: a shorter context is allowed"),
        (["--preset", "tiny"], "contradicts --init-from 'hf'"),
        (["--restart", "--resume-from", "best"], "--resume-from best and --restart contradict each other"),
        (["--resume-from", "best"], "'models/x' has no resumable best checkpoint"),
    ],
)
def test_flags_contradicting_the_source_are_refused(
    flags, message, in_tmp: Path, tiny_data: Path, capsys
) -> None:
    hf_model_dir(in_tmp / "hf", "llama")
    capsys.readouterr()  # transformers' own progress bar
    args = ["-n", "x", "-d", str(tiny_data), "--init-from", "hf", "--device", "cpu", *flags]
    err = one_line_error(capsys, train_model.main, *args)
    assert message in err and not Path("models/x").exists()


def test_data_made_with_another_tokenizer_is_refused(in_tmp: Path, tiny_data: Path, capsys) -> None:
    hf_model_dir(in_tmp / "hf", "gpt2")
    capsys.readouterr()  # transformers' own progress bar
    err = one_line_error(
        capsys, train_model.main, "-n", "x", "-d", str(tiny_data), "--init-from", "hf", *TRAIN
    )
    assert "was made with tokenizer" in err and "not with the one of --init-from 'hf'" in err
    assert "download_data ... -t hf/tokenizer.json" in err and not Path("models/x").exists()


LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_hidden_layers": 0}, "'num_hidden_layers' is 0, not a positive integer"),
        ({"num_hidden_layers": -2}, "'num_hidden_layers' is -2, not a positive integer"),
        ({"num_hidden_layers": "2"}, "'num_hidden_layers' is \"2\", not a positive integer"),
        ({"num_attention_heads": 0}, "'num_attention_heads' is 0, not a positive integer"),
        ({"rms_norm_eps": "small"}, "'rms_norm_eps' is \"small\", not a number"),
        ({"tie_word_embeddings": "yes"}, "'tie_word_embeddings' is \"yes\", not true or false"),
        ({"rope_parameters": "x"}, "'rope_parameters' is \"x\", not an object"),
        ({"hidden_size": None}, "has no 'hidden_size'"),
        ({"rms_norm_eps": 0}, "'rms_norm_eps'=0: Input should be greater than 0"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3 does not divide num_attention_heads=4"),
    ],
)
def test_a_config_json_value_of_the_wrong_type_or_range_names_the_file_and_key(
    change: dict, message: str, in_tmp: Path, tiny_data: Path, capsys
) -> None:
    source = config_dir(Path("src"), LLAMA_CONFIG | change)
    err = one_line_error(
        capsys, train_model.main, "-n", "x", "-d", str(tiny_data), "--init-from", source, *TRAIN
    )
    assert f"--init-from 'src' ({Path('src/config.json')})" in err and message in err, err
    assert "pydantic" not in err and "http" not in err and "--model." not in err
    assert not Path("models/x").exists()


def test_a_talm_source_with_a_bad_model_setting_names_its_checkpoint(
    in_tmp: Path, tiny_model_dir: Path, tiny_data: Path, capsys
) -> None:
    meta_file = tiny_model_dir / "latest" / "checkpoint.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["model"]["n_layer"] = 0
    meta_file.write_text(json.dumps(meta))
    err = one_line_error(
        capsys, train_model.main, "-n", "x", "-d", str(tiny_data), "--init-from", str(tiny_model_dir), *TRAIN
    )
    assert "checkpoint.json's model.n_layer=0" in err and "--model.n_layer" not in err, err


@pytest.mark.parametrize("with_t", [False, True])
def test_a_source_vocabulary_smaller_than_its_tokenizer_says_where_each_came_from(
    with_t: bool, in_tmp: Path, tiny_data: Path, capsys
) -> None:
    vocab = Tokenizer.from_file(BASE_TOKENIZER).vocab_size
    source = config_dir(Path("src"), LLAMA_CONFIG | {"vocab_size": vocab - 10})
    shutil.copyfile(BASE_TOKENIZER, Path(source) / "tokenizer.json")  # the data's tokenizer: its check passes
    t = ["-t", str(BASE_TOKENIZER)] if with_t else []
    err = one_line_error(
        capsys, train_model.main, "-n", "x", "-d", str(tiny_data), "--init-from", source, *t, *TRAIN
    )
    assert f"--init-from 'src' has a vocabulary of {vocab - 10} ids (vocab_size in " in err, err
    assert "config.json" in err and f"fewer than the {vocab} of tokenizer" in err
    assert ("(-t)" in err) == with_t and ("manifest" in err) != with_t
    assert "--model.vocab_size" not in err and "pass another --init-from" in err
    assert not Path("models/x").exists()
