"""The engines' own view of their load, for picking replicas.

The router counts the requests it has outstanding on each replica, but it is one of possibly
several router replicas (and clients may call the pool Services directly), so its count misses
load others put there. Every ``loadPollSeconds`` it reads each replica's ``/metrics`` and takes the
engine's queue: requests waiting plus running (vLLM ``vllm:num_requests_waiting`` and
``vllm:num_requests_running``; SGLang ``sglang:num_queue_reqs`` and ``sglang:num_running_reqs``).
What exceeds the router's own outstanding count is load from elsewhere, added to its count when it
compares replicas (llm-d's endpoint picker scores on the same gauges, scraped by the same means).
A reading that fails or is older than two poll intervals counts as no outside load, so a broken
scrape degrades to the router's own count, never to a replica wrongly avoided.
"""

from __future__ import annotations

import math

QUEUE_GAUGES = frozenset(
    {
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "sglang:num_queue_reqs",
        "sglang:num_running_reqs",
    }
)
STALE_INTERVALS = 2.0


def engine_queue(text: str) -> int | None:
    """Waiting plus running requests in a Prometheus text exposition (summed over series), or
    None when it has none of the queue gauges."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith(("vllm:num_requests_", "sglang:num_")):
            continue
        brace = line.find("{")
        name = line[:brace] if brace >= 0 else line.split(" ", 1)[0]
        if name not in QUEUE_GAUGES:
            continue
        rest = line[line.rfind("}") + 1 :] if brace >= 0 else line[len(name) :]
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if math.isfinite(value) and value >= 0:
            total += value
            found = True
    return round(total) if found else None


def outside_load(engine_total: int, own_inflight: int) -> int:
    """Requests on the engine that the router did not send (at least 0)."""
    return max(0, engine_total - own_inflight)
