"""`generate` end to end: prompts, samples, the interactive loop through stdin, and every bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ORIGINAL_TOKENIZER

from talm.cli.generate import SEPARATOR, main
from talm.sample import generate_ids, load


def generate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, str]:
    main(list(args))
    captured = capsys.readouterr()
    return captured.out, captured.err


def fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run generate expecting a user error: exit status 2 and one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error: " in err, err
    return err


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
    out, _ = generate(
        capsys, "-m", str(tiny_model_dir), "--checkpoint", "best", "-p", "", "--max-new-tokens", "4"
    )
    assert out.endswith("\n")


def test_a_long_prompt_is_cut_with_a_notice(tiny_model_dir: Path, capsys) -> None:
    out, err = generate(capsys, "-m", str(tiny_model_dir), "-p", "word " * 100, "--max-new-tokens", "3")
    assert "longer than the model's context of 64" in err
    assert out.startswith("word word")


def run_interactive(model_dir: Path, stdin: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("generate")
    return subprocess.run(
        [str(script), "-m", str(model_dir), "--max-new-tokens", "5", "--seed", "0"],
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
        (["--top-p", "0"], "--top-p='0': Input should be greater than 0"),
        (["--top-p", "1.01"], "--top-p='1.01': Input should be less than or equal to 1"),
        (["--temperature", "-0.5"], "--temperature='-0.5': Input should be greater than or equal to 0"),
        (["--top-k", "0"], "--top-k='0'"),
        (["--max-new-tokens", "0"], "--max-new-tokens='0'"),
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
