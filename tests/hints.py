"""Which flags a message names, and for which command: the hint checker of tests/cli/test_hints.py and conftest."""

from __future__ import annotations

import argparse
import importlib
import re

COMMANDS = (
    "train_tokenizer", "download_data", "train_model", "generate", "chat", "serve", "evaluate", "export_model",
    "plot_metrics",
)  # fmt: skip
# Other programs a hint may tell the user to run: their flags are theirs, not checked here.
EXTERNAL = ("pip", "uv", "hf", "huggingface-cli", "torchrun", "lm_eval", "lm-eval", "llama-cli", "apt-get", "rye",
            "python", "python3", "git", "ollama", "curl", "OMP_NUM_THREADS")  # fmt: skip
FLAG = re.compile(r"(?<![\w-])--[a-zA-Z][\w.-]*[a-zA-Z0-9_]")
WORD = re.compile(r"(?<![\w./-])(" + "|".join(re.escape(c) for c in COMMANDS + EXTERNAL) + r")(?![\w-])")
SEGMENT = re.compile(r"[;\n]|\. |, or |: (?=[a-z])")


def parser_of(command: str) -> argparse.ArgumentParser:
    built = importlib.import_module(f"talm.cli.{command}").build_parser()
    return built[0] if isinstance(built, tuple) else built


def flags_of(command: str) -> set[str]:
    return {s for a in parser_of(command)._actions for s in a.option_strings if s.startswith("--")}


def named_flags(message: str, own: str | None) -> list[tuple[str | None, str]]:
    """(command, flag) for each --flag in `message`: the command is the last one named before the flag in its
    clause (e.g. "rerun download_data with --conversations"), else `own`, the command printing it."""
    named: list[tuple[str | None, str]] = []
    for segment in SEGMENT.split(message):
        for flag in FLAG.finditer(segment):
            if segment.startswith(".*", flag.end()):
                continue  # a family of flags (--train.*), not one
            before = WORD.findall(segment[: flag.start()])
            named.append((before[-1] if before else own, flag.group()))
    return named


def wrong_flags(message: str, own: str | None) -> list[str]:
    """The flags `message` names that the command it names them for does not have."""
    wrong = []
    for command, flag in named_flags(message, own):
        if command in EXTERNAL:
            continue
        have = flags_of(command) if command else set().union(*(flags_of(c) for c in COMMANDS))
        if flag.split("=")[0] not in have:
            wrong.append(f"{flag} (not a flag of {command or 'any talm command'})")
    return wrong
