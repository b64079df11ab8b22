"""The router's overhead bench: ``python -m tandem.router.bench --out bench/out/router.json``.

It starts 1 prefill, 1 decode and 1 mixed simulated worker (``tandem.sim.worker``, a very small time
scale, so the workers answer at once and only software overhead is measured) and the router, each
in its own process on loopback, as in production. The load generator is this process: per
concurrency level (1 and 4 by default) it sends a fixed number of requests per scenario with that
many requests in flight (closed loop), once directly to the workers, once through the router.

* ``mixed``: short prompts (below the split threshold). Direct: the mixed worker. Routed: the router,
  which sends them to the mixed worker.
* ``split``: long prompts (above the threshold). Direct: the load generator runs the two-step
  protocol itself (prefill worker, then decode worker). Routed: the router runs it.

Fairness:

* direct and routed batches alternate in rounds, so that drift (other processes on the machine) hits
  both alike;
* the load generator is a minimal HTTP/1.1 keep-alive client (request bytes encoded once, responses
  read by ``Content-Length``; only the prefill answer is parsed, for its ``kv_transfer_params``), so
  that its own CPU time takes as little as possible from the router and the workers: on a small
  machine the processes share the cores, which production (the router in its own pod) does not;
* the router's own CPU time per request (``router_cpu_ms``, from ``/proc``; Linux only) is reported
  beside the latencies: unlike them it hardly depends on what else the machine runs. The machine's
  core count and load average are in the report too.

``--pin`` puts the router on one core and everything else on the others, as when the router has
its own pod: then the routed split path can beat the direct one at concurrency 4 (the load
generator, sharing a core with the workers, runs the two-step protocol slower than the router), so
the default is the shared layout, whose figures are the conservative ones.

At concurrency 1 the added latency is the router's hop: its CPU time on the request's path plus the
extra loopback round trip. At higher concurrency the requests queue for the router's event loop and,
when the cores are fewer than the busy processes, the router's work also competes with the workers'
and the load generator's: read the numbers with ``cpus`` and ``loadavg``.

The added latency is the difference of the percentiles: ``p50(routed) - p50(direct)``. The top-level
``p50_added_ms`` / ``p99_added_ms`` are the worst over the scenarios and concurrency levels; each
level's own figures are under ``levels``. It stops by itself; it is a benchmark, not a test.
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

HOST = "127.0.0.1"
SPLIT_THRESHOLD = 1024
SHORT_PROMPT = "Tandem routes this short prompt to a mixed replica. " * 2  # ~26 tokens
LONG_PROMPT = "a long prompt goes through prefill then decode " * 180  # ~2160 tokens
PREFILL_KV = {"do_remote_decode": True, "do_remote_prefill": False}
GOAL_P50_ADDED_MS = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class HttpError(RuntimeError):
    pass


class Connection:
    """One keep-alive HTTP/1.1 connection of the load generator: a request is written in one go, an
    answer is read by its ``Content-Length`` (the workers and the router send one on non-streamed
    answers). Only as much HTTP as the bench needs."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: bytes) -> None:
        self.reader = reader
        self.writer = writer
        self.host = host

    @classmethod
    async def open(cls, address: tuple[str, int]) -> Connection:
        reader, writer = await asyncio.open_connection(*address)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer, f"{address[0]}:{address[1]}".encode())

    async def request(self, method: bytes, path: bytes, body: bytes = b"") -> tuple[int, bytes]:
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, path, self.host)
        if body:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        self.writer.write(head + b"\r\n" + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise HttpError(f"answer without Content-Length ({status})")
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


class Client:
    """One closed-loop user of the load generator: a connection per target, opened on first use."""

    def __init__(self) -> None:
        self.connections: dict[tuple[str, int], Connection] = {}

    async def post(self, address: tuple[str, int], body: bytes) -> bytes:
        conn = self.connections.get(address)
        if conn is None:
            conn = self.connections[address] = await Connection.open(address)
        status, answer = await conn.request(b"POST", b"/v1/completions", body)
        if status != 200:
            raise HttpError(f"{address} answered {status}: {answer[:500]!r}")
        return answer

    def close(self) -> None:
        for conn in self.connections.values():
            conn.close()
        self.connections.clear()


async def wait_healthy(address: tuple[str, int], deadline: float) -> None:
    while True:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, HttpError):
            conn = await Connection.open(address)
            try:
                status, _ = await conn.request(b"GET", b"/health")
            finally:
                conn.close()
            if status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{address} did not become healthy")
        await asyncio.sleep(0.1)


One = Callable[[Client], Awaitable[None]]


async def run_batch(count: int, clients: Sequence[Client], one: One) -> list[float]:
    """``count`` calls of ``one`` by ``len(clients)`` closed-loop users; each call's latency (s)."""
    latencies: list[float] = []
    remaining = count

    async def loop(client: Client) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            await one(client)
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(loop(client) for client in clients))
    return latencies


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (Linux ``/proc``); None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def scenarios(addresses: dict[str, tuple[str, int]], max_tokens: int) -> dict[str, tuple[One, One]]:
    """Per scenario, the (direct, routed) one-request calls; bodies encoded once."""
    short = json.dumps({"prompt": SHORT_PROMPT, "max_tokens": max_tokens}).encode()
    long_body = {"prompt": LONG_PROMPT, "max_tokens": max_tokens}
    long = json.dumps(long_body).encode()
    prefill = json.dumps({**long_body, "max_tokens": 1, "kv_transfer_params": PREFILL_KV}).encode()

    async def mixed_direct(client: Client) -> None:
        await client.post(addresses["mixed"], short)

    async def mixed_routed(client: Client) -> None:
        await client.post(addresses["router"], short)

    async def split_direct(client: Client) -> None:
        answer = json.loads(await client.post(addresses["prefill"], prefill))
        decode = {**long_body, "kv_transfer_params": answer["kv_transfer_params"]}
        await client.post(addresses["decode"], json.dumps(decode).encode())

    async def split_routed(client: Client) -> None:
        await client.post(addresses["router"], long)

    return {"mixed": (mixed_direct, mixed_routed), "split": (split_direct, split_routed)}


async def measure_level(
    args: argparse.Namespace,
    concurrency: int,
    calls: dict[str, tuple[One, One]],
    router_pid: int | None,
) -> dict[str, Any]:
    clients = [Client() for _ in range(concurrency)]
    try:
        for direct, routed in calls.values():  # warm-up: connections, caches
            await run_batch(concurrency * 8, clients, direct)
            await run_batch(concurrency * 8, clients, routed)
        results: dict[str, Any] = {}
        per_round = max(1, args.requests // args.rounds)
        for name, (direct, routed) in calls.items():
            direct_lat: list[float] = []
            routed_lat: list[float] = []
            cpu_before = process_cpu_seconds(router_pid) if router_pid else None
            for round_index in range(args.rounds):
                order = [(direct, direct_lat), (routed, routed_lat)]
                if round_index % 2:
                    order.reverse()
                for one, sink in order:
                    sink.extend(await run_batch(per_round, clients, one))
            cpu_after = process_cpu_seconds(router_pid) if router_pid else None
            results[name] = summarize(direct_lat, routed_lat)
            # The router is idle during the direct batches: its CPU time is the routed requests'.
            cpu = None
            if cpu_before is not None and cpu_after is not None:
                cpu = round((cpu_after - cpu_before) / len(routed_lat) * 1e3, 3)
            results[name]["router_cpu_ms"] = cpu
    finally:
        for client in clients:
            client.close()
    return {
        "p50_added_ms": max(results[n]["p50_added_ms"] for n in results),
        "p99_added_ms": max(results[n]["p99_added_ms"] for n in results),
        "scenarios": results,
    }


async def measure(
    args: argparse.Namespace, urls: dict[str, str], router_pid: int | None = None
) -> dict[int, dict[str, Any]]:
    addresses = {}
    for name, url in urls.items():
        host, _, port = url.removeprefix("http://").rpartition(":")
        addresses[name] = (host, int(port))
    deadline = time.monotonic() + 60
    for address in addresses.values():
        await wait_healthy(address, deadline)
    calls = scenarios(addresses, args.max_tokens)
    return {c: await measure_level(args, c, calls, router_pid) for c in args.concurrency}


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
    """The three workers and the router (last), each its own process."""
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
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(procs[-1].pid, cpus[:1])
        for proc in procs[:-1]:
            os.sched_setaffinity(proc.pid, cpus[1:])
        os.sched_setaffinity(0, cpus[1:])
    return urls, procs


def print_table(report: dict[str, Any]) -> None:
    header = f"{'conc':>4} {'scenario':<8} {'direct p50':>11} {'routed p50':>11} {'added p50':>10} "
    header += f"{'direct p99':>11} {'routed p99':>11} {'added p99':>10} {'router cpu':>11}"
    print(header)
    for level, result in report["levels"].items():
        for name, r in result["scenarios"].items():
            cpu = "n/a" if r["router_cpu_ms"] is None else f"{r['router_cpu_ms']:.3f}ms"
            print(
                f"{level:>4} {name:<8} {r['direct_p50_ms']:>9.3f}ms {r['routed_p50_ms']:>9.3f}ms "
                f"{r['p50_added_ms']:>8.3f}ms {r['direct_p99_ms']:>9.3f}ms {r['routed_p99_ms']:>9.3f}ms "
                f"{r['p99_added_ms']:>8.3f}ms {cpu:>11}"
            )
    load = " ".join(f"{x:.2f}" for x in report["loadavg_end"])
    print(
        f"router overhead (worst of {len(report['levels'])} levels): p50 +{report['p50_added_ms']:.3f} ms,"
        f" p99 +{report['p99_added_ms']:.3f} ms; {report['cpus']} cpus, load average {load}"
    )


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tandem.router.bench", description=__doc__.splitlines()[0])
    add_bench_arguments(p)
    return p


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="bench/out/router.json", help="where to write the JSON report")
    # 2,000: with 500, the worst p50 of one run ranged 0.97-2.08 ms on an idle 2-core machine
    # (sampling noise of a ~1 ms difference of two percentiles); with 2,000 it took ~25 s.
    p.add_argument("--requests", type=int, default=2000, help="requests per scenario, target and level")
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 4],
        help="concurrency levels: requests in flight (same direct and routed)",
    )
    p.add_argument("--pin", action="store_true", help="router on one core, the rest on the others")
    p.add_argument("--rounds", type=int, default=20, help="alternating direct/routed rounds")
    p.add_argument("--max-tokens", type=int, default=4, help="output tokens per request")
    p.add_argument("--time-scale", type=float, default=0.0001, help="simulated workers' time scale")


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run(args: argparse.Namespace) -> int:
    if any(c < 1 for c in args.concurrency):
        print("error: --concurrency must be positive", file=sys.stderr)
        return 2
    loadavg_start = _loadavg()
    with tempfile.TemporaryDirectory(prefix="tandem-router-bench-") as tmp:
        urls, procs = start_processes(args, Path(tmp))
        try:
            levels = asyncio.run(measure(args, urls, procs[-1].pid))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    worst_level, worst_scenario = max(
        ((c, n) for c, level in levels.items() for n in level["scenarios"]),
        key=lambda cn: levels[cn[0]]["scenarios"][cn[1]]["p50_added_ms"],
    )
    p50 = max(level["p50_added_ms"] for level in levels.values())
    report = {
        "p50_added_ms": p50,
        "p99_added_ms": max(level["p99_added_ms"] for level in levels.values()),
        "worst_p50": {"concurrency": worst_level, "scenario": worst_scenario},
        "goal_p50_added_ms": GOAL_P50_ADDED_MS,
        "goal_met": p50 < GOAL_P50_ADDED_MS,
        "concurrency": list(levels),
        "requests_per_scenario": args.requests,
        "max_tokens": args.max_tokens,
        "time_scale": args.time_scale,
        "split_threshold_tokens": SPLIT_THRESHOLD,
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg_start,
        "loadavg_end": _loadavg(),
        "levels": {str(c): level for c, level in levels.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_arg_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
