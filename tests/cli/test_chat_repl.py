"""`chat` end to end: a conversation typed on stdin (replies are those of the whole conversation so far, in talm's
chat format), the commands, Ctrl-C in a real terminal, and what is refused."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import drop_role_tokens, endless_chat_model_dir, one_line_error, save_model_dir, varied_model

from talm.cli.chat import main
from talm.tokenizer.chat import ChatFormat
from talm.use.chat import stream_reply
from talm.use.config import SampleConfig
from talm.use.load import load

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def chat_model_dir(tmp_path: Path) -> Path:
    return save_model_dir(tmp_path / "models" / "assistant", varied_model(vocab=1024, context=64), step=1)


def chat(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], typed: str, *args: str
) -> tuple[str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    main(list(args))
    captured = capsys.readouterr()
    return captured.out, captured.err


def expected_reply(model_dir: Path, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """The reply to `messages` computed directly (greedy): what `chat` must print for that conversation."""
    model, tokenizer = load(model_dir)
    chat_format = ChatFormat(tokenizer)
    config = SampleConfig(max_new_tokens=max_new_tokens, temperature=0)
    ids = chat_format.render_prompt(messages)
    return "".join(stream_reply(model, tokenizer, ids, config, end_id=chat_format.end_id))


def test_the_conversation_goes_on_and_the_commands_change_it(
    chat_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    typed = "Hello\nHow are you?\n/system Be brief.\nAnd now?\n/reset\n/bogus\n\nHello\n/exit\nnever read\n"
    out, err = chat(
        monkeypatch, capsys, typed, "-m", str(chat_model_dir), "--temperature", "0", "--max-new-tokens", "6"
    )

    def reply(*messages: tuple[str, str]) -> str:
        return expected_reply(chat_model_dir, [{"role": r, "content": c} for r, c in messages], 6)

    first = reply(("user", "Hello"))
    second = reply(("user", "Hello"), ("assistant", first), ("user", "How are you?"))
    third = reply(
        ("system", "Be brief."),
        ("user", "Hello"),
        ("assistant", first),
        ("user", "How are you?"),
        ("assistant", second),
        ("user", "And now?"),
    )
    after_reset = reply(("system", "Be brief."), ("user", "Hello"))
    assert len({first, second, third}) == 3  # the conversation so far changes the reply
    assert out == f"{first}\n{second}\n{third}\n{after_reset}\n"
    assert "[system message set to 'Be brief.']" in err and "[conversation reset]" in err
    assert "unknown command /bogus" in err
    assert "generated 24 tokens" in err.strip().splitlines()[-1]  # 4 replies of 6 tokens


def test_end_of_input_ends_the_chat_and_an_overlong_message_is_refused_without_ending_it(
    chat_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    typed = ("word " * 200) + "\nHi\n"
    out, err = chat(monkeypatch, capsys, typed, "-m", str(chat_model_dir), "--max-new-tokens", "3", "-s", "0")
    # context 64 less the reply's 3 tokens
    assert re.search(r"error: the message is \d+ tokens, more than the 61 this model's context leaves", err)
    assert len(out.splitlines()) == 1  # the reply to "Hi"; then the end of input ended the chat
    assert re.search(r"generated [123] tokens", err)


def test_a_tokenizer_without_role_tokens_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A base tokenizer of talm's original layout may lack the role tokens: chatting needs them."""
    model_dir = save_model_dir(tmp_path / "models" / "base", varied_model(vocab=1024, context=64), step=1)
    drop_role_tokens(model_dir)
    err = one_line_error(capsys, main, "-m", str(model_dir))
    assert "has no <|system|>, <|user|>, <|assistant|> token(s)" in err


def test_bad_flags_are_one_line(chat_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "temperature" in one_line_error(capsys, main, "-m", str(chat_model_dir), "--temperature", "-1")
    assert "not found" in one_line_error(capsys, main, "-m", str(chat_model_dir.parent / "missing"))


def read_until(fd: int, wanted: bytes, seen: bytearray, start: int = 0, timeout: float = 60.0) -> int:
    """Read the terminal into `seen` until `wanted` shows up after `start`; where it ends."""
    deadline = time.monotonic() + timeout
    while (found := seen.find(wanted, start)) < 0:
        left = deadline - time.monotonic()
        assert left > 0, f"{wanted!r} never came; the terminal showed {bytes(seen)[-500:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            assert chunk, f"the terminal closed before {wanted!r}: {bytes(seen)[-500:]!r}"
            seen += chunk
    return found + len(wanted)


@pytest.mark.skipif(not hasattr(pty, "fork"), reason="needs a pseudo-terminal (POSIX)")
def test_ctrl_c_in_a_terminal_stops_the_reply_not_the_chat(tmp_path: Path) -> None:
    model_dir = endless_chat_model_dir(tmp_path / "models" / "endless")  # its replies never end by themselves
    argv = [sys.executable, "-c", "import sys; from talm.cli.chat import main; main(sys.argv[1:])"]
    argv += ["-m", str(model_dir), "--temperature", "0", "--max-new-tokens", "1000000"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    pid, fd = pty.fork()
    if pid == 0:  # the child: the chat, with the pseudo-terminal as its controlling terminal
        # SIGINT as a user's shell leaves it: a test run started in the background (`cmd &`) ignores it, and an
        # ignored signal stays ignored across exec
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execve(argv[0], argv, env)
    seen = bytearray()
    try:
        at = read_until(fd, b"> ", seen)
        os.write(fd, b"Hi\r")
        at = read_until(fd, b"Hi\r\n", seen, at)
        while len(seen) - at < 50:  # the reply is streaming
            ready, _, _ = select.select([fd], [], [], 60)
            assert ready, "the reply never started"
            seen += os.read(fd, 4096)
        os.write(fd, b"\x03")  # Ctrl-C as typed: the terminal sends SIGINT to the chat
        at = read_until(fd, b"[stopped]", seen, at)
        at = read_until(fd, b"> ", seen, at)  # asking for the next message: the chat goes on
        os.write(fd, b"/exit\r")
        read_until(fd, b"generated ", seen, at)
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, bytes(seen)[-500:]
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
