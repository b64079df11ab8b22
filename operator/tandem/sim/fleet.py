"""Discrete-event, iteration-level fleet simulator (continuous batching).

Pools of prefill, decode and mixed instances, each instance ``tp`` devices of one catalog
accelerator, serve a trace. Iteration times come from :mod:`tandem.perf.model`.

* A **prefill** instance runs FCFS prefill iterations of up to ``max_batch_tokens`` prompt
  tokens (long prompts are chunked). The first token is emitted when a prompt's prefill
  ends (TTFT); the KV cache then moves to a decode instance over the KV link
  (layer-wise pipelined: setup plus the part the prefill could not hide).
* A **decode** instance admits a request when its KV reservation (prompt + output tokens)
  fits and runs decode steps for its whole batch.
* A **mixed** instance does both with chunked prefill (Sarathi-style): every iteration
  carries all running decodes plus prefill chunks filling the token budget, so decodes
  that share an iteration with a prefill chunk take that iteration's time (interference).

Speed: a decode-only stretch is not simulated token by token. An instance plans a
*segment* up to its next completion in closed form (step time is piecewise linear in the
growing context) and only truncates it, at the next step boundary, when new work arrives.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import time as wallclock
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tandem.perf.catalog import Accelerator
from tandem.perf.model import PerfProfile, build_profile, kv_transfer_seconds
from tandem.perf.models import ModelArch
from tandem.planner.lengths import BUCKETS as PROMPT_BUCKETS
from tandem.router.metrics import TOKEN_BUCKETS as ROUTER_PROMPT_BUCKETS
from tandem.sim.policies import (
    AutoscalePolicy,
    ObservesClients,
    PoolObservation,
    PoolState,
    Role,
    RouterPolicy,
    TunesRouting,
)
from tandem.sim.trace import TraceRequest
from tandem.sim.worker_metrics import TTFT_BUCKETS

DEFAULT_BUDGET: dict[str, int] = {"prefill": 8192, "mixed": 2048, "decode": 0}
# Per-device NIC for P->D KV transfer: 400 Gb/s InfiniBand = 50 GB/s, one per device (DGX H100).
DEFAULT_NIC_GBS_PER_DEVICE = 50.0


@dataclass(frozen=True)
class PoolSpec:
    """A pool of identical instances. ``price_per_hour`` (per device) overrides the catalog."""

    name: str
    role: Role
    accelerator: Accelerator
    tp: int
    replicas: int
    min_replicas: int = 1
    max_replicas: int = 64
    max_batch_tokens: int | None = None
    max_seqs: int = 256
    price_per_hour: float | None = None

    @property
    def device_price(self) -> float:
        return self.accelerator.price_per_hour if self.price_per_hour is None else self.price_per_hour

    @property
    def hourly_cost(self) -> float:
        """USD per hour for the pool at its configured replica count."""
        return self.replicas * self.tp * self.device_price


@dataclass(frozen=True)
class FleetSpec:
    model: ModelArch
    pools: tuple[PoolSpec, ...]
    kv_link_gbs: float | None = None  # None: 50 GB/s per device of the smaller instance
    pipelined_kv: bool = True

    def hourly_cost(self) -> float:
        return sum(p.hourly_cost for p in self.pools)

    def describe(self) -> str:
        return " + ".join(
            f"{p.replicas}x{p.role}:{p.accelerator.name}/tp{p.tp}" for p in self.pools if p.replicas
        )


@dataclass(frozen=True)
class SLO:
    """Per-request service levels (seconds); a request meets the SLO when both hold
    (DistServe's attainment, arXiv 2401.09670 Sec. 2)."""

    ttft_s: float
    itl_s: float
    attainment_target: float = 0.9


@dataclass(frozen=True)
class SimConfig:
    autoscale_interval_s: float = 30.0
    startup_delay_s: float = 120.0
    progress_every: int = 20000  # events between progress callbacks
    # Where a split request's first token reaches the client. True (default): from the decode
    # instance, after the KV transfer and its first decode step, as with vLLM's P/D proxy and
    # llm-d, where the prefill instance runs with max_tokens=1 and its token is discarded.
    # False: at the end of prefill, as DistServe accounts TTFT (arXiv 2401.09670). Either way
    # a pool's own TTFT metrics are its engine's: a prefill instance's at the end of its
    # prefill (vLLM's time_to_first_token_seconds of the max_tokens=1 request), and the
    # client's reach policies that read them (`ObservesClients`).
    ttft_on_decode: bool = True


@dataclass
class RequestResult:
    arrival: float
    prompt_tokens: int
    output_tokens: int
    path: str  # "mixed", "split" or "dropped"
    ttft: float | None
    mean_itl: float | None
    e2e: float | None

    def meets(self, slo: SLO) -> bool:
        if self.ttft is None or self.e2e is None or self.ttft > slo.ttft_s:
            return False
        return self.mean_itl is None or self.mean_itl <= slo.itl_s


@dataclass
class SimResult:
    fleet: FleetSpec
    slo: SLO
    requests: list[RequestResult]
    simulated_seconds: float
    trace_seconds: float
    wall_seconds: float
    device_hours: float
    cost: float
    timelines: dict[str, list[tuple[float, int, int]]]  # pool -> (t, ready, total)
    events: int = 0
    # (t, split threshold) whenever an autoscaler that TunesRouting moved it (first: the start)
    split_thresholds: list[tuple[float, int]] = field(default_factory=list)
    # one (created, stopped, USD per hour) per instance: its bill
    spans: list[tuple[float, float, float]] = field(default_factory=list)

    def cost_from(self, start: float) -> float:
        """USD billed from ``start`` seconds to the end of the run."""
        return sum(max(0.0, stop - max(start, t0)) / 3600.0 * price for t0, stop, price in self.spans)

    def after(self, start: float) -> tuple[float, float]:
        """(SLO attainment, USD per 1,000 SLO-met requests) of the requests arriving from
        ``start`` seconds on, against the bill from then: the run once its start-up is over."""
        late = [r for r in self.requests if r.arrival >= start]
        met = sum(1 for r in late if r.meets(self.slo))
        attainment = met / len(late) if late else 1.0
        return attainment, (self.cost_from(start) / met * 1000.0 if met else math.inf)

    def windows(self, window_s: float) -> list[float]:
        """SLO attainment of the requests arriving in each ``window_s``-long window of the
        run, in order (windows without arrivals left out): the attainment an SLO judged per
        window sees, where the whole run's can trade a bad window for good ones."""
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        counts: dict[int, list[int]] = {}
        for r in self.requests:
            seen = counts.setdefault(int(r.arrival // window_s), [0, 0])
            seen[0] += r.meets(self.slo)
            seen[1] += 1
        return [met / total for _, (met, total) in sorted(counts.items())]

    @property
    def completed(self) -> int:
        return sum(1 for r in self.requests if r.e2e is not None)

    @property
    def slo_met(self) -> int:
        return sum(1 for r in self.requests if r.meets(self.slo))

    @property
    def slo_attainment(self) -> float:
        return self.slo_met / len(self.requests) if self.requests else 1.0

    @property
    def goodput(self) -> float:
        """SLO-met requests per second of trace."""
        return self.slo_met / self.trace_seconds if self.trace_seconds > 0 else 0.0

    @property
    def cost_per_1k_good(self) -> float:
        met = self.slo_met
        return self.cost / met * 1000.0 if met else math.inf

    def summary(self) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float | None:
            if not values:
                return None
            values = sorted(values)
            return values[min(len(values) - 1, int(q * len(values)))]

        ttfts = [r.ttft for r in self.requests if r.ttft is not None]
        itls = [r.mean_itl for r in self.requests if r.mean_itl is not None]
        e2es = [r.e2e for r in self.requests if r.e2e is not None]
        return {
            "fleet": self.fleet.describe(),
            "requests": len(self.requests),
            "completed": self.completed,
            "split_fraction": (sum(1 for r in self.requests if r.path == "split") / len(self.requests))
            if self.requests
            else 0.0,
            "slo_attainment": self.slo_attainment,
            "goodput_rps": self.goodput,
            "ttft_p50_s": pct(ttfts, 0.5),
            "ttft_p90_s": pct(ttfts, 0.9),
            "itl_p50_s": pct(itls, 0.5),
            "itl_p90_s": pct(itls, 0.9),
            "e2e_p50_s": pct(e2es, 0.5),
            "device_hours": self.device_hours,
            "cost": self.cost,
            "cost_per_1k_good": self.cost_per_1k_good if self.slo_met else None,
            "simulated_seconds": self.simulated_seconds,
            "wall_seconds": self.wall_seconds,
            "events": self.events,
        }


# --------------------------------------------------------------------------- internals


class _Req:
    __slots__ = (
        "arrival",
        "finish",
        "finish_step",
        "first",
        "idx",
        "kv_res",
        "output",
        "path",
        "pf_done",
        "pf_left",
        "pool",
        "prompt",
    )

    def __init__(self, idx: int, tr: TraceRequest) -> None:
        self.idx = idx
        self.arrival = tr.arrival
        self.prompt = tr.prompt_tokens
        self.output = tr.output_tokens
        self.pf_left = tr.prompt_tokens
        self.pf_done = 0
        self.first = -1.0
        self.finish = -1.0
        self.finish_step = 0
        self.kv_res = 0
        self.path = ""
        self.pool: _Pool | None = None


class _Pool:
    def __init__(self, spec: PoolSpec, profile: PerfProfile) -> None:
        self.spec = spec
        self.profile = profile
        self.instances: list[_Inst] = []
        self.desired = spec.replicas
        self.timeline: list[tuple[float, int, int]] = []
        self.reset_window()

    def record_ttft(self, seconds: float) -> None:
        """A first token of this pool's engine (vLLM's time_to_first_token_seconds)."""
        self.w_ttft_sum += seconds
        self.w_ttft_n += 1
        self.w_ttfts.append(seconds)

    def finished(self, prompt: int, output: int) -> None:
        """A request finished on this pool's engine: vLLM counts it then
        (request_success_total) and records its lengths (request_prompt_tokens,
        request_generation_tokens); a prefill instance's request ends with its prefill."""
        self.w_reqs += 1
        self.w_isl_sum += prompt
        self.w_osl_sum += output
        self.w_len_n += 1
        self.w_prompt_hist[bisect.bisect_left(PROMPT_BUCKETS, prompt)] += 1

    def reset_window(self) -> None:
        self.w_routed = 0  # requests the router sent here (tandem_router_dispatched_total)
        self.w_prompt = 0
        self.w_gen = 0
        self.w_reqs = 0
        self.w_ttft_sum = 0.0
        self.w_ttft_n = 0
        self.w_itl_sum = 0.0
        self.w_itl_n = 0
        # request lengths of requests that finished here (vLLM records its request_prompt_tokens
        # and request_generation_tokens histograms when a request finishes), and their prompt
        # lengths per bucket (request_prompt_tokens_bucket)
        self.w_isl_sum = 0
        self.w_osl_sum = 0
        self.w_len_n = 0
        self.w_ttfts: list[float] = []
        self.w_prompt_hist = [0] * (len(PROMPT_BUCKETS) + 1)


_STARTING, _READY, _DRAINING, _GONE = 0, 1, 2, 3


class _Inst:
    __slots__ = (
        "budget",
        "busy",
        "cap",
        "chunks",
        "created",
        "ctx",
        "dwait",
        "first_end",
        "fresh",
        "inbound",
        "kv_used",
        "max_seqs",
        "n_prefilling",
        "pool",
        "pq",
        "pq_tokens",
        "prof",
        "removed",
        "role",
        "running",
        "seg_a",
        "seg_b",
        "seg_c0",
        "seg_k",
        "seg_start",
        "state",
        "step",
        "version",
    )

    def __init__(self, pool: _Pool, now: float, state: int) -> None:
        spec = pool.spec
        self.pool = pool
        self.role = spec.role
        self.prof = pool.profile
        self.cap = max(1, pool.profile.kv_capacity)
        self.max_seqs = spec.max_seqs
        self.budget = spec.max_batch_tokens or DEFAULT_BUDGET[spec.role]
        self.state = state
        self.created = now
        self.removed = -1.0
        self.pq: deque[_Req] = deque()
        self.pq_tokens = 0
        self.dwait: deque[_Req] = deque()
        self.fresh: list[_Req] = []  # admitted, first token due at the end of the next step
        self.first_end = 0.0
        self.running: list[tuple[int, int, _Req]] = []  # heap of (finish_step, idx, req)
        self.step = 0
        self.ctx = 0
        self.kv_used = 0
        self.n_prefilling = 0
        self.inbound = 0
        self.busy = False
        self.version = 0
        self.chunks: list[tuple[_Req, int]] = []
        self.seg_start = 0.0
        self.seg_k = 0  # planned decode steps of the current segment (0 = prefill iteration)
        self.seg_a = 0.0  # step time = seg_a + max(seg_b... see _plan_segment)
        self.seg_b = 0.0
        self.seg_c0 = 0

    def idle(self) -> bool:
        return not (self.busy or self.pq or self.running or self.dwait or self.inbound)

    def inflight(self) -> int:
        """Requests a router would count as outstanding here: queued, prefilling, decoding."""
        return len(self.pq) + len(self.dwait) + len(self.running) + self.inbound


class _Segment:
    """Closed-form timing of k decode steps at fixed batch B with growing context.

    Step j (0-based) takes ``a + max(K, R0 + (C0 + j*B) * r)``.
    """

    __slots__ = ("a", "b_r", "base0", "jstar", "k_compute")

    def __init__(self, a: float, k_compute: float, r0: float, r: float, c0: int, batch: int) -> None:
        self.a = a
        self.k_compute = k_compute
        self.base0 = r0 + c0 * r  # memory time of step 0
        self.b_r = batch * r  # growth of memory time per step
        if self.base0 >= k_compute:
            self.jstar = 0
        elif self.b_r <= 0:
            self.jstar = 1 << 60
        else:
            self.jstar = math.ceil((k_compute - self.base0) / self.b_r)

    def time(self, k: int) -> float:
        """Seconds for the first ``k`` steps."""
        j1 = min(k, self.jstar)
        t = j1 * (self.a + self.k_compute)
        m = k - j1
        if m > 0:
            first = self.a + self.base0 + j1 * self.b_r
            t += m * first + self.b_r * m * (m - 1) / 2.0
        return t

    def steps_within(self, dt: float) -> int:
        """Number of steps fully completed within ``dt`` seconds."""
        per = self.a + self.k_compute
        if self.jstar > 0:
            j = int(dt / per)
            if j < self.jstar:
                return j
            j1 = self.jstar
            rem = dt - j1 * per
        else:
            j1 = 0
            rem = dt
        first = self.a + self.base0 + j1 * self.b_r
        half = self.b_r / 2.0
        if half <= 0:
            m = int(rem / first)
        else:
            lin = first - half
            m = int((-lin + math.sqrt(lin * lin + 4.0 * half * rem)) / (2.0 * half))
        # guard against rounding
        while m > 0 and self.time(j1 + m) > dt + 1e-12:
            m -= 1
        while self.time(j1 + m + 1) <= dt:
            m += 1
        return j1 + m


_EV_DONE, _EV_KV, _EV_READY, _EV_TICK = 0, 1, 2, 3


class _Engine:
    def __init__(
        self,
        trace: Sequence[TraceRequest],
        fleet: FleetSpec,
        router: RouterPolicy,
        autoscaler: AutoscalePolicy | None,
        config: SimConfig,
        progress: Callable[[float, float], None] | None,
    ) -> None:
        self.fleet = fleet
        self.router = router
        self.autoscaler = autoscaler
        self.config = config
        self.progress = progress
        self.trace = trace
        self.reqs = [_Req(i, tr) for i, tr in enumerate(trace)]
        self.heap: list[tuple[float, int, int, Any, int]] = []
        self.seq = 0
        self.now = 0.0
        self.events = 0
        self.pools: list[_Pool] = []
        for spec in fleet.pools:
            pool = _Pool(spec, build_profile(spec.accelerator, fleet.model, spec.tp))
            if pool.profile.kv_capacity <= 0:
                raise ValueError(
                    f"pool {spec.name}: {fleet.model.name} does not fit on "
                    f"{spec.tp} x {spec.accelerator.name}"
                )
            for _ in range(spec.replicas):
                pool.instances.append(_Inst(pool, 0.0, _READY))
            pool.timeline.append((0.0, spec.replicas, spec.replicas))
            self.pools.append(pool)
        self.dropped: list[_Req] = []
        self.w_client_ttfts: list[float] = []  # the clients' first tokens since the last tick
        # the requests the router saw arrive since the last tick: count, prompt tokens, histogram
        self.a_reqs = 0
        self.a_prompt = 0
        self.a_hist = [0] * (len(ROUTER_PROMPT_BUCKETS) + 1)
        self.clients: ObservesClients | None = autoscaler if isinstance(autoscaler, ObservesClients) else None
        self.last_tick = 0.0
        self.thresholds: list[tuple[float, int]] = [(0.0, self.router.split_threshold_tokens)]
        self.spans: list[tuple[float, float, float]] = []  # filled by results()

    # ---------------------------------------------------------------- event plumbing
    def push(self, t: float, kind: int, obj: Any, version: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, obj, version))

    def run(self) -> float:
        reqs = self.reqs
        n = len(reqs)
        i = 0
        heap = self.heap
        end_trace = reqs[-1].arrival if reqs else 0.0
        if self.autoscaler is not None:
            self.push(self.config.autoscale_interval_s, _EV_TICK, None)
        next_progress = self.config.progress_every
        while True:
            next_arrival = reqs[i].arrival if i < n else math.inf
            if heap and heap[0][0] <= next_arrival:
                t, _, kind, obj, version = heapq.heappop(heap)
                self.now = t
                if kind == _EV_DONE:
                    if obj.version == version:
                        self.on_done(obj, t)
                elif kind == _EV_KV:
                    self.on_kv_arrive(obj[0], obj[1], t)
                elif kind == _EV_READY:
                    self.on_ready(obj, t)
                else:
                    if i >= n and self.all_idle():
                        continue  # trace done and fleet drained: stop ticking
                    self.on_tick(t)
            elif i < n:
                self.now = next_arrival
                self.route(reqs[i], next_arrival)
                i += 1
            else:
                break
            self.events += 1
            if self.progress is not None and self.events >= next_progress:
                next_progress += self.config.progress_every
                self.progress(self.now, end_trace)
        return max(self.now, end_trace)

    def all_idle(self) -> bool:
        return all(inst.idle() for pool in self.pools for inst in pool.instances)

    # ---------------------------------------------------------------- routing
    def accepting(self, role: str) -> list[_Inst]:
        return [
            inst
            for pool in self.pools
            if pool.spec.role == role
            for inst in pool.instances
            if inst.state == _READY
        ]

    def route(self, req: _Req, now: float) -> None:
        # the router counts the prompt before it routes it, refused requests too
        # (tandem_router_prompt_tokens, with the router's buckets)
        self.a_reqs += 1
        self.a_prompt += req.prompt
        self.a_hist[bisect.bisect_left(ROUTER_PROMPT_BUCKETS, req.prompt)] += 1
        mixed = self.accepting("mixed")
        prefill = self.accepting("prefill")
        split_ok = bool(prefill) and self.has_decode()
        use_split = split_ok
        if split_ok and mixed:
            targets = self.mixed_targets(req, prefill, mixed)
            use_split = targets is None
            mixed = targets or mixed
        if not use_split and not mixed:
            # no ready instance on the preferred path: fall back to anything that will serve
            mixed = [
                i for p in self.pools if p.spec.role == "mixed" for i in p.instances if i.state == _STARTING
            ]
            if not mixed:
                prefill = [
                    i
                    for p in self.pools
                    if p.spec.role == "prefill"
                    for i in p.instances
                    if i.state == _STARTING
                ]
                use_split = bool(prefill) and self.has_decode()
                if not use_split:
                    req.path = "dropped"
                    self.dropped.append(req)
                    return
        candidates = prefill if use_split else mixed
        best = candidates[0]
        best_key = math.inf
        for inst in candidates:
            key = (inst.pq_tokens + req.prompt) * inst.prof.per_token_compute
            if inst.role == "mixed":
                key += 0.5 * inst.kv_used / inst.cap
            if key < best_key:
                best, best_key = inst, key
        req.path = "split" if use_split else "mixed"
        req.pool = best.pool
        best.pool.w_routed += 1
        best.pq.append(req)
        best.pq_tokens += req.prompt
        if not best.busy:
            if best.state != _STARTING:
                self.start(best, now)
        elif best.seg_k:
            self.truncate(best, now)

    def mixed_targets(self, req: _Req, prefill: list[_Inst], mixed: list[_Inst]) -> list[_Inst] | None:
        """Where a request that could take either path goes: None to split (at or above the
        threshold), else the mixed instances to choose from: all of them below the threshold or
        while every prefill instance queues too many tokens, and only those with room for the
        router's "prefill-saturated" spill (every prefill instance at its in-flight limit)."""
        if req.prompt < self.router.split_threshold_tokens:
            return mixed
        limit = self.router.max_prefill_queue_tokens
        if limit is not None and min(x.pq_tokens for x in prefill) > limit:
            return mixed
        cap = self.router.prefill_inflight_limit
        if cap is not None and min(len(x.pq) for x in prefill) >= cap:
            room = [x for x in mixed if x.inflight() < self.router.mixed_inflight_limit]
            return room or None
        return None

    def has_decode(self) -> bool:
        return any(
            p.spec.role == "decode" and any(i.state in (_READY, _STARTING) for i in p.instances)
            for p in self.pools
        )

    def pick_decode(self) -> _Inst | None:
        best: _Inst | None = None
        best_key = math.inf
        for pool in self.pools:
            if pool.spec.role != "decode":
                continue
            for inst in pool.instances:
                if inst.state == _READY or (inst.state == _STARTING and best is None):
                    key = (inst.kv_used + sum(r.kv_res for r in inst.dwait)) / inst.cap
                    if inst.state == _STARTING:
                        key += 1e6
                    if key < best_key:
                        best, best_key = inst, key
        return best

    # ---------------------------------------------------------------- instance engine
    def start(self, inst: _Inst, now: float) -> None:
        """Plan the next iteration (prefill-carrying) or decode segment of an idle instance."""
        prof = inst.prof
        if inst.pq and inst.role != "decode":
            batch = len(inst.running)
            room = inst.budget - batch
            chunks = inst.chunks
            chunks.clear()
            tokens = 0
            pairs = 0.0
            for req in inst.pq:
                if room - tokens <= 0:
                    break
                if inst.role == "mixed" and req.pf_done == 0 and req.kv_res == 0:
                    need = min(req.prompt + req.output, inst.cap)
                    if inst.kv_used + need > inst.cap or batch + inst.n_prefilling >= inst.max_seqs:
                        break  # head-of-line waits for KV
                    req.kv_res = need
                    inst.kv_used += need
                    inst.n_prefilling += 1
                take = min(req.pf_left, room - tokens)
                pairs += take * req.pf_done + take * take / 2.0
                chunks.append((req, take))
                tokens += take
            if tokens:
                dt = prof.iteration(tokens, pairs, batch, inst.ctx)
                inst.first_end = now + dt
                inst.busy = True
                inst.seg_k = 0
                inst.seg_start = now
                inst.version += 1
                self.push(now + dt, _EV_DONE, inst, inst.version)
                return
        running = inst.running
        if not running:
            inst.busy = False
            return
        batch = len(running)
        k = running[0][0] - inst.step
        a = prof.overhead_decode + batch * (prof.per_seq + prof.per_token_comm)
        read0 = prof.dense_read
        if prof.expert_read:
            read0 += prof.expert_read * (1.0 - prof.expert_miss**batch)
        seg = _Segment(a, batch * prof.per_token_compute, read0, prof.per_ctx_read, inst.ctx, batch)
        inst.busy = True
        inst.seg_k = k
        inst.seg_start = now
        inst.seg_a = a
        inst.seg_b = read0
        inst.seg_c0 = inst.ctx
        inst.version += 1
        inst.first_end = now + seg.time(1)
        self.push(now + seg.time(k), _EV_DONE, inst, inst.version)

    def _segment(self, inst: _Inst) -> _Segment:
        prof = inst.prof
        batch = len(inst.running)
        return _Segment(
            inst.seg_a, batch * prof.per_token_compute, inst.seg_b, prof.per_ctx_read, inst.seg_c0, batch
        )

    def truncate(self, inst: _Inst, now: float) -> None:
        """New work arrived during a decode segment: end it at the next step boundary."""
        seg = self._segment(inst)
        done = seg.steps_within(now - inst.seg_start)
        k = min(inst.seg_k, done + 1)
        if k < inst.seg_k:
            inst.seg_k = k
            inst.version += 1
            self.push(inst.seg_start + seg.time(k), _EV_DONE, inst, inst.version)

    def on_done(self, inst: _Inst, now: float) -> None:
        pool = inst.pool
        running = inst.running
        if inst.seg_k:  # decode segment of seg_k steps
            k = inst.seg_k
            batch = len(running)
            inst.step += k
            inst.ctx += k * batch
            pool.w_gen += k * batch
            pool.w_itl_sum += batch * (now - inst.seg_start)
            pool.w_itl_n += k * batch
            inst.seg_k = 0
        else:  # iteration with prefill chunks (plus the running decodes)
            batch = len(running)
            if batch:
                inst.step += 1
                inst.ctx += batch
                pool.w_gen += batch
                pool.w_itl_sum += batch * (now - inst.seg_start)
                pool.w_itl_n += batch
            for req, take in inst.chunks:
                req.pf_left -= take
                req.pf_done += take
                inst.pq_tokens -= take
                pool.w_prompt += take
            inst.chunks.clear()
            pq = inst.pq
            while pq and pq[0].pf_left == 0:
                self.prefilled(inst, pq.popleft(), now)
        if inst.fresh:
            for req in inst.fresh:
                self.first_token(req, inst.first_end)
            inst.fresh.clear()
        step = inst.step
        while running and running[0][0] <= step:
            _, _, req = heapq.heappop(running)
            self.finish(inst, req, now)
        if inst.dwait:
            self.admit(inst)
        inst.busy = False
        if inst.state == _DRAINING and inst.idle():
            self.remove(inst, now)
            return
        self.start(inst, now)

    def first_token(self, req: _Req, at: float) -> None:
        """The client's first token (a split request's prefill pool records its own at the
        end of its prefill, `prefilled`)."""
        req.first = at
        if self.clients is not None:
            self.w_client_ttfts.append(at - req.arrival)
        if req.pool is not None and req.pool.spec.role != "prefill":
            req.pool.record_ttft(at - req.arrival)

    def prefilled(self, inst: _Inst, req: _Req, now: float) -> None:
        inst.pool.w_gen += 1
        if inst.role == "prefill":  # the prefill instance's request ends here (max_tokens=1)
            inst.pool.finished(req.prompt, 1)
            inst.pool.record_ttft(now - req.arrival)
        if inst.role == "mixed" or req.output <= 1 or not self.config.ttft_on_decode:
            self.first_token(req, now)
        if inst.role == "mixed":
            inst.n_prefilling -= 1
            if req.output <= 1:
                inst.kv_used -= req.kv_res
                req.finish = now
                inst.pool.finished(req.prompt, req.output)
                return
            inst.ctx += req.prompt + 1
            req.finish_step = inst.step + req.output - 1
            heapq.heappush(inst.running, (req.finish_step, req.idx, req))
            return
        if req.output <= 1:
            req.finish = now
            return
        target = self.pick_decode()
        if target is None:
            req.path = "dropped"
            self.dropped.append(req)
            return
        link = self.fleet.kv_link_gbs or DEFAULT_NIC_GBS_PER_DEVICE * min(
            inst.pool.spec.tp, target.pool.spec.tp
        )
        dt = kv_transfer_seconds(
            self.fleet.model,
            req.prompt,
            link,
            self.fleet.pipelined_kv,
            compute_seconds=inst.prof.per_token_compute * req.prompt,
        )
        target.inbound += 1
        target.pool.w_routed += 1
        self.push(now + dt, _EV_KV, (target, req))

    def on_kv_arrive(self, inst: _Inst, req: _Req, now: float) -> None:
        inst.inbound -= 1
        req.kv_res = min(req.prompt + req.output, inst.cap)
        inst.dwait.append(req)
        if inst.state == _STARTING:
            return
        if not inst.busy:
            self.admit(inst)
            self.start(inst, now)
        elif inst.seg_k and inst.kv_used + req.kv_res <= inst.cap and len(inst.running) < inst.max_seqs:
            self.truncate(inst, now)

    def admit(self, inst: _Inst) -> None:
        dwait = inst.dwait
        running = inst.running
        while dwait:
            req = dwait[0]
            if inst.kv_used + req.kv_res > inst.cap or len(running) >= inst.max_seqs:
                break
            dwait.popleft()
            inst.kv_used += req.kv_res
            if req.first < 0:  # the client's first token comes from this instance
                inst.ctx += req.prompt
                req.finish_step = inst.step + req.output
                inst.fresh.append(req)
            else:
                inst.ctx += req.prompt + 1
                req.finish_step = inst.step + req.output - 1
            heapq.heappush(running, (req.finish_step, req.idx, req))

    def finish(self, inst: _Inst, req: _Req, now: float) -> None:
        req.finish = now
        inst.pool.finished(req.prompt, req.output)
        inst.kv_used -= req.kv_res
        inst.ctx -= req.prompt + req.output

    # ---------------------------------------------------------------- scaling
    def on_ready(self, inst: _Inst, now: float) -> None:
        if inst.state != _STARTING:
            return
        inst.state = _READY
        self.record(inst.pool, now)
        if inst.dwait:
            self.admit(inst)
        if not inst.busy:
            self.start(inst, now)

    def remove(self, inst: _Inst, now: float) -> None:
        inst.state = _GONE
        inst.removed = now
        self.record(inst.pool, now)

    def record(self, pool: _Pool, now: float) -> None:
        ready = sum(1 for i in pool.instances if i.state == _READY)
        total = sum(1 for i in pool.instances if i.state in (_READY, _STARTING))
        pool.timeline.append((now, ready, total))

    def observe(self, pool: _Pool, window_s: float) -> PoolObservation:
        ready = [i for i in pool.instances if i.state == _READY]
        if not ready:
            return PoolObservation(None, None, None, None, None, None, None, None)
        waiting = sum(len(i.pq) - i.n_prefilling + len(i.dwait) for i in ready)
        running = sum(len(i.running) + i.n_prefilling for i in ready)
        kv = sum(i.kv_used / i.cap for i in ready) / len(ready)
        w = max(window_s, 1e-9)
        ttfts = sorted(pool.w_ttfts)
        return PoolObservation(
            waiting=float(waiting),
            running=float(running),
            kv_usage=kv,
            prompt_tokens_per_s=pool.w_prompt / w,
            generation_tokens_per_s=pool.w_gen / w,
            requests_per_s=pool.w_reqs / w,
            mean_ttft_s=pool.w_ttft_sum / pool.w_ttft_n if pool.w_ttft_n else None,
            mean_itl_s=pool.w_itl_sum / pool.w_itl_n if pool.w_itl_n else None,
            mean_prompt_tokens=pool.w_isl_sum / pool.w_len_n if pool.w_len_n else None,
            mean_output_tokens=pool.w_osl_sum / pool.w_len_n if pool.w_len_n else None,
            p90_ttft_s=ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))] if ttfts else None,
            scrape_age_s=0.0,
            prompt_tokens_buckets=_cumulative(PROMPT_BUCKETS, pool.w_prompt_hist, w),
            ttft_buckets=_ttft_buckets(ttfts, w),
            routed_per_s=pool.w_routed / w,
        )

    def arrivals(self, window_s: float) -> PoolObservation:
        """The router's arrival reading since the last tick (and reset): requests/s, mean
        prompt and the cumulative prompt-length histogram, as the planner reads them from
        tandem_router_prompt_tokens."""
        w = max(window_s, 1e-9)
        out = replace(
            PoolObservation.empty(),
            requests_per_s=self.a_reqs / w,
            mean_prompt_tokens=self.a_prompt / self.a_reqs if self.a_reqs else None,
            prompt_tokens_buckets=_cumulative(ROUTER_PROMPT_BUCKETS, self.a_hist, w) if self.a_reqs else None,
        )
        self.a_reqs = 0
        self.a_prompt = 0
        self.a_hist = [0] * (len(ROUTER_PROMPT_BUCKETS) + 1)
        return out

    def on_tick(self, now: float) -> None:
        assert self.autoscaler is not None
        window_s = now - self.last_tick
        self.last_tick = now
        states: dict[str, PoolState] = {}
        for pool in self.pools:
            spec = pool.spec
            states[spec.name] = PoolState(
                name=spec.name,
                role=spec.role,
                accelerator=spec.accelerator.name,
                tp=spec.tp,
                price_per_hour=spec.tp * spec.device_price,
                replicas=pool.desired,
                ready=sum(1 for i in pool.instances if i.state == _READY),
                starting=sum(1 for i in pool.instances if i.state == _STARTING),
                min_replicas=spec.min_replicas,
                max_replicas=spec.max_replicas,
                observation=self.observe(pool, window_s),
            )
            pool.reset_window()
        client = sorted(self.w_client_ttfts)
        self.w_client_ttfts = []
        arrivals = self.arrivals(window_s)
        if self.clients is not None:
            self.clients.observe_clients(
                _ttft_buckets(client, max(window_s, 1e-9)),
                sum(client) / len(client) if client else None,
                arrivals,
            )
        decisions = self.autoscaler.decide(now, states)
        if isinstance(self.autoscaler, TunesRouting):
            threshold = self.autoscaler.split_threshold()
            if threshold is not None and threshold != self.router.split_threshold_tokens:
                self.router = replace(self.router, split_threshold_tokens=int(threshold))
                self.thresholds.append((now, int(threshold)))
        for pool in self.pools:
            want = decisions.get(pool.spec.name)
            if want is not None:
                self.scale(pool, max(0, int(want)), now)
        self.push(now + self.config.autoscale_interval_s, _EV_TICK, None)

    def scale(self, pool: _Pool, want: int, now: float) -> None:
        live = [i for i in pool.instances if i.state in (_READY, _STARTING)]
        pool.desired = want
        if want == len(live):
            return
        if want > len(live):
            for _ in range(want - len(live)):
                inst = _Inst(pool, now, _STARTING)
                pool.instances.append(inst)
                self.push(now + self.config.startup_delay_s, _EV_READY, inst)
        elif want < len(live):
            excess = len(live) - want
            # cancel starting replicas first, then drain the least loaded ready ones
            order = sorted(live, key=lambda i: (i.state == _READY, i.kv_used + i.pq_tokens + len(i.running)))
            for inst in order[:excess]:
                if inst.state == _STARTING and inst.idle():
                    self.remove(inst, now)
                    continue
                inst.state = _DRAINING
                if inst.idle():
                    self.remove(inst, now)
        self.record(pool, now)

    # ---------------------------------------------------------------- results
    def results(
        self, end: float
    ) -> tuple[list[RequestResult], float, float, dict[str, list[tuple[float, int, int]]]]:
        out: list[RequestResult] = []
        for req in self.reqs:
            if req.finish < 0 or req.first < 0:
                out.append(
                    RequestResult(
                        req.arrival, req.prompt, req.output, req.path or "dropped", None, None, None
                    )
                )
                continue
            itl = (req.finish - req.first) / (req.output - 1) if req.output > 1 else None
            out.append(
                RequestResult(
                    req.arrival,
                    req.prompt,
                    req.output,
                    req.path,
                    req.first - req.arrival,
                    itl,
                    req.finish - req.arrival,
                )
            )
        device_hours = 0.0
        cost = 0.0
        timelines: dict[str, list[tuple[float, int, int]]] = {}
        self.spans = []
        for pool in self.pools:
            for inst in pool.instances:
                stop = inst.removed if inst.removed >= 0 else end
                hours = max(0.0, stop - inst.created) / 3600.0 * pool.spec.tp
                device_hours += hours
                cost += hours * pool.spec.device_price
                self.spans.append((inst.created, stop, pool.spec.tp * pool.spec.device_price))
            timelines[pool.spec.name] = pool.timeline
        return out, device_hours, cost, timelines


def _cumulative(
    bounds: Sequence[float], counts: Sequence[int], window_s: float
) -> tuple[tuple[float, float], ...]:
    """Per-bucket counts (the last beyond ``bounds``) -> Prometheus-style cumulative
    (upper bound, per second) pairs, the last bound infinite."""
    return tuple(
        (le, seen / window_s)
        for le, seen in zip((*bounds, math.inf), itertools.accumulate(counts), strict=True)
    )


def _ttft_buckets(ttfts: Sequence[float], window_s: float) -> tuple[tuple[float, float], ...]:
    """Cumulative first tokens/s per vLLM TTFT bucket bound (``ttfts`` sorted), as
    ``sum by (le) (rate(vllm:time_to_first_token_seconds_bucket))`` reads."""
    return tuple((le, bisect.bisect_right(ttfts, le) / window_s) for le in (*TTFT_BUCKETS, math.inf))


def simulate(
    trace: Sequence[TraceRequest],
    fleet: FleetSpec,
    slo: SLO,
    *,
    router: RouterPolicy | None = None,
    autoscaler: AutoscalePolicy | None = None,
    config: SimConfig | None = None,
    progress: Callable[[float, float], None] | None = None,
) -> SimResult:
    """Replay ``trace`` on ``fleet`` and score it against ``slo``.

    ``autoscaler`` is consulted every ``config.autoscale_interval_s``; new replicas serve
    after ``config.startup_delay_s``. Instances are billed from creation to removal (or
    to the end of the run: the later of the last arrival and the last completion).
    ``progress(sim_time, trace_end)`` is called every ``config.progress_every`` events.
    """
    started = wallclock.perf_counter()
    engine = _Engine(trace, fleet, router or RouterPolicy(), autoscaler, config or SimConfig(), progress)
    end = engine.run()
    requests, device_hours, cost, timelines = engine.results(end)
    trace_seconds = max(end if not trace else trace[-1].arrival - trace[0].arrival, 1e-9)
    return SimResult(
        fleet=fleet,
        slo=slo,
        requests=requests,
        simulated_seconds=end,
        trace_seconds=trace_seconds,
        wall_seconds=wallclock.perf_counter() - started,
        device_hours=device_hours,
        cost=cost,
        timelines=timelines,
        events=engine.events,
        split_thresholds=engine.thresholds,
        spans=engine.spans,
    )


def pool(
    name: str,
    role: Role,
    accelerator: Accelerator,
    tp: int,
    replicas: int,
    **kw: Any,
) -> PoolSpec:
    """Shorthand for :class:`PoolSpec`."""
    return PoolSpec(name=name, role=role, accelerator=accelerator, tp=tp, replicas=replicas, **kw)
