"""A real Prometheus scrapes a simulated worker on loopback and sees vLLM's metrics.

Needs ``/usr/bin/prometheus`` (Debian: ``apt-get install --no-install-recommends prometheus``); skipped
without it. Self-contained: its own Prometheus process, config, TSDB directory and port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tandem.sim.worker import SimWorker, WorkerSettings, start_server
from tandem.sim.worker_engine import Role

PROMETHEUS = Path("/usr/bin/prometheus")
MODEL_NAME = "sim-llama"

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not PROMETHEUS.exists(), reason="needs /usr/bin/prometheus (apt-get install prometheus)"
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def worker_url() -> AsyncIterator[str]:
    settings = WorkerSettings(time_scale=0.02, served_model_name=MODEL_NAME, role=Role.DECODE)
    runner, port = await start_server(SimWorker(settings), "127.0.0.1", 0)
    yield f"127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def prometheus(worker_url: str, tmp_path: Path) -> AsyncIterator[str]:
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: sim-worker\n"
        "    static_configs:\n"
        f"      - targets: ['{worker_url}']\n"
    )
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        str(PROMETHEUS),
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
        stdout=log,
        stderr=log,
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(url + "/-/ready", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            break
                if proc.returncode is not None:
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("Prometheus did not become ready: " + (tmp_path / "prometheus.log").read_text())
        if proc.returncode is not None:
            pytest.fail("Prometheus exited: " + (tmp_path / "prometheus.log").read_text())
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


async def query(session: aiohttp.ClientSession, prom: str, promql: str) -> list[dict[str, Any]]:
    async with session.get(prom + "/api/v1/query", params={"query": promql}) as resp:
        body = await resp.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def test_prometheus_scrapes_vllm_metrics(worker_url: str, prometheus: str) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for _ in range(4):
            body = {"model": MODEL_NAME, "prompt": list(range(100)), "max_tokens": 5}
            async with session.post(f"http://{worker_url}/v1/completions", json=body) as resp:
                assert resp.status == 200

        expected = {
            "vllm:prompt_tokens_total": 400.0,
            "vllm:generation_tokens_total": 20.0,
            "vllm:time_to_first_token_seconds_count": 4.0,
            "vllm:e2e_request_latency_seconds_count": 4.0,
            'vllm:request_success_total{finished_reason="length"}': 4.0,
            "vllm:num_requests_running": 0.0,
        }
        seen: dict[str, list[dict[str, Any]]] = {}
        for _ in range(150):
            seen = {q: await query(session, prometheus, q) for q in expected}
            if all(
                r and float(r[0]["value"][1]) == v
                for (q, v), r in zip(expected.items(), seen.values(), strict=True)
            ):
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail(f"Prometheus never saw the expected values: {seen}")

        (series,) = seen["vllm:prompt_tokens_total"]
        assert series["metric"]["model_name"] == MODEL_NAME
        assert series["metric"]["engine"] == "0"
        assert series["metric"]["job"] == "sim-worker"
        # histogram buckets arrive with their `le` labels and work in histogram_quantile
        p50 = await query(
            session,
            prometheus,
            "histogram_quantile(0.5, sum by (le) (vllm:time_to_first_token_seconds_bucket))",
        )
        assert p50 and float(p50[0]["value"][1]) > 0
        info = await query(session, prometheus, "vllm:cache_config_info")
        assert info and int(info[0]["metric"]["num_gpu_blocks"]) > 0
