"""`export_model` end to end, with the Hub mocked (and unreachable)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import one_line_error

from talm.cli.export_model import main


def fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run export_model expecting a user error: exit status 2, the error as one line (the last on stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: " in last, last
    return last


class FakeHfApi:
    calls: list[tuple[str, object]] = []

    def __init__(self, token: str | None = None) -> None:
        FakeHfApi.calls.append(("init", token))

    def create_repo(self, repo_id: str, **kwargs) -> str:
        FakeHfApi.calls.append(("create_repo", (repo_id, kwargs["private"])))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs) -> None:
        FakeHfApi.calls.append(
            (
                "upload_folder",
                (kwargs["repo_id"], sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())),
            )
        )


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> type[FakeHfApi]:
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    return FakeHfApi


def test_export_then_refuse_then_overwrite(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "exports" / "tiny"
    main(["-m", str(tiny_model_dir), "-o", str(out)])
    assert "exported" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 1024
    before = (out / "model.safetensors").read_bytes()
    assert "already exists: pass --overwrite" in fails(capsys, "-m", str(tiny_model_dir), "-o", str(out))
    assert (out / "model.safetensors").read_bytes() == before
    main(
        [
            "-m",
            str(tiny_model_dir),
            "-o",
            str(out),
            "--overwrite",
            "--checkpoint",
            "best",
            "--dtype",
            "bfloat16",
        ]
    )
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_push_to_hub(tiny_model_dir: Path, tmp_path: Path, fake_hub: type[FakeHfApi], capsys) -> None:
    out = tmp_path / "export"
    main(["-m", str(tiny_model_dir), "-o", str(out), "--push-to-hub", "me/tiny", "--private"])
    err = capsys.readouterr().err
    assert "pushed" in err and "https://huggingface.co/me/tiny" in err
    assert fake_hub.calls[0] == ("init", "hf_from_env")
    assert fake_hub.calls[1] == ("create_repo", ("me/tiny", True))
    assert fake_hub.calls[2][0] == "upload_folder" and fake_hub.calls[2][1][0] == "me/tiny"
    assert "model.safetensors" in fake_hub.calls[2][1][1] and "tokenizer.json" in fake_hub.calls[2][1][1]


def test_push_refusals_come_before_any_work(
    tiny_model_dir: Path, tmp_path: Path, fake_hub, monkeypatch, capsys
) -> None:
    out = tmp_path / "export"
    m = str(tiny_model_dir)
    assert "--private only applies to --push-to-hub" in fails(capsys, "-m", m, "-o", str(out), "--private")
    assert "not a valid repo id" in fails(capsys, "-m", m, "-o", str(out), "--push-to-hub", "a b/c")
    monkeypatch.delenv("HF_TOKEN")
    assert "no Hugging Face token found" in fails(capsys, "-m", m, "-o", str(out), "--push-to-hub", "me/tiny")
    assert not out.exists() and fake_hub.calls == []


def test_push_without_network(tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    out = tmp_path / "export"
    err = fails(capsys, "-m", str(tiny_model_dir), "-o", str(out), "--push-to-hub", "me/tiny")
    assert "Hugging Face Hub is unreachable" in err and "push it later" in err
    assert (out / "model.safetensors").is_file()  # the export itself is complete


def test_bad_model_dir(in_tmp: Path, capsys) -> None:
    (in_tmp / "models" / "empty").mkdir(parents=True)
    assert "holds no checkpoint" in fails(capsys, "-m", "models/empty", "-o", "out")
    assert not (in_tmp / "out").exists()


def listing(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a directory): what 'nothing changed' compares."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(
    ("output", "flags", "message"),
    [
        ("afile/sub", [], "'afile' is a file, not a directory: move it away or choose another -o/--output"),
        ("afile", [], "'afile' exists and is not a directory: choose another -o/--output"),
        ("/proc/x", [], "cannot write to '/proc'"),
        ("/proc/x", ["--overwrite"], "cannot write to '/proc'"),
        ("models/tiny", ["--overwrite"], "would replace the model being exported"),
        ("models", ["--overwrite"], "would replace the model being exported"),
        ("mine", ["--overwrite"], "'mine' is not an earlier export"),
        ("mine", [], "'mine' already exists: pass --overwrite"),
    ],
)
def test_an_output_that_cannot_or_must_not_be_written_is_refused_before_any_work(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys,
    output: str,
    flags: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    before = listing(tmp_path)
    assert message in fails(capsys, "-m", "models/tiny", "-o", output, *flags)
    assert listing(tmp_path) == before


def test_a_model_with_more_ids_than_its_tokenizer_exports_and_loads_in_transformers(
    tmp_path: Path, capsys
) -> None:
    """Training allows model.vocab_size above the tokenizer's: export_model keeps the model's size, the HF
    tokenizer keeps its own, and transformers computes the same logits."""
    import torch
    from test_generate import EXTRA_IDS, write_padded_model

    transformers = pytest.importorskip("transformers")
    from talm.use.load import load

    model_dir = write_padded_model(tmp_path / "models" / "padded")
    out = tmp_path / "export"
    main(["-m", str(model_dir), "-o", str(out)])
    assert "exported" in capsys.readouterr().err
    model, tok = load(model_dir, device="cpu")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_model.config.vocab_size == tok.vocab_size + EXTRA_IDS and len(hf_tok) == tok.vocab_size
    ids = tok.encode("First Citizen:\nBefore we proceed any further, hear me speak.")
    assert hf_tok("First Citizen:\nBefore we proceed any further, hear me speak.")["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(x)[0], hf_model(x).logits
    assert ours.shape == theirs.shape == (1, len(ids), tok.vocab_size + EXTRA_IDS)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def rebuild_with(model_dir: Path, **options: object) -> Path:
    """Rewrite the tiny model's checkpoints (latest/ and best/) as a GPT with architecture `options`."""
    import torch

    from talm.model.config import ModelConfig
    from talm.model.gpt import GPT
    from talm.train.checkpoint import save_checkpoint

    for which in ("latest", "best"):
        meta = json.loads((model_dir / which / "checkpoint.json").read_text())
        config = ModelConfig(**(meta["config"]["model"] | options))
        meta["config"]["model"] = config.model_dump(mode="json")
        torch.manual_seed(0)
        save_checkpoint(model_dir / which, GPT(config), meta)
    return model_dir


def test_a_soft_capped_model_is_refused_in_one_line_and_nothing_is_written(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    rebuild_with(tiny_model_dir, logit_softcap=15.0)
    before = listing(tmp_path)
    err = one_line_error(capsys, main, "-m", str(tiny_model_dir), "-o", str(tmp_path / "export"))
    assert "model.logit_softcap=15.0 cannot be expressed in the Llama format" in err
    assert listing(tmp_path) == before


@pytest.mark.parametrize(
    ("options", "architecture"),
    [
        ({"qk_norm": True}, "Qwen3"),
        ({"mlp": "relu2"}, "Arcee"),
        ({"qk_norm": True, "mlp": "relu2"}, "Apertus"),
    ],
)
def test_options_llama_lacks_export_to_the_transformers_model_that_has_them(
    tiny_model_dir: Path, tmp_path: Path, capsys, options: dict, architecture: str
) -> None:
    rebuild_with(tiny_model_dir, zero_init_proj=True, **options)
    main(["-m", str(tiny_model_dir), "-o", str(tmp_path / "export")])
    assert "exported" in capsys.readouterr().err
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == [f"{architecture}ForCausalLM"]
    assert config["model_type"] == architecture.lower()
    assert config["hidden_act"] == ("relu2" if options.get("mlp") else "silu")
    assert f"exported to the {architecture} format" in (tmp_path / "export" / "README.md").read_text()
