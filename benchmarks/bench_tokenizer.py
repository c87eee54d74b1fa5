"""Tokenizer speed: training throughput and peak memory, batch-encode throughput, and fast ids == HF ids.

    .venv/bin/python benchmarks/bench_tokenizer.py                          # everything (~15 min on 2 cores)
    .venv/bin/python benchmarks/bench_tokenizer.py --prose-mb 20 --code-mb 10 --rounds 1   # quicker
    .venv/bin/python benchmarks/bench_tokenizer.py --sweep                  # also every code point in 11 contexts

1. Training, each run a fresh process timed from the outside (wall time including interpreter start-up and
   imports; peak RSS of the process and its children, from /proc VmHWM and RUSAGE_CHILDREN): the real
   `train_tokenizer` command (rustbpe, the default trainer) against a bare script that only builds the same HF
   pipeline and calls HF's trainer on the same file. Corpora: tiny-shakespeare at vocab 1000; --prose-mb MB
   of synthetic prose at vocab 4096; --code-mb MB of source code at vocab 32768. The two commands run in
   --rounds interleaved rounds (the order alternating), and the best and median of each are reported: this
   machine's speed drifts and other jobs share its cores, so only ratios within one run mean anything.
2. Batch encoding on all cores (this machine: 2) of short (~150 B) and web-length (~4 KB) documents cut from
   the prose corpus: HF `encode_batch` and `encode_batch_fast` against talm's `encode_batch` (tiktoken built
   from the same ranks, documents joined per thread, numpy arrays out).
3. Equality: talm's ids against HF's on every document of (2) plus multilingual / emoji / code / control text;
   with --sweep also every Unicode code point in 11 surrounding contexts. Any difference is printed and makes
   the script exit 1.

The prose corpus is random text, not repetitions: words drawn by their tiny-shakespeare frequencies, 3% of
them mutated (letters swapped, suffixes, numbers, capitals) into new words, lines of random length, speaker
lines and blank lines, so the trainer sees ~100k distinct words as on real text. The code corpus is the
Python sources (*.py) of this interpreter's standard library and installed packages, concatenated in path
order up to --code-mb MB (files that are not UTF-8 skipped).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "tiny-shakespeare.txt"
BIN = Path(sys.executable).parent

BARE_HF_SCRIPT = """
import sys
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from talm.tokenizer.formats import SPLIT_PATTERN  # a string constant; talm.tokenizer.formats imports no torch
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
])
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=int(sys.argv[2]) - 4, show_progress=False,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train([sys.argv[1]], trainer)
tok.save(sys.argv[3])
"""

EXTRA_TEXTS = [
    "naïve café — “quotes” «guillemets» ½ № ™ ﬁ ligatures",
    "日本語のテキスト、中文文本，한국어 텍스트。",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 keycap 1️⃣",
    "combining: e\u0301 a\u0308\u0323 Z\u0351\u0345\u036b",
    "controls: \x00\x01\x07\x1b[0m\x7f\x85\u2028\u2029 tabs\t\tand\r\nCRLF\r \u00a0nbsp\u3000ideographic",
    "def f(x):\n    return x**2  # 1234567890 3.14159\n\tif (a && b) { c++; }\n\n\n    \n",
    "specials as text: <|endoftext|> <|user|>hi<|assistant|> <|system|>",
    "Русский текст, ελληνικά, עברית, العربية, हिन्दी, ภาษาไทย, ქართული",
    "I'll we've they're it's DON'T WE'LL 'S 'sd 12345678 1,000,000.00",
]


# Runs a script or `-c CODE` and reports its own peak RSS at exit plus its children's (the rustbpe trainer runs
# in a child process). wait4's ru_maxrss cannot be used for the process itself: Linux carries the parent's
# high-water mark into the child at exec, so it would report the benchmark's own memory.
PEAK_RSS_WRAPPER = """
import atexit, os, resource, runpy, sys
def report():
    with open("/proc/self/status") as f:
        kb = int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
    kb += resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # an upper bound: both at their peaks
    os.write(2, f"PEAK_RSS_KB {kb}\\n".encode())
atexit.register(report)
target = sys.argv.pop(1)
if target == "-c":
    exec(compile(sys.argv.pop(1), "<bare>", "exec"), {"__name__": "__main__"})
else:
    sys.argv[0] = target
    runpy.run_path(target, run_name="__main__")
"""


def run_timed(cmd: list[str], cwd: Path) -> tuple[float, float, float, str]:
    """Wall seconds, CPU seconds (user + system), peak RSS in MB and stdout of a fresh process running `cmd`
    (a script path or "-c", CODE, and its arguments) under the same interpreter."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", PEAK_RSS_WRAPPER, *cmd], cwd=cwd, stdout=out, stderr=err
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:1] + cmd[2:])} failed ({proc.returncode}):\n{stderr}")
    peak_kb = int(re.findall(r"PEAK_RSS_KB (\d+)", stderr)[-1])
    return wall, usage.ru_utime + usage.ru_stime, peak_kb / 1024, stdout


def make_corpus(path: Path, megabytes: int, seed: int = 0) -> None:
    """Random text with tiny-shakespeare's word statistics plus mutated, new words (see the module doc)."""
    rng = np.random.default_rng(seed)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    words, counts = np.unique(re.findall(r"[A-Za-z']+|[^\sA-Za-z']", text), return_counts=True)
    probs = counts / counts.sum()
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    speakers = np.unique(re.findall(r"^([A-Z][A-Za-z ]+):$", text, flags=re.M))

    def mutate(word: str) -> str:
        kind = rng.integers(5)
        if kind == 0 and len(word) > 2:
            i = int(rng.integers(len(word) - 1))
            return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        if kind == 1:
            return word + "".join(rng.choice(alphabet, size=int(rng.integers(1, 4))))
        if kind == 2:
            return str(int(rng.integers(0, 10 ** int(rng.integers(1, 7)))))
        if kind == 3:
            return word.upper()
        return "".join(rng.choice(alphabet, size=int(rng.integers(2, 9))))

    mutations = np.array([mutate(w) for w in rng.choice(words, size=100_000, p=probs)], dtype=object)
    target = megabytes * 1_000_000
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            n = 200_000
            tokens = words[rng.choice(len(words), size=n, p=probs)].astype(object)
            mutated = rng.random(n) < 0.03
            tokens[mutated] = mutations[rng.integers(len(mutations), size=int(mutated.sum()))]
            seps = np.where(rng.random(n) < 0.11, "\n", " ").astype(object)
            starts = np.flatnonzero((seps == "\n") & (rng.random(n) < 0.08))
            seps[starts] = "\n\n" + rng.choice(speakers, size=len(starts)).astype(object) + ":\n"
            chunk = "".join(np.stack([tokens, seps], axis=1).ravel().tolist())
            f.write(chunk)
            written += len(chunk.encode("utf-8"))


def documents(text: str, size: int, limit_bytes: int) -> list[str]:
    """Cut text into documents of about `size` characters, at line ends."""
    docs, start = [], 0
    while start < len(text) and start < limit_bytes:
        end = text.find("\n", start + size)
        end = len(text) if end == -1 else end + 1
        docs.append(text[start:end])
        start = end
    return docs


def make_code_corpus(path: Path, megabytes: int) -> None:
    """This interpreter's Python sources (stdlib and installed packages), in path order, up to `megabytes`."""
    import sysconfig

    roots = sorted({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]})
    target, written = megabytes * 1_000_000, 0
    with open(path, "wb") as out:
        for root in roots:
            for source in sorted(Path(root).rglob("*.py")):
                try:
                    data = source.read_bytes()
                    data.decode("utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                out.write(data)
                written += len(data)
                if written >= target:
                    return


def bench_training(workdir: Path, runs: list[tuple[Path, int]], rounds: int) -> dict[str, list]:
    print(f"\n== training: best of {rounds} interleaved rounds (median in brackets); fresh process each ==")
    print("   wall time incl. start-up; peak RSS of the process and its children")
    header = f"{'text':<20}{'vocab':>6}  {'train_tokenizer (rustbpe)':>36}  {'bare HF trainer script':>36}"
    print(header + f"  {'speed-up':>8}")
    results = {}
    for text_file, vocab in runs:
        mb = text_file.stat().st_size / 1e6
        local = workdir / text_file.name
        if not local.exists():
            local.symlink_to(text_file)
        commands = {
            "talm": [
                str(BIN / "train_tokenizer"),
                *("-vs", str(vocab), "-n", "bench", "--force", "--text-file", local.name),
            ],
            "bare": ["-c", BARE_HF_SCRIPT, local.name, str(vocab), "bare.json"],
        }
        timings: dict[str, list] = {"talm": [], "bare": []}
        for r in range(rounds):
            for method in ("talm", "bare") if r % 2 == 0 else ("bare", "talm"):
                timings[method].append(run_timed(commands[method], workdir))
        cells = []
        for method in ("talm", "bare"):
            walls = [t[0] for t in timings[method]]
            rss = max(t[2] for t in timings[method])
            best = min(walls)
            cells.append(
                f"{best:6.2f} s ({statistics.median(walls):6.2f}) {mb / best:5.1f} MB/s {rss:5.0f} MB"
            )
        speedup = min(t[0] for t in timings["bare"]) / min(t[0] for t in timings["talm"])
        label = f"{text_file.name[:12]} {mb:.0f} MB"
        print(f"{label:<20}{vocab:>6}  {cells[0]:>36}  {cells[1]:>36}  {speedup:7.2f}x")
        print(
            "    every round, s (talm / bare): "
            + "   ".join(
                f"{a[0]:.2f} / {b[0]:.2f}" for a, b in zip(timings["talm"], timings["bare"], strict=True)
            )
        )
        print(f"    {timings['talm'][-1][3].strip()}")
        results[f"{text_file.name}:{vocab}"] = timings
    return results


def bench_encoding(tokenizer_path: Path, corpus: Path, encode_mb: int) -> list[str]:
    from talm.tokenizer.api import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    assert tok._tiktoken is not None, "the fast engine was refused for a freshly trained tokenizer"
    text = corpus.read_text(encoding="utf-8")
    half = encode_mb * 500_000
    sets = {
        "short ~150 B": documents(text, 150, half),
        "web ~4 KB": documents(text[half:], 4000, half),
    }
    print(
        f"\n== batch encoding, {os.cpu_count()} cores, tokenizer {tokenizer_path.name} (vocab {tok.vocab_size}) =="
    )
    hf = tok._hf  # HF's own tokenizer for the same file (special spellings as text, like talm's)
    all_docs = []
    for name, docs in sets.items():
        mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
        tok.encode_batch(docs[:1000])  # warm up thread pool and caches
        rows = []
        for engine, fn in [
            ("HF encode_batch", lambda d: hf.encode_batch(d, add_special_tokens=False)),
            ("HF encode_batch_fast", lambda d: hf.encode_batch_fast(d, add_special_tokens=False)),
            ("talm encode_batch", tok.encode_batch),
        ]:
            start = time.perf_counter()
            out = fn(docs)
            seconds = time.perf_counter() - start
            n_tokens = sum(len(x) for x in out)
            rows.append((engine, mb / seconds, n_tokens / seconds))
        print(f"{name}: {len(docs)} documents, {mb:.1f} MB")
        for engine, mbps, tps in rows:
            print(f"    {engine:<22}{mbps:7.2f} MB/s {tps / 1e6:6.2f} M tokens/s  ({mbps / rows[0][1]:.2f}x)")
        all_docs.extend(docs)
    return all_docs


def check_equality(tokenizer_path: Path, docs: list[str], sweep: bool) -> int:
    from talm.tokenizer.api import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    docs = docs + EXTRA_TEXTS + [a + b for a in EXTRA_TEXTS for b in EXTRA_TEXTS]
    if sweep:
        points = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
        for form in [
            "{}",
            "a{}b",
            " {}",
            "{} x",
            "1{}2",
            "\n{}\n",
            "{}{}",
            "'{}s",
            " {}\n",
            "x {}  y",
            "{}\u0301",
        ]:
            docs.extend(form.replace("{}", c) for c in points)
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    fast = tok.encode_batch(docs)
    ref = tok._hf.encode_batch_fast(docs, add_special_tokens=False)
    bad = [d for d, a, b in zip(docs, fast, ref, strict=True) if a.tolist() != b.ids]
    round_trip_bad = [d for d, a in zip(docs, fast, strict=True) if tok.decode(a) != d]
    print(
        f"\n== equality: {len(docs)} documents, {mb:.1f} MB{' (with the code-point sweep)' if sweep else ''} =="
    )
    print(f"    talm ids != HF ids: {len(bad)} documents; decode(encode(d)) != d: {len(round_trip_bad)}")
    for d in (bad + round_trip_bad)[:5]:
        print(f"    e.g. {d[:80]!r}")
    return len(bad) + len(round_trip_bad)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prose-mb", type=int, default=100, help="synthetic prose corpus (default: 100)")
    parser.add_argument("--code-mb", type=int, default=50, help="source code corpus (default: 50)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved training rounds (default: 3)")
    parser.add_argument("--encode-mb", type=int, default=40, help="text for the encoding runs (default: 40)")
    parser.add_argument("--sweep", action="store_true", help="also check every code point in 11 contexts")
    parser.add_argument("--keep", type=Path, help="keep the work directory here instead of a temp dir")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="talm-bench-tok-")) if args.keep is None else args.keep
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    try:
        prose = workdir / f"prose-{args.prose_mb}mb.txt"
        code = workdir / f"code-{args.code_mb}mb.txt"
        start = time.perf_counter()
        if not prose.exists():
            make_corpus(prose, args.prose_mb)
        if not code.exists():
            make_code_corpus(code, args.code_mb)
        print(f"corpora ready in {time.perf_counter() - start:.0f} s")
        # prose last: the encoding runs below use the tokenizer it wrote
        bench_training(workdir, [(SHAKESPEARE, 1000), (code, 32768), (prose, 4096)], args.rounds)
        tokenizer_path = workdir / "tokenizers" / "bench.json"
        docs = bench_encoding(tokenizer_path, prose, args.encode_mb)
        failures = check_equality(tokenizer_path, docs, args.sweep)
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
