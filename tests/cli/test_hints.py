"""Every hint names a flag the user can type: the flags named in talm's messages and help exist, and (through
conftest's check on every user error a test provokes) belong to the command that prints them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hints import COMMANDS, FLAG, flags_of, wrong_flags

SRC = Path(__file__).resolve().parents[2] / "src" / "talm"
# Flags of other programs that talm's text names where the program's name is in another string piece.
OTHER_PROGRAMS_FLAGS = {"--local-dir", "--repo-type", "--logdir", "--model_args", "--include-path"}


def texts(path: Path) -> list[tuple[int, str]]:
    """The string constants of a module (an f-string's literal parts joined, a placeholder for each value)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        else:
            continue
        if FLAG.search(text):
            found.append((node.lineno, text))
    return found


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_every_flag_named_in_the_source_exists(path: Path) -> None:
    own = path.stem if path.parent.name == "cli" and path.stem in COMMANDS else None
    wrong = [
        f"line {line}: {flag}"
        for line, text in texts(path)
        for flag in wrong_flags(text, own)
        if flag.split()[0] not in OTHER_PROGRAMS_FLAGS
    ]
    assert not wrong, f"{path.relative_to(SRC)} names flags that do not exist: {wrong}"


def test_the_checker_tells_whose_flag_a_hint_names() -> None:
    assert "--resume-from" in flags_of("train_model") and "--checkpoint" not in flags_of("train_model")
    assert wrong_flags("damaged: use --checkpoint best", "train_model") == [
        "--checkpoint (not a flag of train_model)"
    ]
    assert wrong_flags("damaged: use --checkpoint best", "generate") == []
    assert wrong_flags("rerun download_data with --conversations; or pass --preset sft", "train_model") == []
    assert wrong_flags("rerun download_data with --preset sft", "train_model") == [
        "--preset (not a flag of download_data)"
    ]
    assert wrong_flags("fetch it with `hf download X --repo-type dataset --local-dir D`", "evaluate") == []
