"""The flags every console script builds from config fields, and its parser: flag text is converted to the
field's type before the strict config sees it, and every usage error is one line with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from talm.cli.common import ArgumentParser, add_config_flags, collect_config_flags
from talm.config import Config, PathField, Seed, validate
from talm.data.config import TokenCount
from talm.errors import TalmError


class Sample(Config):
    count: int = 1
    maybe_count: int | None = Field(default=None, ge=1)
    ratio: float = 0.5
    maybe_ratio: float | None = None
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    path: PathField = Path("x")
    paths: list[PathField] = []
    words: list[str] = []
    tokens: TokenCount | None = None
    seed: Seed | None = None


def parse(*argv: str) -> dict:
    parser = ArgumentParser(prog="prog")
    add_config_flags(parser, Sample)
    return collect_config_flags(parser.parse_args(list(argv)), Sample)


def test_flags_are_converted_to_the_fields_types_and_pass_strict_validation() -> None:
    given = parse(
        "--count", "3", "--maybe-count", "4", "--ratio", "1", "--maybe-ratio", "2e-3", "--flag", "--mode", "b",
        "--path", "p", "--paths", "q", "r", "--words", "w", "--tokens", "1e6", "--seed", "7",
    )  # fmt: skip
    assert given == {
        "count": 3,
        "maybe_count": 4,
        "ratio": 1.0,
        "maybe_ratio": 2e-3,
        "flag": True,
        "mode": "b",
        "path": Path("p"),
        "paths": [Path("q"), Path("r")],
        "words": ["w"],
        "tokens": 1_000_000,
        "seed": 7,
    }
    assert [type(given[k]) for k in ("count", "ratio", "tokens")] == [int, float, int]
    assert validate(Sample, given).model_dump() == given
    assert parse() == {}  # flags not given stay out, so a file or preset can supply them


def test_none_unsets_an_optional_number_a_preset_or_file_set() -> None:
    assert parse("--maybe-count", "none", "--maybe-ratio", "None") == {
        "maybe_count": None,
        "maybe_ratio": None,
    }
    assert validate(Sample, {"maybe_ratio": 0.1} | parse("--maybe-ratio", "none")).maybe_ratio is None
    with pytest.raises(SystemExit):
        parse("--count", "none")  # a required-to-be-a-number field has no None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--count", "3.5"], "argument --count: '3.5' is not a whole number (e.g. 12)"),
        (["--count", "true"], "argument --count: 'true' is not a whole number (e.g. 12)"),
        (["--maybe-count", "x"], "argument --maybe-count: 'x' is not a whole number (e.g. 12)"),
        (["--ratio", "half"], "argument --ratio: 'half' is not a number (e.g. 0.5 or 3e-4)"),
        (["--tokens", "1.5e0"], "argument --tokens: '1.5e0' is not a whole number of tokens"),
        (["--mode", "c"], "argument --mode: invalid choice: 'c' (choose from 'a', 'b')"),
        (["--nope"], "unrecognized arguments: --nope"),
        (
            ["--maybe", "2"],
            "unrecognized arguments: --maybe 2",
        ),  # no abbreviations: --maybe is not --maybe-count
    ],
)
def test_bad_flags_are_one_line_without_the_usage_block(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"prog: error: {message}") and err.count("\n") == 1, err


def test_non_finite_and_out_of_range_flag_values_are_refused_by_validation_in_one_line() -> None:
    given = parse("--ratio", "nan", "--maybe-ratio", "inf", "--seed", "99999999999999999999999")
    with pytest.raises(TalmError) as info:
        validate(Sample, given)
    assert str(info.value) == (
        "ratio=nan: must be a finite number; maybe_ratio=inf: must be a finite number; "
        f"seed=99999999999999999999999: must be from 0 to 2**63-1 ({2**63 - 1}): pass e.g. 0"
    )


def test_help_still_shows_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse("--help")
    assert info.value.code == 0 and "usage: prog" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ every script

BIN = Path(sys.executable).parent

# Per console script: arguments it needs, a bad flag value (choice or type), and what its one line must say.
BAD_FLAGS = {
    "train_tokenizer": (
        ["-n", "t"],
        ["-vs", "many"],
        "argument -vs/--vocab-size: 'many' is not a whole number",
    ),
    "download_data": (
        ["tinyshakespeare"],
        ["--max-tokens", "lots"],
        "argument --max-tokens: 'lots' is not a whole number of tokens",
    ),
    "train_model": (
        ["-n", "m", "-d", "data"],
        ["--dtype", "fp8"],
        "argument --dtype: invalid choice: 'fp8' (choose from 'auto', 'float32', 'bfloat16', 'float16')",
    ),
    "generate": (
        ["-m", "models/m"],
        ["--device", "tpu"],
        "argument --device: invalid choice: 'tpu' (choose from 'auto', 'cpu', 'cuda', 'mps')",
    ),
    "export_model": (
        ["-m", "models/m", "-o", "out"],
        ["--dtype", "fp8"],
        "argument --dtype: invalid choice: 'fp8'",
    ),
    "plot_metrics": (["models/m"], ["--x", "epochs"], "argument --x: invalid choice: 'epochs'"),
}


def run_script(tmp_path: Path, script: str, argv: list[str]) -> tuple[int, str, str]:
    result = subprocess.run(
        [str(BIN / script), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("script", sorted(BAD_FLAGS))
def test_every_console_script_says_a_bad_flag_in_one_line(tmp_path: Path, script: str) -> None:
    base, bad, message = BAD_FLAGS[script]
    cases = [
        (base + bad, message),
        (base + ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        ([], "required"),  # argparse or (train_tokenizer) the config says which
    ]
    for argv, expected in cases:
        code, out, err = run_script(tmp_path, script, argv)
        assert code == 2, err
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), err
        assert expected in lines[0] and "usage:" not in err and "Traceback" not in err, err
        assert out == ""
        assert list(tmp_path.iterdir()) == []  # nothing written


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999999"])  # 2**63: tests/test_config.py
def test_seeds_out_of_range_are_refused_by_train_model_and_generate(
    seed: str, tiny_model_dir: Path, tiny_data: Path
) -> None:
    root = tiny_model_dir.parent.parent  # holds models/tiny: a run that must survive
    before = snapshot(root)
    expected = f"seed={seed}: must be from 0 to 2**63-1 ({2**63 - 1}): pass e.g. 0"
    for script, argv in [
        ("train_model", ["-n", "tiny", "-d", str(tiny_data), "--restart", "--seed", seed, "--device", "cpu"]),
        ("train_model", ["-n", "fresh", "-d", str(tiny_data), "-s", seed, "--device", "cpu"]),
        ("generate", ["-m", "models/tiny", "-p", "ROMEO:", "--seed", seed, "--device", "cpu"]),
    ]:
        code, out, err = run_script(root, script, argv)
        assert code == 2, err
        assert err.count("\n") == 1 and err.startswith(f"{script}: error: ") and expected in err, err
        assert out == ""
        assert snapshot(root) == before  # nothing deleted, changed or created (no models/fresh)
