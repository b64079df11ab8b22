"""Request traces: loaders for the Azure LLM 2023 CSV and Mooncake JSONL formats, rate
scaling, time windows, and a seeded synthetic generator.

A trace is a list of :class:`TraceRequest` sorted by ``arrival`` (seconds from the start
of the trace).
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterable, Sequence
from datetime import date
from pathlib import Path
from typing import NamedTuple


class TraceRequest(NamedTuple):
    arrival: float  # seconds from the first request of the trace
    prompt_tokens: int
    output_tokens: int


_EPOCH_ORDINAL = date(2020, 1, 1).toordinal()


def _azure_seconds(stamp: str) -> float:
    """'2023-11-16 18:17:03.9799600' -> seconds since 2020-01-01 (naive; 7-digit fractions)."""
    day, _, clock = stamp.strip().partition(" ")
    hours, minutes, seconds = clock.split(":")
    days = date.fromisoformat(day).toordinal() - _EPOCH_ORDINAL  # keep floats small and precise
    return days * 86400.0 + int(hours) * 3600.0 + int(minutes) * 60.0 + float(seconds)


def _normalise(rows: Iterable[tuple[float, int, int]]) -> list[TraceRequest]:
    items = sorted(rows)
    if not items:
        return []
    t0 = items[0][0]
    return [TraceRequest(t - t0, max(1, p), max(1, o)) for t, p, o in items]


def load_azure_csv(path: str | Path) -> list[TraceRequest]:
    """Azure LLM inference trace 2023 (``TIMESTAMP,ContextTokens,GeneratedTokens``)."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [
            (_azure_seconds(r["TIMESTAMP"]), int(r["ContextTokens"]), int(r["GeneratedTokens"]))
            for r in reader
        ]
    return _normalise(rows)


def load_mooncake_jsonl(path: str | Path) -> list[TraceRequest]:
    """Mooncake trace (one JSON object per line: ``timestamp`` in ms, ``input_length``,
    ``output_length``; other keys such as ``hash_ids`` are ignored)."""
    rows: list[tuple[float, int, int]] = []
    with open(path) as handle:
        for line in handle:
            if line.strip():
                obj = json.loads(line)
                rows.append(
                    (float(obj["timestamp"]) / 1000.0, int(obj["input_length"]), int(obj["output_length"]))
                )
    return _normalise(rows)


def load_trace(path: str | Path, fmt: str = "auto") -> list[TraceRequest]:
    """Load ``path`` as ``azure``, ``mooncake`` or ``auto`` (by extension: .jsonl -> mooncake)."""
    if fmt == "auto":
        fmt = "mooncake" if str(path).endswith((".jsonl", ".json")) else "azure"
    if fmt == "azure":
        return load_azure_csv(path)
    if fmt == "mooncake":
        return load_mooncake_jsonl(path)
    raise ValueError(f"unknown trace format {fmt!r} (azure, mooncake, auto)")


def scale_rate(trace: Sequence[TraceRequest], factor: float) -> list[TraceRequest]:
    """Compress (factor > 1) or stretch (factor < 1) inter-arrival times: ``factor`` times
    the request rate, same requests."""
    if factor <= 0:
        raise ValueError(f"rate factor must be positive, got {factor}")
    return [r._replace(arrival=r.arrival / factor) for r in trace]


def window(
    trace: Sequence[TraceRequest], start_s: float = 0.0, duration_s: float | None = None
) -> list[TraceRequest]:
    """Requests arriving in ``[start_s, start_s + duration_s)``, re-based to start at 0."""
    end = math.inf if duration_s is None else start_s + duration_s
    return [r._replace(arrival=r.arrival - start_s) for r in trace if start_s <= r.arrival < end]


def synthetic(
    n: int,
    rate: float,
    mean_prompt: float,
    mean_output: float,
    *,
    sigma: float = 0.8,
    seed: int = 0,
    max_prompt: int = 16384,
    max_output: int = 2048,
) -> list[TraceRequest]:
    """``n`` Poisson arrivals at ``rate`` req/s with log-normal prompt and output lengths of
    the given means (``sigma`` is the log-space standard deviation). Deterministic in ``seed``."""
    rng = random.Random(seed)
    mu_shift = sigma * sigma / 2.0
    t = 0.0
    out: list[TraceRequest] = []
    for _ in range(n):
        p = min(max_prompt, max(1, round(rng.lognormvariate(math.log(mean_prompt) - mu_shift, sigma))))
        o = min(max_output, max(1, round(rng.lognormvariate(math.log(mean_output) - mu_shift, sigma))))
        out.append(TraceRequest(t, p, o))
        t += rng.expovariate(rate)
    return out


def duration(trace: Sequence[TraceRequest]) -> float:
    """Seconds from the first to the last arrival (0 for fewer than two requests)."""
    return trace[-1].arrival - trace[0].arrival if len(trace) > 1 else 0.0
