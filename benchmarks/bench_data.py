"""download_data end to end against the raw batch encoder and the original talm's approach.

    .venv/bin/python benchmarks/bench_data.py                 # 100 MB corpora, 3 rounds (~5 min on 2 cores)
    .venv/bin/python benchmarks/bench_data.py --mb 20 --rounds 2   # quicker, less precise
    .venv/bin/python benchmarks/bench_data.py --mb 250 --only web --no-original   # issue 12's target run

Builds two local corpora laid out like the Hub repos (parquet files with fineweb's schema, a README.md whose
`configs:` block maps config names to files): one of short documents (~150 bytes) as ./HuggingFaceFW/fineweb,
one of web-length documents (~4 KB) as ./HuggingFaceFW/fineweb-edu, each with a second config holding half the
files. For each corpus it measures, in the same run:
- the real pipeline: `download_data` as a subprocess (reading parquet through `datasets`, tokenizing on all
  cores, writing shards), its throughput from its own summary line, its wall time (the difference is process
  start-up: imports, tokenizer, opening the dataset), and its peak RSS (VmHWM of the process itself: wait4's
  ru_maxrss would include this benchmark's own memory, which Linux carries into a child at exec) on the half
  and the full corpus (memory must not grow with the corpus);
- the raw batch encoder: `Tokenizer.encode_batch` on the same texts already in memory, in the same batches;
- the original talm's approach, re-implemented: a 2-process `multiprocessing.Pool` whose `imap` (chunksize 16)
  calls a tiktoken-based tokenizer once per document, the tokenizer pickled into every chunk (it rode along in
  a `functools.partial`), on a prefix of the texts (it only tokenizes: no reading, no writing).
All three use the same vocabulary (tokenizers/base.json).

Method: this machine's CPU speed drifts by tens of percent within minutes, even idle, so one measurement of each
method, one after the other, compares different machines. Each method is measured `--rounds` times, interleaved
(round r runs the three methods in an order rotated by r, so each takes each position once in three rounds);
for each method the best round (max throughput: the least disturbed one) and the median are reported, and the
ratios are computed from the best rounds. The per-CPU-second figures (text per second of CPU time of all threads
and processes) are reported the same way: they do not depend on other jobs sharing the cores, but do on the
clock speed. Ratios are only meaningful within one run.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from talm.tokenizer.api import Tokenizer
from talm.tokenizer.formats import UNICODE_TO_BYTE

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tokenizers" / "base.json"
DOWNLOAD_DATA = str(Path(sys.executable).with_name("download_data"))
# Runs the download_data script and reports its own peak RSS (VmHWM) on stderr at exit.
PEAK_RSS_WRAPPER = """
import atexit, os, runpy, sys
def report():
    with open("/proc/self/status") as f:
        kb = next(line for line in f if line.startswith("VmHWM:")).split()[1]
    os.write(2, f"PEAK_RSS_KB {kb}\\n".encode())
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
FILES = 8  # parquet files per corpus


# ------------------------------------------------------------------------------------------------ corpora


def make_texts(total_mb: float, doc_bytes: int, seed: int) -> list[str]:
    """Documents of about `doc_bytes` (+-50%): windows of tiny-shakespeare at random places."""
    source = (ROOT / "tiny-shakespeare.txt").read_text(encoding="utf-8")
    rng = random.Random(seed)
    texts, total = [], 0
    while total < total_mb * 1e6:
        n = rng.randint(doc_bytes // 2, doc_bytes * 3 // 2)
        start = rng.randrange(0, len(source) - n)
        texts.append(source[start : start + n])
        total += n
    return texts


def write_corpus(repo: Path, texts: list[str]) -> None:
    """`repo` laid out like HuggingFaceFW/fineweb: sample-10BT = all files, CC-MAIN-2024-10 = the first half."""
    files_dir = repo / "sample" / "10BT"
    files_dir.mkdir(parents=True)
    per_file = -(-len(texts) // FILES)
    for i in range(FILES):
        chunk = texts[i * per_file : (i + 1) * per_file]
        n = len(chunk)
        table = pa.table(
            {
                "text": chunk,
                "id": [f"<urn:uuid:{i}-{k}>" for k in range(n)],
                "dump": ["CC-MAIN-2024-10"] * n,
                "url": [f"https://example.com/{i}/{k}" for k in range(n)],
                "date": ["2024-02-21T01:02:03Z"] * n,
                "file_path": [f"s3://commoncrawl/{i}.warc.gz"] * n,
                "language": ["en"] * n,
                "language_score": pa.array([0.9] * n, pa.float64()),
                "token_count": pa.array([len(t) // 4 for t in chunk], pa.int64()),
            }
        )
        pq.write_table(table, files_dir / f"{i:03d}_00000.parquet")
    half = [f"sample/10BT/{i:03d}_00000.parquet" for i in range(FILES // 2)]
    readme = ["---", "configs:", "- config_name: sample-10BT", "  data_files:", "  - split: train"]
    readme += [
        "    path: sample/10BT/*",
        "- config_name: CC-MAIN-2024-10",
        "  data_files:",
        "  - split: train",
    ]
    readme += ["    path:"] + [f"    - {p}" for p in half] + ["---", ""]
    (repo / "README.md").write_text("\n".join(readme), encoding="utf-8")


# ------------------------------------------------------------------------------------------------ measurements


def run_pipeline(workdir: Path, dataset: str, config: str, val_tokens: int) -> dict[str, float]:
    """download_data as users run it; returns its own throughput, wall time and peak RSS (from wait4)."""
    out = workdir / "out"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(workdir / "hf_home")}
    args = [
        sys.executable,
        "-c",
        PEAK_RSS_WRAPPER,
        DOWNLOAD_DATA,
        dataset,
        "--ds-sample",
        config,
        "-t",
        str(TOKENIZER),
        "--data-root",
        str(out),
        "--val-tokens",
        str(val_tokens),
    ]
    log_out, log_err = workdir / "stdout.txt", workdir / "stderr.txt"
    start = time.perf_counter()
    with open(log_out, "w") as fo, open(log_err, "w") as fe:
        proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=fo, stderr=fe)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: this child's CPU time
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    stdout = log_out.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"download_data failed: {log_err.read_text().strip()}")
    peak_kb = int(re.findall(r"PEAK_RSS_KB (\d+)", log_err.read_text())[-1])
    match = re.search(r"in ([\d.]+) s, ([\d,]+) tokens/s, ([\d.]+) MB/s", stdout)
    assert match, stdout
    totals = json.loads(next((out / dataset).glob("*/meta.json")).read_text())["totals"]
    tokens_per_s = float(match.group(2).replace(",", ""))
    seconds = totals["tokens"] / tokens_per_s  # more digits than the summary's seconds and MB/s
    return {
        "seconds": seconds,
        "tokens_per_s": tokens_per_s,
        "mb_per_s": totals["bytes"] / 1e6 / seconds,
        "wall": wall,
        "tokens": totals["tokens"],
        "rss_mb": peak_kb / 1024,
        # CPU time of the whole process, start-up included: robust to other jobs sharing the cores
        "mb_per_cpu_s": totals["bytes"] / 1e6 / (usage.ru_utime + usage.ru_stime),
    }


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, all its threads, and its reaped children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def batches_of(texts: list[str], batch_bytes: int = 4 << 20) -> list[list[str]]:
    out, current, size = [], [], 0
    for t in texts:
        current.append(t)
        size += len(t)
        if size >= batch_bytes:
            out.append(current)
            current, size = [], 0
    return out + ([current] if current else [])


def throughput(texts: list[str], tokens: int, seconds: float, cpu: float) -> dict[str, float]:
    """MB/s, tokens/s and MB per CPU-second of one timed run over `texts`."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "mb_per_s": n_bytes / 1e6 / seconds,
        "tokens_per_s": tokens / seconds,
        "mb_per_cpu_s": n_bytes / 1e6 / cpu,
    }


def run_read_only(workdir: Path, dataset: str, config: str) -> dict[str, float]:
    """What download_data's reading stage alone costs: the dataset streamed into Python texts in the same
    batches, nothing tokenized or written (the dataset is opened outside the timing)."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_HOME=str(workdir / "hf_home"))
    from talm.data.config import DownloadConfig
    from talm.data.sources import resolve_source
    from talm.data.streaming import TextStream

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        cfg = DownloadConfig(dataset=dataset, ds_sample=config, tokenizer_path=TOKENIZER)
        stream = TextStream(resolve_source(cfg))
        cpu = cpu_seconds()
        start = time.perf_counter()
        n_bytes = sum(int(batch.utf8_bytes.sum()) for batch in stream.batches())
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    finally:
        os.chdir(cwd)
    return {"mb_per_s": n_bytes / 1e6 / seconds, "mb_per_cpu_s": n_bytes / 1e6 / cpu}


def run_raw_encoder(texts: list[str]) -> dict[str, float]:
    tokenizer = Tokenizer.from_file(TOKENIZER)
    batches = batches_of(texts)
    tokenizer.encode_batch(batches[0][:100])  # build the engine outside the timing
    cpu = cpu_seconds()
    start = time.perf_counter()
    tokens = sum(len(a) + 1 for batch in batches for a in tokenizer.encode_batch(batch))
    return throughput(texts, tokens, time.perf_counter() - start, cpu_seconds() - cpu)


class OriginalTokenizer:
    """The original talm's tokenizer: tiktoken built from the vocabulary; pickles as its whole vocabulary (so
    every Pool chunk that carries it re-sends and rebuilds it)."""

    def __init__(self, ranks: dict[bytes, int], pattern: str, eot_id: int) -> None:
        self.ranks, self.pattern, self.eot_id = ranks, pattern, eot_id
        self._build()

    def _build(self) -> None:
        import tiktoken

        self.enc = tiktoken.Encoding(
            "original", pat_str=self.pattern, mergeable_ranks=self.ranks, special_tokens={}
        )

    def __getstate__(self) -> dict:
        return {"ranks": self.ranks, "pattern": self.pattern, "eot_id": self.eot_id}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._build()


def original_tokenize(tokenizer: OriginalTokenizer, doc: str) -> np.ndarray:
    tokens = [tokenizer.eot_id, *tokenizer.enc.encode_ordinary(doc)]
    return np.array(tokens).astype(np.uint16)


def original_tokenizer() -> OriginalTokenizer:
    document = json.loads(TOKENIZER.read_text(encoding="utf-8"))
    ranks = {bytes(UNICODE_TO_BYTE[c] for c in token): i for token, i in document["model"]["vocab"].items()}
    pattern = Tokenizer.from_file(TOKENIZER).pattern
    return OriginalTokenizer(ranks, pattern, Tokenizer.from_file(TOKENIZER).eot_id)


def run_original(texts: list[str]) -> dict[str, float]:
    tokenizer = original_tokenizer()
    work = functools.partial(original_tokenize, tokenizer)
    cpu = cpu_seconds()
    start = time.perf_counter()
    tokens = 0
    pool = mp.get_context("fork").Pool(2)
    for ids in pool.imap(work, texts, chunksize=16):
        tokens += len(ids)
    pool.close()
    pool.join()  # the workers are reaped: their CPU time is in RUSAGE_CHILDREN
    return throughput(texts, tokens, time.perf_counter() - start, cpu_seconds() - cpu)


def check_same_ids(texts: list[str]) -> bool:
    """The original's per-document ids equal talm's on a sample (same vocabulary, same BPE)."""
    ours = Tokenizer.from_file(TOKENIZER).encode_batch(texts)
    theirs = original_tokenizer()
    return all(np.array_equal(a, original_tokenize(theirs, t)[1:]) for a, t in zip(ours, texts, strict=True))


# ------------------------------------------------------------------------------------------------ rounds

METHODS = ("pipeline", "raw", "original")


def measure_interleaved(runners: dict[str, Callable[[], dict[str, float]]], rounds: int) -> dict[str, list]:
    """Each runner `rounds` times; round r runs them in METHODS order rotated by r, so speed drift of the
    machine hits every method alike instead of whichever happened to run during a slow spell."""
    methods = tuple(m for m in METHODS if m in runners)
    results: dict[str, list] = {m: [] for m in methods}
    for r in range(rounds):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for method in order:
            results[method].append(runners[method]())
            print(
                f"  round {r + 1}/{rounds} {method:<8} {results[method][-1]['mb_per_s']:6.2f} MB/s",
                flush=True,
            )
    return results


def best(runs: list[dict[str, float]], key: str = "mb_per_s") -> dict[str, float]:
    """The round with the highest `key`: the one least slowed by drift and other jobs."""
    return max(runs, key=lambda run: run[key])


def median(runs: list[dict[str, float]], key: str = "mb_per_s") -> float:
    return statistics.median(run[key] for run in runs)


def prefix_of(texts: list[str], mb: float) -> list[str]:
    out, size = [], 0
    for t in texts:
        if size >= mb * 1e6:
            break
        out.append(t)
        size += len(t)
    return out


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=100, help="size of each corpus in MB (default: 100)")
    parser.add_argument(
        "--original-mb",
        type=float,
        default=15,
        help="MB the original approach tokenizes per round (a prefix of the corpus: it is slow on short "
        "documents; default: 15)",
    )
    parser.add_argument("--no-original", action="store_true", help="leave out the original approach")
    parser.add_argument("--only", choices=["short", "web"], help="only this corpus (default: both)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds per method; ratios use the best (default: 3)",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    load_before = os.getloadavg()[0]
    print(
        f"{os.cpu_count()} cores; tokenizer {TOKENIZER.name}; corpora of {args.mb:g} MB, parquet in hub layout; "
        f"{args.rounds} interleaved rounds per method"
        + ("" if args.no_original else f"; original approach on the first {args.original_mb:g} MB"),
        flush=True,
    )
    corpora = [("short (~150 B)", "fineweb", 150), ("web (~4 KB)", "fineweb-edu", 4000)]
    if args.only:
        corpora = [c for c in corpora if c[0].startswith(args.only)]
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="talm-bench-data-") as tmp:
        workdir = Path(tmp)
        for label, dataset, doc_bytes in corpora:
            print(f"{label}:", flush=True)
            texts = make_texts(args.mb, doc_bytes, seed=doc_bytes)
            write_corpus(workdir / "HuggingFaceFW" / dataset, texts)
            val_tokens = int(args.mb * 10_000)  # 1M tokens for 100 MB: ~1% of the corpus
            half = run_pipeline(workdir, dataset, "CC-MAIN-2024-10", val_tokens)  # peak RSS only
            runners = {
                "pipeline": functools.partial(run_pipeline, workdir, dataset, "sample-10BT", val_tokens),
                "raw": functools.partial(run_raw_encoder, texts),
            }
            if not args.no_original:
                runners["original"] = functools.partial(run_original, prefix_of(texts, args.original_mb))
            runs = measure_interleaved(runners, args.rounds)
            read = run_read_only(workdir, dataset, "sample-10BT")
            same = check_same_ids(texts[:2000])
            rows.append((label, runs, half, read, same))
            del texts

    print(
        f"\n{time.perf_counter() - start:.0f} s; load average before: {load_before:.1f}, after: "
        f"{os.getloadavg()[0]:.1f} (other jobs on the cores skew wall time)"
    )
    print(f"throughput, MB of text per second: best of {args.rounds} interleaved rounds (median in brackets)")
    for label, runs, half, read, same in rows:
        pipe, raw = best(runs["pipeline"]), best(runs["raw"])
        med = {m: median(r) for m, r in runs.items()}
        rss_full = max(run["rss_mb"] for run in runs["pipeline"])
        total_mb = pipe["mb_per_s"] * pipe["seconds"]
        startup = statistics.median(run["wall"] - run["seconds"] for run in runs["pipeline"])
        print(f"{label}: same ids as the original tokenizer: {same}")
        print(
            f"    download_data {pipe['mb_per_s']:6.2f} ({med['pipeline']:5.2f}) MB/s, "
            f"{pipe['tokens_per_s']:,.0f} tokens/s; end to end incl. start-up {total_mb / pipe['wall']:.2f} MB/s"
        )
        print(f"    raw encode_batch {raw['mb_per_s']:6.2f} ({med['raw']:5.2f}) MB/s")
        print(
            f"    download_data / raw: {pipe['mb_per_s'] / raw['mb_per_s']:.0%} (medians "
            f"{med['pipeline'] / med['raw']:.0%}); end to end incl. start-up "
            f"{total_mb / pipe['wall'] / raw['mb_per_s']:.0%}"
        )
        if "original" in runs:
            orig = best(runs["original"])
            print(
                f"    original approach {orig['mb_per_s']:6.2f} ({med['original']:5.2f}) MB/s; download_data / "
                f"original {pipe['mb_per_s'] / orig['mb_per_s']:.1f}x"
            )
        print(
            f"    peak RSS {half['rss_mb']:.0f} MB on half the corpus, {rss_full:.0f} MB on all of it; "
            f"start-up (wall - pipeline time) {startup:.1f} s (median)"
        )
        pipe_cpu, raw_cpu = (best(runs[m], "mb_per_cpu_s")["mb_per_cpu_s"] for m in ("pipeline", "raw"))
        print(
            f"    per CPU-second (start-up included): download_data {pipe_cpu:.2f} MB, raw {raw_cpu:.2f} MB "
            f"({pipe_cpu / raw_cpu:.0%}); reading alone (parquet -> Python texts) {read['mb_per_s']:.1f} MB/s, "
            f"{read['mb_per_cpu_s']:.1f} MB per CPU-second ({raw_cpu / read['mb_per_cpu_s']:.0%} of the "
            "encoder's CPU time)"
        )
        methods = list(runs)
        per_round = [" / ".join(f"{runs[m][r]['mb_per_s']:.2f}" for m in methods) for r in range(args.rounds)]
        print(f"    every round, MB/s ({' / '.join(methods)}): " + "   ".join(per_round))
    print(
        "ratios = best-of-N of interleaved rounds, because the machine's speed drifts by tens of percent within "
        "minutes; targets: download_data >= 90% of raw on web-length documents, peak RSS <= 500 MB and flat"
    )


if __name__ == "__main__":
    main()
