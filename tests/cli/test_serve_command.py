"""`serve` end to end: the console script serving a model until Ctrl-C (one log line per request; a second
Ctrl-C during a stream ends it cleanly), the warning for a public address, and what is refused in one line (the
extra not installed, a port in use, a tokenizer without role tokens, a transformers export)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    drop_role_tokens,
    endless_chat_model_dir,
    one_line_error,
    save_model_dir,
    varied_model,
)

from talm.cli.serve import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return save_model_dir(tmp_path / "models" / "assistant", varied_model(vocab=1024, context=64), step=1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(model_dir: Path, port: int) -> Iterator[subprocess.Popen]:
    """`serve -m model_dir` in a subprocess, once it answers on `port` (its stderr a pipe, its banner read); killed
    after the block if it still runs (a server that did not answer or end as it should is not left running)."""
    code = "import sys; sys.argv[0] = 'serve'; from talm.cli.serve import main; main()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-c", code, "-m", str(model_dir), "--port", str(port), "--device", "cpu"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        banner = process.stderr.readline()
        assert f"as model {model_dir.name!r}: chat page http://127.0.0.1:{port}/" in banner, banner
        wait_until_healthy(port, model_dir.name)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


def wait_until_healthy(port: int, name: str) -> None:
    deadline = time.monotonic() + 30
    while True:  # the banner comes just before uvicorn binds
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
                assert json.loads(response.read()) == {"status": "ok", "model": name}
            return
        except OSError:
            assert time.monotonic() < deadline, "the server never answered"
            time.sleep(0.1)


def children(pid: int) -> list[int]:
    """The processes `pid` started (any of its threads), as Linux lists them."""
    return [
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    ]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has ended; only its exit status is left


def wait_until_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 30
    while left := [p for p in pids if alive(p)]:
        assert time.monotonic() < deadline, f"processes {left} outlived the server"
        time.sleep(0.1)


def test_serve_answers_until_ctrl_c(model_dir: Path) -> None:
    """...and its generation worker (and whatever else it started) ends with it."""
    pytest.importorskip("uvicorn", reason="the talm[serve] extra is not installed")
    port = free_port()
    with serving(model_dir, port) as process:
        started = children(process.pid)
        assert started  # the generation worker at least
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as response:
            models = json.loads(response.read())
        assert [m["id"] for m in models["data"]] == ["assistant"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert b"<title>talm chat</title>" in response.read()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        log = process.stderr.read()
        # one line per request: the health checks, the models, the page
        assert "GET /v1/models 200" in log and "GET / 200" in log and "GET /health 200" in log, log
        wait_until_gone(started)


def test_a_second_ctrl_c_while_streaming_ends_the_stream_and_exits_cleanly(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn", reason="the talm[serve] extra is not installed")
    model_dir = endless_chat_model_dir(tmp_path / "models" / "endless", context=4096)
    port = free_port()
    with serving(model_dir, port) as process:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        # temperature 0: the endless model never ends a reply by itself (sampled, it may pick <|endoftext|>)
        body = {"model": "endless", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4000}
        body["temperature"] = 0
        headers = {"Content-Type": "application/json"}
        connection.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}), headers)
        response = connection.getresponse()
        for _ in range(3):  # the reply is under way
            assert response.readline().startswith(b"data: ") and response.readline() == b"\n"
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)  # at once, not after the grace period
        rest = response.read().decode()  # the stream ends (rather than hanging or being cut mid-event)
        code = process.wait(timeout=30)
        log = process.stderr.read()
        assert code == 0, log
    events = [e for e in rest.split("\n\n") if e]
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "server_shutting_down"
    assert "Traceback" not in log and "ERROR" not in log, log
    assert "POST /v1/chat/completions 200" in log and "cut short" in log, log


def test_a_server_killed_outright_leaves_no_worker_behind(model_dir: Path) -> None:
    """SIGKILL gives the server no chance to end its worker: the worker ends by itself (its pipe closed)."""
    pytest.importorskip("uvicorn", reason="the talm[serve] extra is not installed")
    with serving(model_dir, free_port()) as process:
        started = children(process.pid)
        assert started
        process.kill()
        process.wait(timeout=30)
        wait_until_gone(started)


def test_a_worker_that_cannot_start_is_one_line(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("uvicorn", reason="the talm[serve] extra is not installed")
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # multiprocessing's helper process, started now: not broken as below
    monkeypatch.setenv("PYTHONHOME", str(model_dir / "nowhere"))  # the worker's Python cannot even start
    err = one_line_error(capsys, main, "-m", str(model_dir), "--port", str(free_port()))
    assert "the generation worker could not start: it exited with code 1" in err


def test_a_transformers_export_is_named_as_such(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("uvicorn", reason="the talm[serve] extra is not installed")
    from talm.use.export import export_checkpoint

    exported = export_checkpoint(model_dir, model_dir.parent / "exported")
    err = one_line_error(capsys, main, "-m", str(exported.path), "--port", str(free_port()))
    assert (
        "is a transformers model directory" in err and "the talm model directory it was exported from" in err
    )
    assert "train" not in err


def test_a_public_address_is_served_with_a_warning(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("uvicorn", reason="the talm[serve] extra is not installed")
    import talm.use.serve

    calls = []

    def run_server(app: object, host: str, port: int) -> None:
        calls.append({"host": host, "server": app.state.server})
        app.state.server.close()  # as the real one does when it stops: no worker left running

    monkeypatch.setattr(talm.use.serve, "run_server", run_server)
    main(
        [
            "-m",
            str(model_dir),
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
            "--slots",
            "3",
            "--queue",
            "5",
        ]
    )
    assert calls and calls[0]["host"] == "0.0.0.0"
    assert (calls[0]["server"].slots, calls[0]["server"].queue) == (3, 5)
    assert "warning: listening on 0.0.0.0" in capsys.readouterr().err

    main(["-m", str(model_dir), "--port", str(free_port())])
    assert calls[1]["host"] == "127.0.0.1"  # the default: this machine only
    assert "warning" not in capsys.readouterr().err


def test_without_the_extra_serve_says_what_to_install(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now fails, as when it is not installed
    monkeypatch.delitem(sys.modules, "talm.use.serve", raising=False)
    err = one_line_error(capsys, main, "-m", str(model_dir))
    assert "pip install 'talm[serve]'" in err


def test_a_port_in_use_is_one_line(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("uvicorn", reason="the talm[serve] extra is not installed")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = one_line_error(capsys, main, "-m", str(model_dir), "--port", str(port))
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err
    assert "is not" in one_line_error(capsys, main, "-m", str(model_dir), "--port", "70000")
    assert "--slots" in one_line_error(capsys, main, "-m", str(model_dir), "--slots", "0")
    assert "--queue" in one_line_error(capsys, main, "-m", str(model_dir), "--queue", "-1")


def test_a_tokenizer_without_role_tokens_is_refused_in_one_line(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("uvicorn", reason="the talm[serve] extra is not installed")
    drop_role_tokens(model_dir)
    err = one_line_error(capsys, main, "-m", str(model_dir), "--port", str(free_port()))
    assert "has no <|system|>, <|user|>, <|assistant|> token(s)" in err
