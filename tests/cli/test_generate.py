"""`generate` end to end: prompts, samples, the interactive loop through stdin, and every bad input."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BASE_TOKENIZER, ORIGINAL_TOKENIZER, one_line_error, save_model_dir

from talm.cli.generate import SEPARATOR, main
from talm.use.load import load
from talm.use.sample import generate_ids

EXTRA_IDS = 40  # ids the model knows beyond its tokenizer's


def write_padded_model(model_dir: Path) -> Path:
    """A checkpoint (layout of train_model) whose model.vocab_size is its tokenizer's + EXTRA_IDS, as training
    allows, with an output layer that makes those extra ids the likeliest: generating must never pick them."""
    from talm.model.config import ModelConfig
    from talm.model.gpt import GPT
    from talm.tokenizer.api import Tokenizer

    tokenizer = Tokenizer.from_file(BASE_TOKENIZER)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size + EXTRA_IDS,
        context_length=64,
        n_layer=2,
        n_head=4,
        d_model=64,
        tie_embeddings=False,
    )
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():  # extra id 2k scores +50 x_k, 2k+1 scores -50 x_k: one of them beats every real id
        extra = model.lm_head.weight[tokenizer.vocab_size : config.vocab_size]
        extra.zero_()
        for k in range(EXTRA_IDS // 2):
            extra[2 * k, k], extra[2 * k + 1, k] = 50.0, -50.0
    return save_model_dir(model_dir, model, step=1)


def generate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, str]:
    main(list(args))
    captured = capsys.readouterr()
    return captured.out, captured.err


def fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    return one_line_error(capsys, main, *args)


def test_prompts_and_samples(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = str(tiny_model_dir)
    out, err = generate(
        capsys, "-m", m, "-p", "Hello", "-p", "The king", "-n", "2", "--max-new-tokens", "8", "-s", "3"
    )
    samples = out.split(SEPARATOR + "\n")
    assert len(samples) == 4
    assert [s[:5] for s in samples] == ["Hello", "Hello", "The k", "The k"]
    assert "generated" in err and "tokens/s" in err
    again, _ = generate(
        capsys, "-m", m, "-p", "Hello", "-p", "The king", "-n", "2", "--max-new-tokens", "8", "-s", "3"
    )
    assert again == out  # seeded


def test_greedy_output_is_the_model_greedy_continuation(tiny_model_dir: Path, capsys) -> None:
    out, _ = generate(
        capsys, "-m", str(tiny_model_dir), "-p", "ROMEO:", "--temperature", "0", "--max-new-tokens", "12"
    )
    model, tok = load(tiny_model_dir)
    ids = [
        s[0]
        for s in generate_ids(
            model, [tok.encode("ROMEO:")], max_new_tokens=12, temperature=0.0, eot_id=tok.eot_id
        )
    ]
    ids = [i for i in ids if i != tok.eot_id]
    assert out == "ROMEO:" + tok.decode(ids) + "\n"


def test_empty_prompt_and_best_checkpoint(tiny_model_dir: Path, capsys) -> None:
    """An empty prompt starts a new document: the text is the model's seeded continuation of <|endoftext|>,
    from the best checkpoint (latest is broken here, so loading it would fail)."""
    (tiny_model_dir / "latest" / "model.safetensors").write_bytes(b"not the one used")
    out, err = generate(
        capsys, "-m", str(tiny_model_dir), "--checkpoint", "best", "-p", "", "--max-new-tokens", "6",
        "--temperature", "1", "-s", "5",
    )  # fmt: skip
    model, tok = load(tiny_model_dir, checkpoint="best")
    ids = [
        s[0]
        for s in generate_ids(
            model, [[tok.eot_id]], max_new_tokens=6, temperature=1.0, seed=5, eot_id=tok.eot_id
        )
    ]
    text = tok.decode(ids[: ids.index(tok.eot_id)] if tok.eot_id in ids else ids)
    assert text and out == text + "\n"
    assert f"generated {len(ids)} tokens" in err


def test_the_requested_number_of_tokens_and_the_seed(tiny_model_dir: Path, capsys) -> None:
    m = str(tiny_model_dir)
    a, err = generate(
        capsys, "-m", m, "-p", "Hello", "--max-new-tokens", "9", "-s", "1", "--temperature", "2"
    )
    assert a.startswith("Hello") and "generated 9 tokens" in err
    b, _ = generate(capsys, "-m", m, "-p", "Hello", "--max-new-tokens", "9", "-s", "2", "--temperature", "2")
    assert a != b  # another seed, another text (at temperature 2 over 1024 ids)
    again, _ = generate(
        capsys, "-m", m, "-p", "Hello", "--max-new-tokens", "9", "-s", "1", "--temperature", "2"
    )
    assert again == a


def test_a_model_with_more_ids_than_its_tokenizer_generates(tmp_path: Path, capsys) -> None:
    """Training allows model.vocab_size above the tokenizer's; generate loads such a model and never picks an
    id the tokenizer cannot decode, even when the model scores those highest."""
    model_dir = write_padded_model(tmp_path / "models" / "padded")
    model, tok = load(model_dir)
    assert model.config.vocab_size == tok.vocab_size + EXTRA_IDS
    raw = [s[0] for s in generate_ids(model, [tok.encode("Hello")], max_new_tokens=5, temperature=0.0)]
    assert all(i >= tok.vocab_size for i in raw)  # unlimited, the model picks only the extra ids
    out, err = generate(
        capsys, "-m", str(model_dir), "-p", "Hello", "--max-new-tokens", "5", "--temperature", "0"
    )
    limited = [
        s[0]
        for s in generate_ids(
            model, [tok.encode("Hello")], max_new_tokens=5, temperature=0.0, vocab_size=tok.vocab_size
        )
    ]
    assert all(i < tok.vocab_size for i in limited)
    assert out == "Hello" + tok.decode([i for i in limited if i != tok.eot_id]) + "\n"
    out, _ = generate(capsys, "-m", str(model_dir), "-p", "Hello", "--max-new-tokens", "20", "-s", "0")
    assert out.startswith("Hello")  # sampling (temperature 0.8) too


def test_a_long_prompt_is_cut_with_a_notice(tiny_model_dir: Path, capsys) -> None:
    out, err = generate(capsys, "-m", str(tiny_model_dir), "-p", "word " * 100, "--max-new-tokens", "3")
    assert "longer than the model's context of 64" in err
    assert out.startswith("word word")


def run_interactive(model_dir: Path, stdin: str, *flags: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("generate")
    return subprocess.run(
        [str(script), "-m", str(model_dir), "--max-new-tokens", "5", "--seed", "0", *flags],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_interactive_loop_through_stdin(tiny_model_dir: Path) -> None:
    done = run_interactive(tiny_model_dir, "Hello there\nOnce upon\n\nnever read\n")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("> ") == 3  # two prompts, then the empty line that ends the loop
    assert "an empty line or Ctrl-D ends" in done.stderr and "generated" in done.stderr
    assert "never read" not in done.stdout and "Hello there" not in done.stdout  # prompts are not echoed
    at_eof = run_interactive(tiny_model_dir, "Hello there\n")  # Ctrl-D: end of input
    assert at_eof.returncode == 0 and at_eof.stderr.count("> ") == 2
    assert at_eof.stdout.splitlines()[0] == done.stdout.splitlines()[0]  # same seed, same first answer


@pytest.mark.slow
def test_interactive_loop_goes_on_after_a_prompt_of_only_special_tokens(tiny_model_dir: Path) -> None:
    """A refused prompt is said in one line and the loop asks for the next one (it used to end in a
    traceback): with and without --allow-special."""
    plain = run_interactive(tiny_model_dir, "<|endoftext|>\nHello there\n")
    assert plain.returncode == 0, plain.stderr
    assert "Traceback" not in plain.stderr
    assert plain.stderr.count("error: prompt '<|endoftext|>' is only special-token spellings") == 1
    assert plain.stderr.count("> ") == 3 and "generated" in plain.stderr
    alone = run_interactive(tiny_model_dir, "Hello there\n")
    assert plain.stdout == alone.stdout and plain.stdout.strip()  # the answer to "Hello there", as alone
    special = run_interactive(tiny_model_dir, "<|user|>\nHello there\n", "--allow-special")
    assert special.returncode == 0 and "Traceback" not in special.stderr, special.stderr
    assert "nothing to continue" in special.stderr and special.stdout == alone.stdout


def test_model_dir_without_checkpoint(in_tmp: Path, capsys) -> None:
    (in_tmp / "models" / "empty").mkdir(parents=True)
    assert "holds no checkpoint" in fails(capsys, "-m", "models/empty", "-p", "x")
    assert "not found" in fails(capsys, "-m", "models/missing", "-p", "x")
    assert "no best checkpoint" in fails(capsys, "-m", "models/empty", "--checkpoint", "best", "-p", "x")


def test_tokenizer_missing_or_another(tiny_model_dir: Path, capsys) -> None:
    m = str(tiny_model_dir)
    shutil.copyfile(ORIGINAL_TOKENIZER, tiny_model_dir / "tokenizer.json")
    assert "is not the one the checkpoint was trained with" in fails(capsys, "-m", m, "-p", "x")
    (tiny_model_dir / "tokenizer.json").unlink()
    assert "is missing" in fails(capsys, "-m", m, "-p", "x")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--top-p", "0"], "--top-p=0.0: Input should be greater than 0"),
        (["--top-p", "1.01"], "--top-p=1.01: Input should be less than or equal to 1"),
        (["--temperature", "inf"], "finite"),
        (["--top-p", "nan"], "finite"),
        (["--temperature", "-0.5"], "--temperature=-0.5: Input should be greater than or equal to 0"),
        (["--top-k", "0"], "--top-k=0"),
        (["--max-new-tokens", "0"], "--max-new-tokens=0"),
        (["-p", "<|endoftext|>"], "--allow-special"),
        (["-p", "<|user|>", "--allow-special"], "nothing to continue"),
        (["--checkpoint", "no/such/dir", "-p", "x"], "not a checkpoint directory"),
    ],
)
def test_bad_input(tiny_model_dir: Path, capsys, flags: list[str], message: str) -> None:
    args = ["-m", str(tiny_model_dir), *flags]
    if "-p" not in flags:
        args += ["-p", "x"]
    assert message in fails(capsys, *args)


def test_missing_device(tiny_model_dir: Path, capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert "no CUDA GPU" in fails(capsys, "-m", str(tiny_model_dir), "--device", "cuda", "-p", "x")


def shell(command: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`command` run by bash with the console scripts of this Python on its PATH: a shell can close streams."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    return subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": path, **env},
    )


@pytest.mark.parametrize(
    ("streams", "message"),
    [
        ("-p Hi >&-", "stdout is closed: generate writes the text there; run it with stdout open"),
        ("<&-", "stdin is closed: without -p/--prompt, generate reads prompts from it: pass -p TEXT"),
    ],
)
def test_a_closed_stream_is_refused_in_one_line(tiny_model_dir: Path, streams: str, message: str) -> None:
    done = shell(f"generate -m {tiny_model_dir} --max-new-tokens 2 {streams}")
    assert done.returncode == 2 and done.stderr.strip().startswith(f"generate: error: {message}"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_prompts_need_no_stdin_and_a_reader_that_leaves_ends_generate_quietly(tiny_model_dir: Path) -> None:
    done = shell(f"generate -m {tiny_model_dir} -p Hi --max-new-tokens 2 <&-")
    assert done.returncode == 0 and done.stdout.startswith("Hi"), done.stderr
    done = shell(
        f"generate -m {tiny_model_dir} -p Hi -n 8 --max-new-tokens 500 -s 0 | head -c 1; exit ${{PIPESTATUS[0]}}"
    )
    assert done.returncode == 0 and done.stdout == "H" and "Error" not in done.stderr, done.stderr


def test_the_summary_says_why_generation_stopped(tiny_model_dir: Path, capsys) -> None:
    out, err = generate(
        capsys, "-m", str(tiny_model_dir), "-p", "Hi", "--max-new-tokens", "3", "-n", "2", "-s", "0"
    )
    summary = err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"generated 6 tokens in [\d.]+ s \([\d,]+ tokens/s\) on cpu with \d+ thread\(s\); stopped at: --max-new-tokens \(2\)",
        summary,
    )
