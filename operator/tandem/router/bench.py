"""The router's overhead bench: ``python -m tandem.router.bench --out bench/out/router.json``.

It starts 1 prefill, 1 decode and 1 mixed simulated worker (``tandem.sim.worker``, a very small time
scale) and the router, each in its own process on loopback, then sends a fixed number of requests
per scenario twice at the same concurrency: once directly to the workers, once through the router.

* ``mixed``: short prompts (below the split threshold). Direct: the mixed worker. Routed: the router,
  which sends them to the mixed worker.
* ``split``: long prompts (above the threshold). Direct: the load generator runs the two-step
  protocol itself (prefill worker, then decode worker). Routed: the router runs it.

Direct and routed batches alternate in rounds so that drift (other processes on the machine) hits
both alike. The added latency is the difference of the percentiles: ``p50(routed) - p50(direct)``.
The top-level ``p50_added_ms`` / ``p99_added_ms`` are the worse of the two scenarios. It stops by
itself; it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

HOST = "127.0.0.1"
SPLIT_THRESHOLD = 1024
SHORT_PROMPT = "Tandem routes this short prompt to a mixed replica. " * 2  # ~26 tokens
LONG_PROMPT = "a long prompt goes through prefill then decode " * 180  # ~2160 tokens
PREFILL_KV = {"do_remote_decode": True, "do_remote_prefill": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def wait_healthy(session: aiohttp.ClientSession, url: str, deadline: float) -> None:
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url + "/health") as resp:
                if resp.status == 200:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become healthy")
        await asyncio.sleep(0.1)


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}: {await resp.text()}")
        answer: dict[str, Any] = await resp.json()
        return answer


async def run_batch(count: int, concurrency: int, one: Callable[[], Awaitable[None]]) -> list[float]:
    """``count`` calls of ``one`` by ``concurrency`` closed-loop workers; each call's latency (s)."""
    latencies: list[float] = []
    remaining = count

    async def loop() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            await one()
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return latencies


async def measure(args: argparse.Namespace, urls: dict[str, str]) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        deadline = time.monotonic() + 60
        for url in urls.values():
            await wait_healthy(session, url, deadline)
        short = {"prompt": SHORT_PROMPT, "max_tokens": args.max_tokens}
        long = {"prompt": LONG_PROMPT, "max_tokens": args.max_tokens}

        async def mixed_direct() -> None:
            await post(session, urls["mixed"], short)

        async def mixed_routed() -> None:
            await post(session, urls["router"], short)

        async def split_direct() -> None:
            answer = await post(
                session, urls["prefill"], {**long, "max_tokens": 1, "kv_transfer_params": PREFILL_KV}
            )
            await post(session, urls["decode"], {**long, "kv_transfer_params": answer["kv_transfer_params"]})

        async def split_routed() -> None:
            await post(session, urls["router"], long)

        scenarios = {"mixed": (mixed_direct, mixed_routed), "split": (split_direct, split_routed)}
        # warm-up: connections, caches
        for direct, routed in scenarios.values():
            await run_batch(args.concurrency * 4, args.concurrency, direct)
            await run_batch(args.concurrency * 4, args.concurrency, routed)
        results: dict[str, Any] = {}
        per_round = max(1, args.requests // args.rounds)
        for name, (direct, routed) in scenarios.items():
            direct_lat: list[float] = []
            routed_lat: list[float] = []
            for round_index in range(args.rounds):
                order = [(direct, direct_lat), (routed, routed_lat)]
                if round_index % 2:
                    order.reverse()
                for one, sink in order:
                    sink.extend(await run_batch(per_round, args.concurrency, one))
            results[name] = summarize(direct_lat, routed_lat)
        return results


def summarize(direct: list[float], routed: list[float]) -> dict[str, Any]:
    def ms(value: float) -> float:
        return round(value * 1e3, 3)

    out = {
        "requests": len(routed),
        "direct_p50_ms": ms(percentile(direct, 50)),
        "direct_p99_ms": ms(percentile(direct, 99)),
        "routed_p50_ms": ms(percentile(routed, 50)),
        "routed_p99_ms": ms(percentile(routed, 99)),
        "direct_mean_ms": ms(statistics.fmean(direct)),
        "routed_mean_ms": ms(statistics.fmean(routed)),
    }
    out["p50_added_ms"] = round(out["routed_p50_ms"] - out["direct_p50_ms"], 3)
    out["p99_added_ms"] = round(out["routed_p99_ms"] - out["direct_p99_ms"], 3)
    return out


def start_processes(
    args: argparse.Namespace, workdir: Path
) -> tuple[dict[str, str], list[subprocess.Popen[bytes]]]:
    python = sys.executable
    procs: list[subprocess.Popen[bytes]] = []
    urls: dict[str, str] = {}
    pools = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for role in ("prefill", "decode", "mixed"):
        port = free_port()
        cmd = [python, "-m", "tandem.sim.worker", "--role", role, "--host", HOST, "--port", str(port)]
        cmd += ["--time-scale", str(args.time_scale), "--log-level", "WARNING", "--engine-id", role]
        procs.append(subprocess.Popen(cmd, env=env))
        urls[role] = f"http://{HOST}:{port}"
        pools.append(
            {"name": role, "role": role, "service": role, "port": port, "endpoints": [f"{HOST}:{port}"]}
        )
    config = {"model": "llama-3.1-8b", "pools": pools, "splitThresholdTokens": SPLIT_THRESHOLD}
    config_path = workdir / "router.json"
    config_path.write_text(json.dumps(config))
    port = free_port()
    cmd = [python, "-m", "tandem.router", "--config", str(config_path), "--host", HOST, "--port", str(port)]
    procs.append(subprocess.Popen([*cmd, "--log-level", "WARNING"], env=env))
    urls["router"] = f"http://{HOST}:{port}"
    return urls, procs


def print_table(results: dict[str, Any]) -> None:
    header = f"{'scenario':<8} {'requests':>8} {'direct p50':>11} {'routed p50':>11} {'added p50':>10} "
    header += f"{'direct p99':>11} {'routed p99':>11} {'added p99':>10}"
    print(header)
    for name in ("mixed", "split"):
        r = results[name]
        print(
            f"{name:<8} {r['requests']:>8} {r['direct_p50_ms']:>9.3f}ms {r['routed_p50_ms']:>9.3f}ms "
            f"{r['p50_added_ms']:>8.3f}ms {r['direct_p99_ms']:>9.3f}ms {r['routed_p99_ms']:>9.3f}ms "
            f"{r['p99_added_ms']:>8.3f}ms"
        )
    print(f"router overhead: p50 +{results['p50_added_ms']:.3f} ms, p99 +{results['p99_added_ms']:.3f} ms")


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tandem.router.bench", description=__doc__.splitlines()[0])
    add_bench_arguments(p)
    return p


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="bench/out/router.json", help="where to write the JSON report")
    p.add_argument("--requests", type=int, default=500, help="requests per scenario and target")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (same direct and routed)")
    p.add_argument("--rounds", type=int, default=10, help="alternating direct/routed rounds")
    p.add_argument("--max-tokens", type=int, default=4, help="output tokens per request")
    p.add_argument("--time-scale", type=float, default=0.0001, help="simulated workers' time scale")


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="tandem-router-bench-") as tmp:
        urls, procs = start_processes(args, Path(tmp))
        try:
            results = asyncio.run(measure(args, urls))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    worst = max(("mixed", "split"), key=lambda n: results[n]["p50_added_ms"])
    report = {
        "p50_added_ms": max(results["mixed"]["p50_added_ms"], results["split"]["p50_added_ms"]),
        "p99_added_ms": max(results["mixed"]["p99_added_ms"], results["split"]["p99_added_ms"]),
        "worst_p50_scenario": worst,
        "goal_p50_added_ms": 2.0,
        "concurrency": args.concurrency,
        "requests_per_scenario": args.requests,
        "max_tokens": args.max_tokens,
        "time_scale": args.time_scale,
        "split_threshold_tokens": SPLIT_THRESHOLD,
        "scenarios": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table({**results, **report})
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_arg_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
