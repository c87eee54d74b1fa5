"""scripts/demo's flags, with every command it runs replaced by a stub that logs its arguments: interrupted, the
demo's rerun resumes what the last run made (as train_model's "rerun the same command to resume" says) instead
of replacing it; `--fresh` replaces the tokenizer, the data and the model."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from conftest import ROOT

STUB = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$DEMO_LOG"
case "$(basename "$0")" in
  train_tokenizer) mkdir -p tokenizers && echo '{}' > tokenizers/demo.json ;;
  train_model) if [ -f "$DEMO_INTERRUPT" ]; then rm "$DEMO_INTERRUPT"; exit 130; fi ;;
  python) cat > /dev/null ;;
esac
"""


def demo_copy(tmp_path: Path) -> Path:
    """scripts/demo in a project root whose bootstrap does nothing and whose .venv/bin holds the stubs."""
    root = tmp_path / "root"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "demo", root / "scripts" / "demo")
    (root / "scripts" / "bootstrap").write_text("#!/usr/bin/env bash\n")
    (root / ".venv" / "bin").mkdir(parents=True)
    for name in ("train_tokenizer", "download_data", "train_model", "generate", "python"):
        (root / ".venv" / "bin" / name).write_text(STUB)
    for f in [root / "scripts" / "bootstrap", *(root / ".venv" / "bin").iterdir()]:
        f.chmod(0o755)
    return root


def run_demo(root: Path, *args: str, interrupt: bool = False) -> tuple[int, dict[str, str]]:
    """(exit status, each command's arguments) of one run of the demo."""
    log, flag = root / "log", root / "interrupt"
    log.unlink(missing_ok=True)
    if interrupt:
        flag.write_text("")
    env = {**os.environ, "DEMO_LOG": str(log), "DEMO_INTERRUPT": str(flag)}
    done = subprocess.run(
        ["bash", str(root / "scripts" / "demo"), *args], env=env, capture_output=True, text=True
    )
    calls = dict(line.split(" ", 1) for line in log.read_text().splitlines())
    return done.returncode, calls


def test_a_rerun_of_an_interrupted_demo_resumes_and_fresh_starts_over(tmp_path: Path) -> None:
    root = demo_copy(tmp_path)
    code, calls = run_demo(root, interrupt=True)  # the first run: everything new, then Ctrl-C in training
    assert code == 130 and "generate" not in calls
    assert "--force" in calls["train_tokenizer"] and "--overwrite" in calls["download_data"]
    assert "--restart" in calls["train_model"]
    code, calls = run_demo(root)  # the rerun keeps the tokenizer and the data, and resumes the model
    assert code == 0 and "train_tokenizer" not in calls and "generate" in calls
    assert "--overwrite" not in calls["download_data"] and "--restart" not in calls["train_model"]
    code, calls = run_demo(root, "--fresh")
    assert code == 0 and "--force" in calls["train_tokenizer"] and "--restart" in calls["train_model"]
    assert "--overwrite" in calls["download_data"]
