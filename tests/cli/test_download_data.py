"""`download_data` end to end, offline: every preset on local copies laid out like the hub repos, resume after
kill -9, the worker split, and every bad input (one line, exit 2, nothing left behind)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import BASE_TOKENIZER, SHAKESPEARE, fill_disk_in_shard
from fixtures.hub_layout import (
    cosmopedia_table,
    fineweb_edu_dedup_table,
    fineweb_table,
    python_edu_table,
    sample_texts,
    write_hub_repo,
)

from talm.cli.download_data import main
from talm.tokenizer.api import Tokenizer

DOWNLOAD_DATA = str(Path(sys.executable).with_name("download_data"))


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the console script in-process: (exit status, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def documents(data_dir: Path, split: str | None = None) -> list[str]:
    """Decode every document of a data directory (all manifests, in order), per the shard format."""
    tok = Tokenizer.from_file(BASE_TOKENIZER)
    docs = []
    for meta in sorted(data_dir.glob("meta*.json")):
        m = json.loads(meta.read_text())
        assert m["complete"] and m["tokenizer"]["fingerprint"] == tok.fingerprint
        parts = [
            np.load(data_dir / s["file"], mmap_mode="r") for s in m["shards"] if split in (None, s["split"])
        ]
        stream = np.concatenate(parts)
        assert stream.dtype == np.uint16 and stream[0] == tok.eot_id
        docs += [tok.decode(p[1:]) for p in np.split(stream, np.flatnonzero(stream == tok.eot_id))[1:]]
    return docs


def mtimes(data_dir: Path) -> dict[str, int]:
    """Every data file's modification time (the run lock's record is rewritten by every run: left out)."""
    return {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir() if not p.name.startswith(".talm")}


def contents(data_dir: Path) -> dict[str, bytes]:
    """Every data file's bytes (the run lock's record, pid and time, is left out)."""
    return {p.name: p.read_bytes() for p in data_dir.iterdir() if not p.name.startswith(".talm")}


def shards_and_totals(data_dir: Path) -> dict[str, Any]:
    """The shards' bytes and the manifest without the stream positions: datasets encodes a position reached
    after a resume differently (its inner bookkeeping is not refreshed), though it denotes the same place."""
    got: dict[str, Any] = {n: b for n, b in contents(data_dir).items() if n.endswith(".npy")}
    meta = json.loads((data_dir / "meta.json").read_text())
    for s in meta["shards"]:
        s.pop("resume", None)
    got["meta.json"] = meta
    return got


def test_tinyshakespeare(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["tinyshakespeare", "--shard-size", "100000"], capsys)
    assert code == 0, err
    assert (
        out.startswith("wrote data/tinyshakespeare/default:")
        and "tokens/s" in out
        and len(out.splitlines()) == 1
    )
    d = project / "data" / "tinyshakespeare" / "default"
    m = json.loads((d / "meta.json").read_text())
    passages = SHAKESPEARE.read_text(encoding="utf-8").split("\n\n")
    assert documents(d) == passages
    val = documents(d, "val")
    assert 40_000 <= sum(s["tokens"] for s in m["shards"] if s["split"] == "val") < 41_000
    assert documents(d, "train") == passages[len(val) :]  # disjoint: val is the first documents only
    assert [s["file"] for s in m["shards"]] == ["val_000000.npy"] + [
        f"train_{i:06d}.npy" for i in range(1, 5)
    ]
    assert m["totals"]["bytes"] == sum(len(p.encode()) for p in passages)
    assert m["tokenizer"] == {
        "path": "tokenizers/base.json",
        "fingerprint": Tokenizer.from_file(BASE_TOKENIZER).fingerprint,
        "vocab_size": 1024,
        "eot_id": 1020,
    }
    before = mtimes(d)

    code, out, _ = run(["tinyshakespeare", "--shard-size", "1e5"], capsys)
    assert code == 0 and "already complete" in out
    code, _, err = run(["tinyshakespeare", "--shard-size", "50000"], capsys)
    assert code == 2 and "other arguments (shard_size 100000 -> 50000)" in err and "--overwrite" in err
    assert mtimes(d) == before  # nothing touched
    code, _, err = run(["tinyshakespeare", "--shard-size", "50000", "--overwrite"], capsys)
    assert code == 0, err
    assert len(json.loads((d / "meta.json").read_text())["shards"]) == 1 + 8  # 395,661 train tokens


FINEWEB_TEXTS = sample_texts(400, long=True)


@pytest.mark.parametrize(
    ("args", "repo", "configs", "texts"),
    [
        (
            ["fineweb"],
            "HuggingFaceFW/fineweb",
            {"sample-10BT": [fineweb_table(FINEWEB_TEXTS[:250]), fineweb_table(FINEWEB_TEXTS[250:])]},
            FINEWEB_TEXTS,
        ),
        (
            ["fineweb", "--ds-sample", "CC-MAIN-2024-10", "--dir-prefix", "dump"],
            "HuggingFaceFW/fineweb",
            {"CC-MAIN-2024-10": [fineweb_table(FINEWEB_TEXTS[:100])]},
            FINEWEB_TEXTS[:100],
        ),
        (
            ["fineweb-edu"],
            "HuggingFaceFW/fineweb-edu",
            {"sample-10BT": [fineweb_table(FINEWEB_TEXTS[:200], edu=True)]},
            FINEWEB_TEXTS[:200],
        ),
        (
            ["smol"],
            "HuggingFaceTB/smollm-corpus",
            {"cosmopedia-v2": [cosmopedia_table(sample_texts(300))]},
            sample_texts(300),
        ),
        (
            ["smol", "--ds-sample", "fineweb-edu-dedup"],
            "HuggingFaceTB/smollm-corpus",
            {"fineweb-edu-dedup": [fineweb_edu_dedup_table(sample_texts(300, offset=5))]},
            sample_texts(300, offset=5),
        ),
    ],
    ids=["fineweb", "fineweb-dump", "fineweb-edu", "smol-cosmopedia", "smol-fineweb-edu-dedup"],
)
def test_hub_presets_on_local_copies(
    project: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    repo: str,
    configs: dict,
    texts: list[str],
) -> None:
    write_hub_repo(project, repo, configs)
    code, out, err = run([*args, "--val-tokens", "3000", "--shard-size", "20000"], capsys)
    assert code == 0, err
    d = Path(out.split()[1].rstrip(":"))
    m = json.loads((d / "meta.json").read_text())
    assert (m["dataset"], m["source"], m["config"]) == (args[0], repo, next(iter(configs)))
    assert d == Path("data") / args[0] / ((f"dump_{m['config']}") if "--dir-prefix" in args else m["config"])
    assert documents(d) == texts
    val_tokens = sum(s["tokens"] for s in m["shards"] if s["split"] == "val")
    assert 3000 <= val_tokens and len(documents(d, "val")) < len(texts) // 2


def test_python_edu_is_refused_and_nothing_is_written(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_hub_repo(project, "HuggingFaceTB/smollm-corpus", {"python-edu": [python_edu_table(20)]})
    code, _, err = run(["smol", "--ds-sample", "python-edu"], capsys)
    assert code == 2 and "holds no text" in err and "--data-files" in err and len(err.splitlines()) == 1
    code, _, err = run(["py", "--data-files", "HuggingFaceTB/smollm-corpus/python-edu"], capsys)
    assert code == 2 and "no column 'text'" in err and "blob_id" in err
    assert not (project / "data").exists()


def test_data_files_with_empty_and_null_texts(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = sample_texts(120)
    rows = [{"body": t, "id": i} for i, t in enumerate(texts)]
    rows[3]["body"], rows[50]["body"], rows[51]["body"], rows[7]["body"] = "", None, "", 7
    Path("mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run(
        ["mycorpus", "--data-files", "mine.jsonl", "--text-column", "body", "--val-tokens", "0"], capsys
    )
    assert code == 0, err
    assert (
        "(3 empty, 1 malformed skipped; the first: 'mine.jsonl' line 8: 'body' holds a number, not text)"
        in out
    )
    d = project / "data" / "mycorpus" / "default"
    m = json.loads((d / "meta.json").read_text())
    assert m["totals"]["empty_documents"] == 4 and m["totals"]["documents"] == 116
    assert m["files"] == ["mine.jsonl"] and [s["split"] for s in m["shards"]] == ["train"]
    assert documents(d) == [r["body"] for r in rows if r["body"] and isinstance(r["body"], str)]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_network_fails_fast_in_one_line(project: Path) -> None:
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HUB_OFFLINE": "0"}
    start = time.monotonic()
    proc = subprocess.run([DOWNLOAD_DATA, "fineweb"], capture_output=True, text=True, env=env, timeout=60)
    assert time.monotonic() - start < 15
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "could not reach the Hugging Face Hub" in proc.stderr and "HF_ENDPOINT" in proc.stderr
    assert "--data-files" in proc.stderr and "./HuggingFaceFW/fineweb" in proc.stderr
    assert not (project / "data").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["webtext"],
            "unknown dataset 'webtext': choose one of fineweb, fineweb-edu, smol, smoltalk, gsm8k, ultrafeedback, tinyshakespeare",
        ),
        (["fineweb", "--ds-sample", "sample-1BT"], "unknown config 'sample-1BT' of HuggingFaceFW/fineweb"),
        (
            ["tinyshakespeare", "-t", "tokenizers/none.json"],
            "tokenizer file 'tokenizers/none.json' not found",
        ),
        (["tinyshakespeare", "-t", "tiny-shakespeare.txt"], "is not a tokenizer file"),
        (["mine", "--data-files", "mine.parquet", "--text-column", "body"], "has no column 'body'"),
        (["mine", "--data-files", "missing/*.parquet"], "matches no file"),
        (["mine", "--data-files", "blank.parquet"], "the stream held no text (3 empty documents)"),
        (["tinyshakespeare", "--val-tokens", "1e7"], "before the validation split (--val-tokens 10,000,000"),
        (
            [
                "tinyshakespeare",
                "--val-tokens",
                "1e7",
                "--shard-size",
                "1e5",
            ],  # val shards were written: removed
            "so no training tokens are left: lower --val-tokens",
        ),
        (["tinyshakespeare", "--shard-size", "-5"], "--shard-size=-5"),
        (
            ["tinyshakespeare", "--max-tokens", "lots"],
            "argument --max-tokens: 'lots' is not a whole number of tokens",
        ),
    ],
)
def test_bad_input_one_line_and_nothing_left_behind(
    project: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"], "n": [1, 2]}), "mine.parquet")
    pq.write_table(pa.table({"text": pa.array(["", None, ""], pa.string())}), "blank.parquet")
    code, out, err = run(args, capsys)
    assert code == 2 and out == ""
    assert ": error: " in err and len(err.splitlines()) == 1, err
    assert message in err
    assert not (project / "data").exists()


def test_unwritable_data_dir(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path("data").write_text("a file where the data directory should be")
    code, _, err = run(["tinyshakespeare"], capsys)
    assert code == 2 and "'data' is a file, not a directory" in err and len(err.splitlines()) == 1
    assert Path("data").read_text() == "a file where the data directory should be"


def test_disk_full_then_resume(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import talm.data.shard_dir

    args = ["tinyshakespeare", "--shard-size", "60000"]
    code, _, err = run([*args, "--data-root", "clean"], capsys)
    assert code == 0, err
    fill_disk_in_shard(monkeypatch, 3)
    code, _, err = run(args, capsys)
    assert code == 2 and "No space left on device" in err and "resume" in err
    d = project / "data" / "tinyshakespeare" / "default"
    m = json.loads((d / "meta.json").read_text())
    assert not m["complete"] and len(m["shards"]) == 2
    assert sorted(contents(d)) == ["meta.json", "train_000001.npy", "val_000000.npy"]
    monkeypatch.delattr(talm.data.shard_dir, "open")
    code, out, err = run(args, capsys)
    assert code == 0 and "(resumed)" in out, err
    clean = project / "clean" / "tinyshakespeare" / "default"
    assert contents(d) == contents(clean)


def test_repeated_ctrl_c_then_resume_is_byte_identical(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import talm.data.prepare
    import talm.data.streaming
    import talm.data.writer

    # small reads and batches, so that shards end inside batches and runs resume mid-stream
    monkeypatch.setattr(talm.data.streaming, "ROWS_PER_READ", 32)
    monkeypatch.setattr(talm.data.prepare, "BATCH_BYTES", 20_000)
    texts = sample_texts(1500)
    write_hub_repo(
        project, "HuggingFaceFW/fineweb", {"sample-10BT": [fineweb_table(texts[i::3]) for i in range(3)]}
    )
    args = ["fineweb", "--shard-size", "7000", "--val-tokens", "5000"]
    code, _, err = run([*args, "--data-root", "clean"], capsys)
    assert code == 0, err

    real_write_manifest = talm.data.writer.ShardWriter._write_manifest
    calls, stop_at = [0], [3]

    def ctrl_c_after(self: talm.data.writer.ShardWriter) -> None:
        real_write_manifest(self)
        calls[0] += 1
        if calls[0] == stop_at[0]:
            raise KeyboardInterrupt

    monkeypatch.setattr(talm.data.writer.ShardWriter, "_write_manifest", ctrl_c_after)
    meta = project / "data" / "fineweb" / "sample-10BT" / "meta.json"
    for attempt in range(4):
        # the first run stops after 3 shards, each rerun right after its first one (the riskiest resume point)
        calls[0], stop_at[0] = 0, 3 if attempt == 0 else 1
        code, _, err = run(args, capsys)
        assert code == 130 and "rerun the same command to resume" in err
        assert len(json.loads(meta.read_text())["shards"]) == 3 + attempt
    monkeypatch.setattr(talm.data.writer.ShardWriter, "_write_manifest", real_write_manifest)
    code, out, err = run(args, capsys)
    assert code == 0 and "(resumed)" in out, err
    clean = project / "clean" / "fineweb" / "sample-10BT"
    assert shards_and_totals(meta.parent) == shards_and_totals(clean)
    # the positions recorded per shard by resumed runs resume exactly too: damage a late shard, rerun
    _truncate(meta.parent / "train_000010.npy")
    code, out, err = run(args, capsys)
    assert code == 0 and "resumed from the last good shard" in out, err
    assert shards_and_totals(meta.parent) == shards_and_totals(clean)


def test_workers_fill_one_directory_disjointly(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = sample_texts(600)
    write_hub_repo(
        project, "HuggingFaceFW/fineweb", {"sample-10BT": [fineweb_table(texts[i::4]) for i in range(4)]}
    )
    all_docs = sorted(texts)
    for workers in (2, 3):  # 4 files: split by file for 2 workers, by document for 3
        prefix = f"w{workers}"
        for index in range(workers):
            args = [
                "fineweb",
                "--dir-prefix",
                prefix,
                "--num-workers",
                str(workers),
                "--worker-index",
                str(index),
            ]
            code, _, err = run([*args, "--val-tokens", "3000", "--shard-size", "10000"], capsys)
            assert code == 0, err
        d = project / "data" / "fineweb" / f"{prefix}_sample-10BT"
        names = sorted(p.name for p in d.glob("meta*.json"))
        assert names == [f"meta.w{i:03d}-of-{workers:03d}.json" for i in range(workers)]
        assert (d / f"train.w000-of-{workers:03d}_000001.npy").exists()
        assert sorted(documents(d)) == all_docs  # every document exactly once
        val = sum(
            s["tokens"]
            for n in names
            for s in json.loads((d / n).read_text())["shards"]
            if s["split"] == "val"
        )
        assert 3000 <= val < 3000 + 3 * 2000  # the val split is shared between workers
    code, _, err = run(["fineweb", "--dir-prefix", "w2"], capsys)
    assert code == 2 and "different number of workers" in err


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_is_byte_identical(project: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = sample_texts(12_000, long=True)  # ~ 40 MB of text: many seconds of work
    Path("big").mkdir()
    for i in range(4):
        pq.write_table(pa.table({"text": texts[i::4]}), f"big/{i}.parquet")
    args = [DOWNLOAD_DATA, "big", "--data-files", "big", "--shard-size", "200000", "--val-tokens", "100000"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    meta = project / "data" / "big" / "default" / "meta.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if meta.exists() and len(json.loads(meta.read_text())["shards"]) >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: make the corpus bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = json.loads(meta.read_text())
    assert not partial["complete"] and partial["resume"]["stream_state"]
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "(resumed)" in resumed.stdout, resumed.stderr
    # the uninterrupted reference run, on one core: --num-proc changes the speed, never the shards
    clean_args = [*args, "--data-root", "clean", "--num-proc", "1"]
    clean = subprocess.run(clean_args, env=env, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    got = contents(meta.parent)
    want = contents(project / "clean" / "big" / "default")
    assert got.keys() == want.keys() and got == want


HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
import talm.data.writer
real = talm.data.writer.ShardWriter._write_manifest
def slow(self):
    real(self)
    if len(self.shards) == 2:  # hold the lock mid-run, with shards written, until the test says go
        Path("ready").touch()
        while not Path("go").exists():
            time.sleep(0.05)
talm.data.writer.ShardWriter._write_manifest = slow
from talm.cli.download_data import main
main(sys.argv[1:])
"""


def test_a_second_run_on_the_same_directory_is_refused(project: Path) -> None:
    args = ["tinyshakespeare", "--shard-size", "100000"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while not Path("ready").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert Path("ready").exists(), first.communicate()
        d = project / "data" / "tinyshakespeare" / "default"
        before = contents(d)
        assert len(json.loads(before["meta.json"])["shards"]) == 2
        for extra in ([], ["--overwrite"]):
            second = subprocess.run(
                [DOWNLOAD_DATA, *args, *extra], env=env, capture_output=True, text=True, timeout=60
            )
            assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
            assert f"is in use by download_data (pid {first.pid} on {socket.gethostname()}" in second.stderr
            assert contents(d) == before  # the first run's shards and manifest are untouched
        Path("go").touch()
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
    finally:
        first.kill()
    assert documents(d) == SHAKESPEARE.read_text(encoding="utf-8").split("\n\n")
    code = subprocess.run([DOWNLOAD_DATA, *args], env=env, capture_output=True, text=True, timeout=60)
    assert code.returncode == 0 and "already complete" in code.stdout  # the lock went with the process


def _delete(p: Path) -> None:
    p.unlink()


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-10])


def _overwrite_header(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[:16] = b"\0" * 16
    p.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "problem"),
    [(_delete, "is missing"), (_truncate, "(truncated?)"), (_overwrite_header, "has no valid .npy header")],
    ids=["deleted", "truncated", "header-overwritten"],
)
@pytest.mark.parametrize("shard", ["val_000000.npy", "train_000002.npy", "train_000004.npy"])
def test_a_damaged_shard_is_made_again_from_the_last_good_one(
    project: Path, capsys: pytest.CaptureFixture[str], damage: Any, problem: str, shard: str
) -> None:
    args = ["tinyshakespeare", "--shard-size", "100000"]
    assert run([*args, "--data-root", "clean"], capsys)[0] == 0
    shutil.copytree(project / "clean", project / "data")
    d = project / "data" / "tinyshakespeare" / "default"
    damage(d / shard)
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert "already complete" not in out and len(out.splitlines()) == 1
    assert f"resumed from the last good shard: shard {shard!r} " in out and problem in out
    assert contents(d) == contents(project / "clean" / "tinyshakespeare" / "default")  # byte-identical


def test_a_damaged_shard_without_a_recorded_position_needs_overwrite(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["tinyshakespeare", "--shard-size", "100000"]
    assert run(args, capsys)[0] == 0
    d = project / "data" / "tinyshakespeare" / "default"
    meta = json.loads((d / "meta.json").read_text())
    for s in meta["shards"]:  # as written before the manifest recorded a position per shard
        del s["resume"]
    (d / "meta.json").write_text(json.dumps(meta))
    _truncate(d / "train_000003.npy")
    before = contents(d)
    code, out, err = run(args, capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert "shard 'data/tinyshakespeare/default/train_000003.npy' is" in err and "(truncated?)" in err
    assert "pass --overwrite" in err
    assert contents(d) == before
    code, out, err = run([*args, "--overwrite"], capsys)
    assert code == 0, err
    assert documents(d) == SHAKESPEARE.read_text(encoding="utf-8").split("\n\n")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "latin1.txt",
            b"a" * 1_000_000 + b"\xe9t\xe9\n\nmore text\n",
            "'latin1.txt' is not UTF-8 text: invalid byte 0xe9 at byte offset 1000000 (line 1): convert it "
            "to UTF-8 first",
        ),
        (
            "early.txt",
            b"first\n\n\xffsecond\n",
            "'early.txt' is not UTF-8 text: invalid byte 0xff at byte offset 7 (line 3)",
        ),
        (
            "torn.jsonl",
            b'{"text": "one"}\n{"text": "two"}\n{"text": "thr',
            "'torn.jsonl' line 3 is cut off (a torn last line",
        ),
        (
            "broken.jsonl",
            b'{"text": "one"}\n{"text": two}\n{"text": "three"}\n',
            "'broken.jsonl' line 2 is not valid JSON (Expecting value, column 10): fix or delete that line",
        ),
    ],
    ids=["non-utf8-1MB-in", "non-utf8", "torn-jsonl", "invalid-json-line"],
)
def test_unreadable_data_files_say_which_file_where_and_the_fix(
    project: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes, message: str
) -> None:
    Path(name).write_bytes(content)
    code, out, err = run(["mine", "--data-files", name, "--val-tokens", "0", "--shard-size", "1000"], capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert message in err
    assert not (project / "data").exists()


NUM_PROC = """
import os, threading
from talm.data.config import DownloadConfig
from talm.data.prepare import prepare
cores = len(os.sched_getaffinity(0))
prepare(DownloadConfig(dataset="tinyshakespeare", num_proc=1, shard_size=20_000), progress=False)
encoders = [t for t in threading.enumerate() if t.name.startswith("talm-encode")]
print(len(encoders), len(os.sched_getaffinity(0)) == cores)
"""


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores"
)
def test_prepare_honours_num_proc_for_python_callers(project: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", NUM_PROC], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0 True"  # encoded on the calling thread alone; the process keeps its cores
