"""`train_tokenizer` end to end, through the installed console script, in a temporary directory."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, SHAKESPEARE

from talm.tokenizer.api import Tokenizer

SCRIPT = Path(sys.executable).parent / "train_tokenizer"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_user_error(result: subprocess.CompletedProcess[str], pattern: str) -> None:
    """Exit status 2 and exactly one line on stderr, naming the problem: no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("train_tokenizer: error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture
def workdir(in_tmp: Path) -> Path:
    """A project-like directory: the shipped text, no tokenizers/ yet."""
    shutil.copy(SHAKESPEARE, in_tmp / "tiny-shakespeare.txt")
    return in_tmp


def written(workdir: Path) -> list[str]:
    folder = workdir / "tokenizers"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_trains_and_writes_the_tokenizer(workdir: Path) -> None:
    result = run("-vs", "1000", "-n", "tok", cwd=workdir)
    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()
    assert len(summary) == 1
    assert re.fullmatch(
        r"wrote tokenizers/tok\.json: vocab 1000 \(4 special\), 1\.1 MB in [\d.]+ s \([\d.]+ MB/s\), "
        r"[\d.]+ bytes/token on the training text",
        summary[0],
    ), summary[0]
    tok = Tokenizer.from_file(workdir / "tokenizers" / "tok.json")
    assert tok.vocab_size == 1000 and tok.eot_id == 996 and tok.name == "tok"
    assert tok.decode(tok.encode("O Romeo, Romeo! 😀")) == "O Romeo, Romeo! 😀"
    assert written(workdir) == ["tok.json"]


def test_same_input_same_file(workdir: Path) -> None:
    assert run("-vs", "700", "-n", "a", cwd=workdir).returncode == 0
    assert (
        run(
            "--vocab-size", "700", "--name", "b", "--text-file", "tiny-shakespeare.txt", cwd=workdir
        ).returncode
        == 0
    )
    assert (workdir / "tokenizers/a.json").read_bytes() == (workdir / "tokenizers/b.json").read_bytes()
    tok = Tokenizer.from_file(workdir / "tokenizers/a.json")
    assert tok.vocab_size == 700  # as asked, the 4 special tokens included
    text = (workdir / "tiny-shakespeare.txt").read_text(encoding="utf-8")[:20_000] + " Zwölf 😀 <|endoftext|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < 696  # special spellings are ordinary text
    assert len(ids) < len(text.encode("utf-8")) / 2  # it learned merges: not one token per byte


def test_several_files_and_force(workdir: Path) -> None:
    (workdir / "more.txt").write_text("Zwölf Boxkämpfer jagen Viktor\n" * 20_000)
    assert run("-vs", "500", "-n", "t", cwd=workdir).returncode == 0
    before = (workdir / "tokenizers/t.json").read_bytes()
    result = run("-vs", "500", "-n", "t", "--text-file", "tiny-shakespeare.txt", "more.txt", cwd=workdir)
    assert_user_error(result, r"already exists.*--force")
    assert (workdir / "tokenizers/t.json").read_bytes() == before
    result = run(
        "-vs", "500", "-n", "t", "--text-file", "tiny-shakespeare.txt", "more.txt", "--force", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    tok = Tokenizer.from_file(workdir / "tokenizers/t.json")
    assert (workdir / "tokenizers/t.json").read_bytes() != before
    assert len(tok.encode(" Boxkämpfer")) <= 3  # learned from the second file
    assert written(workdir) == ["t.json"]


def test_help_documents_the_flags(workdir: Path) -> None:
    result = run("--help", cwd=workdir)
    assert result.returncode == 0
    for text in [
        "-vs VOCAB_SIZE",
        "--vocab-size",
        "-n NAME",
        "--text-file",
        "--force",
        "tiny-shakespeare.txt",
    ]:
        assert text in result.stdout
    assert "PydanticUndefined" not in result.stdout


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["-vs", "1000", "-n", "t", "--text-file", "missing.txt"], r"'missing.txt' not found"),
        (["-vs", "1000", "-n", "t", "--text-file", "adir"], r"'adir' is a directory"),
        (["-vs", "1000", "-n", "t", "--text-file", "empty.txt"], r"'empty.txt' is empty"),
        (
            ["-vs", "1000", "-n", "t", "--text-file", "latin1.txt"],
            r"'latin1.txt' is not UTF-8.*byte offset 13 \(line 2\)",
        ),
        (
            ["-vs", "259", "-n", "t"],
            r"-vs/--vocab-size=259: must be at least 260 \(256 byte tokens \+ 4 special tokens\)",
        ),
        (["-vs", "1000000000000", "-n", "t"], r"-vs/--vocab-size=1000000000000: must be at most 1048576"),
        (["-vs", "many", "-n", "t"], "argument -vs/--vocab-size: 'many' is not a whole number"),
        (["-vs", "1000", "-n", "a/b"], r"-n/--name='a/b': .*path separator"),
        (["-vs", "1000", "-n", "..\\x"], r"-n/--name=.*path separator"),
        (["-vs", "1000", "-n", ""], r"-n/--name='': the name is empty"),
        (["-vs", "1000", "-n", "tok.json"], r"drop the .json suffix"),
        (["-vs", "1000"], r"-n/--name: Field required"),
        (["-n", "t"], r"-vs/--vocab-size: Field required"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(workdir: Path, args: list[str], pattern: str) -> None:
    (workdir / "adir").mkdir()
    (workdir / "empty.txt").write_text("")
    (workdir / "latin1.txt").write_bytes(b"first line\nab\xe9cd\n")
    assert_user_error(run(*args, cwd=workdir), pattern)
    assert written(workdir) == []


def test_missing_default_file_says_which(in_tmp: Path) -> None:
    assert_user_error(run("-vs", "1000", "-n", "t", cwd=in_tmp), r"'tiny-shakespeare.txt' not found")


def test_unwritable_tokenizers_dir(workdir: Path) -> None:
    (workdir / "tokenizers").write_text("a file where the directory should be")
    assert_user_error(
        run("-vs", "1000", "-n", "t", cwd=workdir), r"'tokenizers' is a file, not a directory: move it away"
    )
    assert (workdir / "tokenizers").read_text() == "a file where the directory should be"
    (workdir / "tokenizers").unlink()
    (workdir / "tokenizers").mkdir()
    (workdir / "tokenizers" / "t.json").mkdir()
    assert_user_error(run("-vs", "1000", "-n", "t", "--force", cwd=workdir), r"is a directory")


def test_unwritable_working_directory(workdir: Path) -> None:
    """Root writes through permission bits, so this uses a place nobody can create files in: /proc."""
    text = str(workdir / "tiny-shakespeare.txt")
    result = run("-vs", "1000", "-n", "t", "--text-file", text, cwd=Path("/proc"))
    assert_user_error(
        result, r"cannot write to 'tokenizers' \(.*\): .*run train_tokenizer from another directory"
    )
    assert not Path("/proc/tokenizers").exists()


def test_starts_without_torch_or_datasets(workdir: Path) -> None:
    code = (
        "import sys\n"
        "from talm.cli import train_tokenizer\n"
        "try:\n"
        "    train_tokenizer.main(['-vs', '300', '-n', 'imports'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'datasets', 'transformers', 'pyarrow'})\n"
        "print(heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert written(workdir) == ["imports.json"]


def test_ctrl_c_leaves_no_partial_file(workdir: Path) -> None:
    big = workdir / "big.txt"
    text = SHAKESPEARE.read_bytes()
    with open(big, "wb") as f:
        for i in range(60):  # ~67 MB: many seconds of training on this machine
            f.write(text.replace(b"the", b"th%d" % i))
    proc = subprocess.Popen(
        [str(SCRIPT), "-vs", "4096", "-n", "big", "--text-file", "big.txt"],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background job inherits SIGINT ignored, and Python then installs no Ctrl-C handler: give
        # the command what a terminal gives it, whatever launched the tests.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(2.5)  # start-up (< 1 s) plus some training
    assert proc.poll() is None, "training finished before it could be interrupted: use a larger file"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert written(workdir) == []


def test_shipped_base_json_is_in_the_repo() -> None:
    assert (ROOT / "tokenizers" / "base.json").is_file()
