"""`serve` under load: one streaming client alone against 8 at once, with the `openai` client.

    .venv/bin/python benchmarks/bench_serve.py                          # tiny preset's shape (the demo's), CPU
    .venv/bin/python benchmarks/bench_serve.py --src /path/to/other/src  # the same against another talm checkout

A chat model of a preset's shape (random weights, the base tokenizer with its role tokens; the end token's
output row zeroed so that every reply runs its full `max_tokens`, as the tests' endless model) is written to a
temporary models/NAME and served by the `serve` command in a subprocess (`--src`: the talm source it runs, to
compare versions). Each client sends --requests streaming chat requests one after the other, greedy, each with
its own question. Measured: tokens/s over all clients (tokens received / wall time from the first request to the
last token), time to first token (request sent -> first content chunk; median and p95), and whether every
reply equals the same question's reply with one client alone. Each round also says where the CPU went (Linux
only): milliseconds of CPU per 100 tokens in the clients' process, the server's and the processes it started
(its generation worker), so that a machine whose cores the clients saturate shows as such.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai
import torch

from talm.model.config import ModelConfig
from talm.model.gpt import GPT
from talm.tokenizer.api import Tokenizer
from talm.train.checkpoint import save_checkpoint
from talm.train.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "talm-original-base.json"
NAME = "bench"


def write_model(model_dir: Path, preset: str) -> None:
    """models/NAME as train_model lays it out, holding a random chat model that never ends a reply itself."""
    import shutil

    tokenizer = Tokenizer.from_file(TOKENIZER)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **PRESETS[preset].get("model", {})))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.05)
        model.lm_head.weight[tokenizer.eot_id].zero_()
    model_dir.mkdir(parents=True)
    shutil.copyfile(TOKENIZER, model_dir / "tokenizer.json")
    meta = {
        "step": 1,
        "tokens_seen": 1,
        "config": {"model": model.config.model_dump(mode="json")},
        "tokenizer": {"file": "tokenizer.json", "fingerprint": tokenizer.fingerprint},
    }
    for which in ("latest", "best"):
        save_checkpoint(model_dir / which, model, meta)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model_dir: Path, src: Path, threads: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(src)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    serve = "import sys; from talm.cli.serve import main; main(sys.argv[1:])"
    command = [sys.executable, "-c", serve, "-m", str(model_dir), "--port", str(port)]
    server = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=5).models.list()
            return server, url
        except openai.APIConnectionError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise SystemExit("the server did not start") from None
            time.sleep(0.2)


def cpu_ms(pid: int) -> float:
    """CPU time (user + system) of process `pid` so far, in ms; 0 where /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def server_processes(server: subprocess.Popen) -> dict[str, list[int]]:
    """The processes whose CPU time a round reports: the clients' (this one), the server's, and what it started."""
    try:
        tasks = Path(f"/proc/{server.pid}/task").iterdir()
        started = [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except OSError:
        started = []
    return {"clients": [os.getpid()], "server": [server.pid], "worker": started}


def cpu_use(processes: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(cpu_ms(pid) for pid in pids) for name, pids in processes.items()}


def ask(url: str, question: str, max_tokens: int) -> tuple[float, str, int]:
    """One streamed greedy reply: (seconds to its first content chunk, its text, its content chunks)."""
    client = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=600)
    sent = time.perf_counter()
    first, pieces = None, []
    stream = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    tokens = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - sent
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return first if first is not None else float("nan"), "".join(pieces), tokens


def run_clients(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` threads, each asking `requests` questions in turn: tokens/s in all, TTFTs, the replies."""
    ttfts: list[float] = []
    replies: dict[str, str] = {}
    tokens = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests):
            question = f"What is the capital of country number {c * requests + r}?"
            ttft, text, n = ask(url, question, max_tokens)
            with lock:
                ttfts.append(ttft)
                replies[question] = text
                tokens[0] += n

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts.sort()
    return {
        "tokens_per_s": tokens[0] / wall,
        "tokens": tokens[0],
        "wall": wall,
        "ttft_median": statistics.median(ttfts),
        "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        "replies": replies,
    }


def best(kept: dict | None, new: dict) -> dict:
    """The run with more tokens/s; its p95 TTFT the lower of the two (each the least disturbed by load)."""
    if kept is None:
        return new
    if kept["replies"] != new["replies"]:
        raise SystemExit("two runs of the same greedy requests gave different replies")
    winner = dict(max(kept, new, key=lambda r: r["tokens_per_s"]))
    winner["ttft_p95"] = min(kept["ttft_p95"], new["ttft_p95"])
    winner["ttft_median"] = min(kept["ttft_median"], new["ttft_median"])
    return winner


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model shape (default: tiny)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="requests per client, one after the other")
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument(
        "--threads", type=int, help="OMP_NUM_THREADS for the server (default: torch's choice)"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternate alone/together this many times, keep each one's best"
    )
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the talm source the server runs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "models" / NAME
        write_model(model_dir, args.preset)
        server, url = start_server(model_dir, args.src, args.threads)
        processes = server_processes(server)
        try:
            ask(url, "warm-up", 8)
            alone = together = None
            for _ in range(args.rounds):  # alternated, so that load on the machine falls on both alike
                # one client alone asks every question the concurrent clients will: the replies to compare with
                cpu = [cpu_use(processes)]
                one = run_clients(url, 1, args.clients * args.requests, args.max_tokens)
                cpu.append(cpu_use(processes))
                many = run_clients(url, args.clients, args.requests, args.max_tokens)
                cpu.append(cpu_use(processes))
                print(f"  round: 1 client {one['tokens_per_s']:,.0f} tokens/s, p95 TTFT {one['ttft_p95'] * 1e3:,.0f} ms; "
                      f"{args.clients} clients {many['tokens_per_s']:,.0f} tokens/s, p95 TTFT "
                      f"{many['ttft_p95'] * 1e3:,.0f} ms")  # fmt: skip
                for label, r, (before, after) in (
                    ("1 client", one, cpu[:2]),
                    (f"{args.clients} clients", many, cpu[1:]),
                ):
                    use = [f"{name} {(after[name] - before[name]) * 100 / r['tokens']:.0f}" for name in after]
                    print(f"    CPU ms per 100 tokens, {label}: {', '.join(use)} ({r['wall']:.1f} s wall)")
                alone = best(alone, one)
                together = best(together, many)
        finally:
            server.terminate()
            server.wait(timeout=30)
    same = alone["replies"] == together["replies"]  # the same questions, asked alone and concurrently
    print(
        f"{args.preset} preset's shape, {args.max_tokens} tokens per reply (greedy), server threads "
        f"{args.threads or 'default'}, source {args.src}"
    )
    for label, r in (("1 client", alone), (f"{args.clients} clients", together)):
        print(
            f"{label:>10}: {r['tokens']:,} tokens in {r['wall']:.1f} s = {r['tokens_per_s']:,.0f} tokens/s; time to "
            f"first token median {r['ttft_median'] * 1e3:,.0f} ms, p95 {r['ttft_p95'] * 1e3:,.0f} ms"
        )
    print(
        f"aggregate tokens/s {together['tokens_per_s'] / alone['tokens_per_s']:.2f}x one client alone; p95 time to "
        f"first token {together['ttft_p95'] / alone['ttft_p95']:.2f}x; same replies: {'yes' if same else 'NO'}"
    )


if __name__ == "__main__":
    main()
