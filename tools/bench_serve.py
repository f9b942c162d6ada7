"""Load-test xllm-serve: Poisson arrivals at given request rates against a server this script starts itself.

    python tools/bench_serve.py [--artifact DIR | --model tiny|llama-100m] [--rates 1,4,16] [--requests N]
                                [--prompt-tokens N] [--max-tokens N] [--shared-prefix-tokens N]
                                [--soak SECONDS [--soak-rate R]] [--json PATH] [--server-arg=--opt=value ...]

The server is ``python -m xllm_compiler.serve`` on a free 127.0.0.1 port, over ``--artifact`` or an artifact
compiled here (``--model tiny``: tools/tiny-llama; ``llama-100m``: tools/random_checkpoint.py's preset; both
through the compile cache, so a second run reuses them). Every request streams seeded random token ids with
``ignore_eos``, so each makes exactly ``--max-tokens`` tokens. Figures per rate:

  throughput     generated tokens / seconds from the first request sent to the last one finished (and req/s)
  ttft           request sent -> first chunk with a token (p50, p99, ms)
  itl            between consecutive chunks of one request (p50, p99, ms)

``--shared-prefix-tokens N``: requests one after another (no queueing), each N shared tokens + 16 of its own,
against a server with prefix caching and one with ``--no-prefix-caching``; prints both TTFTs (p50/p99) and the
ratio. ``--soak S``: S seconds of Poisson load at ``--soak-rate``, the server's RSS sampled every second;
prints RSS first/last/max and requests sent, completed and lost (any error or truncated stream).
Timings on a shared machine are noisy: compare figures from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
SUFFIX_TOKENS = 16


@dataclass
class Result:
    """One request as the client saw it."""

    ok: bool
    sent: float
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# -- the server ------------------------------------------------------------------------------------------------


def build_artifact(model: str, max_seq_len: int, work: Path) -> Path:
    """tools/tiny-llama or the llama-100m preset, compiled (through the compile cache) for ``max_seq_len``."""
    import xllm_compiler

    if model == "tiny":
        source = ROOT / "tools" / "tiny-llama"
    else:
        source = work / "checkpoint"
        subprocess.run(
            [sys.executable, str(ROOT / "tools" / "random_checkpoint.py"), str(source), "--preset", model], check=True
        )
    out = work / f"{model}-artifact"
    prefill = [b for b in (64, 256, 1024) if b <= max_seq_len] or [max_seq_len]
    xllm_compiler.compile(
        source, out, decode_buckets=[1, 2, 4, 8, 16, 32], prefill_buckets=prefill, max_seq_len=max_seq_len, force=True
    )
    return out


@dataclass
class Server:
    url: str
    process: subprocess.Popen

    def rss_bytes(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss


@contextmanager
def running_server(artifact: Path, extra: list[str]) -> Iterator[Server]:
    """``python -m xllm_compiler.serve`` on a free port, ready (its /health answers 200); stopped after."""
    argv = [sys.executable, "-m", "xllm_compiler.serve", str(artifact), "--port", "0", "--log-level", "warning"]
    process = subprocess.Popen([*argv, *extra], stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        found = re.search(r"serving \S+ on (http://\S+)", line)
        if not found:
            raise SystemExit(f"bench_serve: the server did not start: {line}{process.stderr.read()}")
        server = Server(found.group(1), process)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("bench_serve: the server never became healthy")
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=60)


# -- the load --------------------------------------------------------------------------------------------------


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> Result:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    result = Result(ok=False, sent=time.perf_counter())
    finished = False
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                if choice.get("token_ids"):
                    result.token_times.append(time.perf_counter())
                    result.tokens += len(choice["token_ids"])
                finished = finished or choice.get("finish_reason") is not None
    except httpx.HTTPError:
        return result
    result.ok = finished and result.tokens == max_tokens
    return result


def http_client(limits: httpx.Limits | None = None) -> httpx.AsyncClient:
    """A client whose sockets send at once (TCP_NODELAY), as the server's do (serve/cli.py): a small write held
    back by Nagle's algorithm until the peer's delayed ACK (~40 ms on Linux) would be measured as latency."""
    transport = httpx.AsyncHTTPTransport(
        limits=limits or httpx.Limits(), socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    )
    return httpx.AsyncClient(timeout=httpx.Timeout(600.0), transport=transport)


def random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


async def poisson_load(
    url: str, rate: float, count: int | None, seconds: float | None, make_prompt, max_tokens: int, seed: int
) -> tuple[list[Result], float]:
    """Requests at exponential gaps of mean 1/rate, until ``count`` are sent or ``seconds`` pass; the results
    and the wall time from the first send to the last finish."""
    rng = random.Random(seed)
    tasks: list[asyncio.Task] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with http_client(limits) as client:
        start = time.perf_counter()
        while (count is None or len(tasks) < count) and (seconds is None or time.perf_counter() - start < seconds):
            tasks.append(asyncio.create_task(one_request(client, url, make_prompt(), max_tokens)))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def summarize(results: list[Result], wall: float) -> dict:
    ttfts = [r.ttft for r in results if r.ttft is not None]
    gaps = [g for r in results for g in r.gaps()]
    return {
        "requests": len(results),
        "completed": sum(r.ok for r in results),
        "requests_per_s": round(sum(r.ok for r in results) / wall, 3),
        "tokens_per_s": round(sum(r.tokens for r in results) / wall, 1),
        "ttft_p50_ms": ms(percentile(ttfts, 50)),
        "ttft_p99_ms": ms(percentile(ttfts, 99)),
        "itl_p50_ms": ms(percentile(gaps, 50)),
        "itl_p99_ms": ms(percentile(gaps, 99)),
    }


async def sequential(url: str, prompts: list[list[int]], max_tokens: int) -> list[Result]:
    async with http_client() as client:
        return [await one_request(client, url, p, max_tokens) for p in prompts]


async def warm_up(url: str, prompt_tokens: int, max_tokens: int, vocab: int, burst: int) -> None:
    """One request alone, then ``burst`` at once: the bucket graphs those step shapes use get built (a graph
    is built on its first use) before anything is measured."""
    rng = random.Random(-1)
    limits = httpx.Limits(max_connections=None)
    async with http_client(limits) as client:
        await one_request(client, url, random_prompt(rng, prompt_tokens, vocab), max_tokens)
        prompts = [random_prompt(rng, prompt_tokens, vocab) for _ in range(burst)]
        await asyncio.gather(*(one_request(client, url, p, max_tokens) for p in prompts))


def shared_prefix_run(artifact: Path, args, vocab: int) -> dict:
    """TTFT of requests sharing a long prefix, with prefix caching and without (one server each)."""
    rng = random.Random(args.seed)
    prefix = random_prompt(rng, args.shared_prefix_tokens, vocab)
    prompts = [prefix + random_prompt(rng, SUFFIX_TOKENS, vocab) for _ in range(args.requests + 1)]
    row = {}
    for label, extra in (("with_prefix_caching", []), ("without_prefix_caching", ["--no-prefix-caching"])):
        with running_server(artifact, [*args.server_arg, *extra]) as server:
            results = asyncio.run(sequential(server.url, prompts, args.max_tokens))[1:]  # the first fills the cache
        ttfts = [r.ttft for r in results if r.ttft is not None]
        row[label] = {
            "completed": sum(r.ok for r in results),
            "ttft_p50_ms": ms(percentile(ttfts, 50)),
            "ttft_p99_ms": ms(percentile(ttfts, 99)),
        }
    row["ttft_p50_ratio"] = round(
        row["without_prefix_caching"]["ttft_p50_ms"] / row["with_prefix_caching"]["ttft_p50_ms"], 2
    )
    return row


def soak_run(server: Server, args, vocab: int) -> dict:
    rng = random.Random(args.seed)
    samples: list[tuple[float, int]] = []

    async def sample_rss(stop: asyncio.Event) -> None:
        start = time.perf_counter()
        while not stop.is_set():
            samples.append((round(time.perf_counter() - start, 1), server.rss_bytes()))
            await asyncio.sleep(1.0)

    async def main() -> tuple[list[Result], float]:
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(stop))
        try:
            return await poisson_load(
                server.url,
                args.soak_rate,
                None,
                args.soak,
                lambda: random_prompt(rng, args.prompt_tokens, vocab),
                args.max_tokens,
                args.seed,
            )
        finally:
            stop.set()
            await sampler

    results, wall = asyncio.run(main())
    rss = [r for _, r in samples]
    return {
        **summarize(results, wall),
        "lost": sum(not r.ok for r in results),
        "rss_first_mb": round(rss[0] / 1e6, 1),
        "rss_last_mb": round(rss[-1] / 1e6, 1),
        "rss_max_mb": round(max(rss) / 1e6, 1),
        "rss_mb_over_time": [(t, round(r / 1e6, 1)) for t, r in samples],
    }


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n{title}")
    print("  ".join(f"{c:>14}" for c in columns))
    for row in rows:
        print("  ".join(f"{'-' if row.get(c) is None else row[c]!s:>14}" for c in columns))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--artifact", type=Path, help="serve this artifact (default: compile --model)")
    source.add_argument("--model", choices=("tiny", "llama-100m"), default="tiny")
    parser.add_argument("--rates", default="1,4,16", help="request rates per second, comma-separated")
    parser.add_argument("--requests", type=int, default=64, help="requests per rate (and per prefix run)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--shared-prefix-tokens", type=int, help="also run the shared-prefix TTFT comparison")
    parser.add_argument("--soak", type=float, metavar="SECONDS", help="also soak the server for SECONDS")
    parser.add_argument("--soak-rate", type=float, default=4.0, help="request rate of the soak (default 4/s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every figure to PATH")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="an xllm-serve option, e.g. --server-arg=--max-num-seqs=16"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from xllm_compiler.artifact.manifest import read_manifest

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as work:
        needed = max(args.prompt_tokens, (args.shared_prefix_tokens or 0) + SUFFIX_TOKENS) + args.max_tokens
        artifact = args.artifact or build_artifact(args.model, max(needed, 256), Path(work))
        vocab = read_manifest(artifact, verify=False).model.vocab_size
        report: dict = {"artifact": str(artifact), "cpu_count": os.cpu_count(), "rates": []}
        with running_server(artifact, args.server_arg) as server:
            asyncio.run(warm_up(server.url, args.prompt_tokens, args.max_tokens, vocab, min(args.requests, 32)))
            for i, rate in enumerate(float(r) for r in args.rates.split(",") if r.strip()):
                rng = random.Random(args.seed + i)
                results, wall = asyncio.run(
                    poisson_load(
                        server.url,
                        rate,
                        args.requests,
                        None,
                        lambda rng=rng: random_prompt(rng, args.prompt_tokens, vocab),
                        args.max_tokens,
                        args.seed + i,
                    )
                )
                report["rates"].append({"rate": rate, **summarize(results, wall)})
            if args.soak:
                report["soak"] = soak_run(server, args, vocab)
        if args.shared_prefix_tokens:
            report["shared_prefix"] = shared_prefix_run(artifact, args, vocab)
    columns = [
        "rate",
        "completed",
        "requests_per_s",
        "tokens_per_s",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "itl_p50_ms",
        "itl_p99_ms",
    ]
    print_table(f"{args.prompt_tokens}-token prompts, {args.max_tokens} new tokens each", report["rates"], columns)
    if "shared_prefix" in report:
        prefix = report["shared_prefix"]
        rows = [{"server": k, **v} for k, v in prefix.items() if isinstance(v, dict)]
        print_table(
            f"shared {args.shared_prefix_tokens}-token prefix, one request at a time",
            rows,
            ["server", "completed", "ttft_p50_ms", "ttft_p99_ms"],
        )
        print(f"TTFT p50 without / with prefix caching: {prefix['ttft_p50_ratio']}x")
    if "soak" in report:
        soak = report["soak"]
        print(
            f"\nsoak {args.soak:g} s at {args.soak_rate:g}/s: {soak['requests']} sent, {soak['completed']} completed, "
            f"{soak['lost']} lost; RSS {soak['rss_first_mb']} -> {soak['rss_last_mb']} MB (max {soak['rss_max_mb']})"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
