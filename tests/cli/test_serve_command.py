"""`serve` end to end: the console script serving a model until Ctrl-C, the warning for a public address, and
what is refused in one line (the extra not installed, a port in use, a tokenizer without role tokens)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import drop_role_tokens, one_line_error, save_model_dir, varied_model

from talm.cli.serve import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return save_model_dir(tmp_path / "models" / "assistant", varied_model(vocab=1024, context=64), step=1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_answers_until_ctrl_c(model_dir: Path) -> None:
    pytest.importorskip("uvicorn", reason="the talm[serve] extra is not installed")
    port = free_port()
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
        assert f"as model 'assistant': chat page http://127.0.0.1:{port}/" in banner, banner
        deadline = time.monotonic() + 30
        while True:  # the banner comes just before uvicorn binds
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as response:
                    models = json.loads(response.read())
                break
            except OSError:
                assert time.monotonic() < deadline, "the server never answered"
                time.sleep(0.1)
        assert [m["id"] for m in models["data"]] == ["assistant"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert b"<title>talm chat</title>" in response.read()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


def test_a_public_address_is_served_with_a_warning(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    uvicorn = pytest.importorskip("uvicorn", reason="the talm[serve] extra is not installed")
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    main(["-m", str(model_dir), "--host", "0.0.0.0", "--port", str(free_port())])
    assert calls and calls[0]["host"] == "0.0.0.0"
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


def test_a_tokenizer_without_role_tokens_is_refused_in_one_line(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("uvicorn", reason="the talm[serve] extra is not installed")
    drop_role_tokens(model_dir)
    err = one_line_error(capsys, main, "-m", str(model_dir), "--port", str(free_port()))
    assert "has no <|system|>, <|user|>, <|assistant|> token(s)" in err
