"""`chat` end to end: a conversation typed on stdin (replies are those of the whole conversation so far, in talm's
chat format), the commands, Ctrl-C in a real terminal, and what is refused."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import drop_role_tokens, endless_chat_model_dir, one_line_error, save_model_dir, varied_model

from talm.cli.chat import build_parser, main
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


class TypedInput(io.StringIO):
    """stdin as a terminal."""

    def isatty(self) -> bool:
        return True


def test_an_overlong_typed_message_is_refused_without_ending_the_chat(
    chat_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", TypedInput(("word " * 200) + "\nHi\n"))
    main(["-m", str(chat_model_dir), "--max-new-tokens", "3", "-s", "0"])
    err = capsys.readouterr().err
    # context 64 less the reply's 3 tokens
    assert re.search(
        r"error: the message is \d+ tokens \(\d+ with the system message and chat format\), more than the 61",
        err,
    )
    assert (
        "of 64 leaves for a prompt after 3 for the reply: shorten it or pass a smaller --max-new-tokens"
        in err
    )
    assert re.search(
        r"generated [123] tokens", err
    )  # the reply to "Hi"; then the end of input ended the chat


def test_an_overlong_piped_message_ends_the_chat_in_one_line(
    chat_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n" + ("word " * 200) + "\nnever answered\n"))
    with pytest.raises(SystemExit) as info:
        main(["-m", str(chat_model_dir), "--max-new-tokens", "3", "-s", "0"])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and len(out.splitlines()) == 1  # the reply to "Hi" only
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and not errors[0].startswith(">")  # on a line of its own
    assert "more than the 61 that the model's context of 64 leaves" in errors[0]


@pytest.mark.parametrize("typed", [False, True])
def test_a_system_message_that_leaves_no_room_is_refused(
    typed: bool, chat_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", (TypedInput if typed else io.StringIO)("Hi\n"))
    with pytest.raises(SystemExit) as info:  # from the command line: refused before anything, typed or piped
        main(["-m", str(chat_model_dir), "--system", "word " * 60])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1, err
    assert re.search(
        r"the system message \(--system\) is \d+ tokens with the chat format, leaving no room", err
    )
    assert (
        "the model's context of 64 leaves for a prompt after 16 for the reply: shorten --system or pass a smaller --max-new-tokens"
        in err
    )

    command = "/system " + "word " * 60 + "\nHi\n"
    monkeypatch.setattr(sys, "stdin", (TypedInput if typed else io.StringIO)(command))
    if typed:  # said, and the chat goes on without it
        main(["-m", str(chat_model_dir), "--max-new-tokens", "2"])
        out, err = capsys.readouterr()
        assert "error: the system message (/system) is" in err and "shorten /system" in err
        assert "[system message set" not in err and out.count("\n") == 1  # "Hi" answered
    else:  # ends a piped chat: exit 2, one error line (after the banner)
        with pytest.raises(SystemExit) as info:
            main(["-m", str(chat_model_dir), "--max-new-tokens", "2"])
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert info.value.code == 2 and len(errors) == 1 and "the system message (/system) is" in errors[0]
        assert not errors[0].startswith(">")


def test_the_default_reply_takes_the_room_the_prompt_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = endless_chat_model_dir(tmp_path / "models" / "endless")  # context 64; never ends a reply
    model, tokenizer = load(model_dir)
    prompt = ChatFormat(tokenizer).render_prompt([{"role": "user", "content": "Hi"}])
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    main(["-m", str(model_dir), "--temperature", "0"])
    err = capsys.readouterr().err
    assert "[the reply filled the model's context of 64 tokens]" in err
    summary = err.strip().splitlines()[-1]
    assert f"generated {64 - len(prompt)} tokens in " in summary and summary.endswith("a full context (1)")
    assert "all the room the prompt leaves" in " ".join(build_parser()[0].format_help().split())


def test_tokens_per_second_leave_out_the_time_spent_typing(
    chat_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    typing = [
        0.0
    ]  # each line takes the user 1000 s to type, on a clock that moves on while waiting for input
    real = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real() + typing[0])

    class SlowTypist(TypedInput):
        def readline(self, *args: object) -> str:
            typing[0] += 1000.0
            return super().readline(*args)

    monkeypatch.setattr(sys, "stdin", SlowTypist("Hi\nAgain\n"))
    main(["-m", str(chat_model_dir), "--max-new-tokens", "4", "-s", "0"])
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    seconds = float(re.search(r"generated 8 tokens in ([\d.]+) s \(", summary).group(1))
    assert seconds < 100 and "--max-new-tokens (2)" in summary, summary  # the 3000 s of typing left out


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
    argv = [
        sys.executable,
        "-c",
        "import sys; from talm.cli.chat import build_parser, main; main(sys.argv[1:])",
    ]
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


def shell(command: str) -> subprocess.CompletedProcess[str]:
    """`command` run by bash with the console scripts of this Python on its PATH: a shell can close streams."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(
    ("streams", "message"),
    [
        ("<&-", "stdin is closed: chat reads the messages from it: give them on stdin"),
        ("<<< Hi >&-", "stdout is closed: chat writes the text there; run it with stdout open"),
    ],
)
def test_a_closed_stream_is_refused_in_one_line(chat_model_dir: Path, streams: str, message: str) -> None:
    done = shell(f"chat -m {chat_model_dir} --max-new-tokens 2 {streams}")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"chat: error: {message}")


def test_a_reader_that_leaves_ends_the_chat_quietly(chat_model_dir: Path) -> None:
    done = shell(
        f"yes Hi | head -n 50 | chat -m {chat_model_dir} --max-new-tokens 40 -s 0 | head -n 1; exit ${{PIPESTATUS[2]}}"
    )
    assert done.returncode == 0 and done.stdout.endswith("\n") and "Error" not in done.stderr, done.stderr
