"""Baseline autoscaling policies, behind the simulator's ``AutoscalePolicy`` interface.

Each mirrors a published autoscaler as closely as the observation shape allows; the
differences are stated per class. All are deterministic and keep their memory in fields.

* :class:`ColocatedHpa`: one SKU, mixed pool only, the Kubernetes HPA algorithm on queue
  depth (what a KEDA Prometheus trigger on ``vllm:num_requests_waiting`` does).
* :func:`static_fleet`: a fixed P:D fleet sized for the trace's peak with Dynamo's formulas.
* :class:`DynamoSla`: Dynamo's throughput-based SLA planner (single SKU, P and D pools).
* :class:`Saturation`: llm-d's workload-variant-autoscaler saturation analyzer.

The oracle (cheapest static heterogeneous fleet for the whole trace) is a search, not a
policy: see :mod:`tandem.bench`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from tandem.perf.model import kv_transfer_seconds
from tandem.perf.models import ModelArch
from tandem.planner.capacity import DEFAULT_BUDGET, NIC_GBS_PER_DEVICE, profile
from tandem.sim.fleet import SLO, PoolSpec
from tandem.sim.policies import PoolObservation, PoolState


@dataclass
class ColocatedHpa:
    """The HPA algorithm on average waiting requests per replica, for one mixed pool.

    ``desired = ceil(current * metric / target)`` with a 10 % tolerance; scale-up at once,
    scale-down to the highest recommendation of the last 300 s (kubernetes.io, "Horizontal
    Pod Autoscaling": algorithm details, default ``--horizontal-pod-autoscaler-tolerance``
    0.1 and ``behavior.scaleDown.stabilizationWindowSeconds`` 300). ``target_waiting``: the
    KEDA threshold, 2 waiting requests per replica (a common vLLM example value). Pods that
    are not ready are left out of the metric, as the HPA does.
    """

    target_waiting: float = 2.0
    tolerance: float = 0.1
    down_window_s: float = 300.0
    name: str = "colocated-hpa"
    _history: dict[str, list[tuple[float, int]]] = field(default_factory=dict)

    def decide(self, now: float, pools: Mapping[str, PoolState]) -> Mapping[str, int | None]:
        out: dict[str, int | None] = {}
        for name, pool in pools.items():
            waiting = pool.observation.waiting
            if waiting is None or pool.ready == 0:
                out[name] = None
                continue
            ratio = waiting / pool.ready / self.target_waiting
            rec = pool.replicas if abs(ratio - 1) <= self.tolerance else math.ceil(pool.ready * ratio)
            rec = max(pool.min_replicas, min(pool.max_replicas, rec))
            history = [(t, n) for t, n in self._history.get(name, []) if now - t < self.down_window_s]
            history.append((now, rec))
            self._history[name] = history
            if rec < pool.replicas:
                rec = max(n for _, n in history)
            out[name] = None if rec == pool.replicas else rec
        return out


# ----------------------------------------------------------------------------- Dynamo


def engine_prefill_rps(spec: PoolSpec, model: ModelArch, isl: float, ttft_s: float) -> tuple[float, float]:
    """(requests/s of one prefill engine, its TTFT estimate) for prompts of ``isl`` tokens.

    Dynamo's ``find_best_engine_prefill_rps``: the throughput at the largest batch (up to
    ``max_num_batched_tokens``) whose prefill time stays within the TTFT target
    (components/src/dynamo/planner/core/throughput_scaling.py; perf-anchors §3.3).
    """
    prof = profile(spec.accelerator, model, spec.tp)
    length = max(1, round(isl))
    budget = spec.max_batch_tokens or DEFAULT_BUDGET["prefill"]
    best = (
        1.0 / prof.iteration(length, length * length / 2.0, 0, 0),
        prof.iteration(length, length * length / 2.0, 0, 0),
    )
    for k in range(2, max(2, budget // length) + 1):
        t = prof.iteration(k * length, k * length * length / 2.0, 0, 0)
        if t > ttft_s:
            break
        best = (k / t, t)
    return best


def engine_decode_rps(spec: PoolSpec, model: ModelArch, isl: float, osl: float, itl_s: float) -> float:
    """Requests/s of one decode engine: the largest batch whose step at context ISL + OSL/2
    per sequence is within the ITL target and whose KV fits (Dynamo's
    ``find_best_engine_decode_rps``, perf-anchors §3.3), over OSL steps."""
    prof = profile(spec.accelerator, model, spec.tp)
    ctx = isl + osl / 2
    kv_limit = max(1, int(prof.kv_capacity / max(1.0, isl + osl)))
    best = 1
    for b in range(1, min(kv_limit, spec.max_seqs) + 1):
        if prof.decode_step(b, int(b * ctx)) > itl_s:
            break
        best = b
    return best / (max(1.0, osl) * prof.decode_step(best, int(best * ctx)))


def dynamo_replicas(
    prefill: PoolSpec, decode: PoolSpec, model: ModelArch, slo: SLO, rps: float, isl: float, osl: float,
    p_corr: float = 1.0, d_corr: float = 1.0,
) -> tuple[int, int]:  # fmt: skip
    """num_p = max(ceil(rps / engine_prefill_rps), sla_floor), num_d = ceil(rps / engine_decode_rps).

    Corrections as in Dynamo's SLA planner (planner_core.py): prefill demand is scaled by
    ``min(1, p_corr)``, and decode is sized for ``ITL_SLA / d_corr``.
    """
    p_rps, ttft_est = engine_prefill_rps(prefill, model, isl, slo.ttft_s)
    sla_floor = math.ceil(ttft_est / slo.ttft_s) if ttft_est > slo.ttft_s else 1
    num_p = max(math.ceil(rps * min(1.0, p_corr) / p_rps - 1e-9), sla_floor)
    d_rps = engine_decode_rps(decode, model, isl, osl, slo.itl_s / max(1e-3, d_corr))
    num_d = math.ceil(rps / d_rps - 1e-9)
    return num_p, max(1, num_d)


@dataclass
class DynamoSla:
    """Dynamo's throughput-based SLA planner on one P pool and one D pool of one SKU.

    Every ``interval_s`` (180 s, Dynamo's default ``throughput_adjustment_interval``) it
    takes the interval's request count, mean ISL/OSL, the frontend's TTFT and ITL, predicts the next
    interval with the ``constant`` predictor (Dynamo's ARIMA default needs statsmodels),
    computes the correction factors ``p_corr = observed TTFT / model TTFT`` and ``d_corr =
    observed ITL / model ITL`` and applies :func:`dynamo_replicas`, clamped to the pools'
    bounds. No action while a previous scale is still starting (Dynamo waits for the
    deployment to be ready).
    """

    prefill: PoolSpec
    decode: PoolSpec
    model: ModelArch
    slo: SLO
    interval_s: float = 180.0
    name: str = "dynamo-sla"
    _last: float = 0.0
    _acc: dict[str, float] = field(default_factory=dict)
    _client_ttft: float | None = None

    def observe_clients(
        self,
        ttft_buckets: tuple[tuple[float, float], ...],
        mean_ttft_s: float | None,
        arrivals: PoolObservation | None = None,
    ) -> None:
        """The frontend's mean TTFT of the tick (Dynamo's planner reads TTFT there, so it
        includes the KV hand-off that the prefill engine's own TTFT ends before)."""
        self._client_ttft = mean_ttft_s

    def _accumulate(self, pools: Mapping[str, PoolState], tick_s: float) -> None:
        p = pools[self.prefill.name].observation
        d = pools[self.decode.name].observation
        reqs = (p.requests_per_s or 0.0) * tick_s
        a = self._acc
        a["n"] = a.get("n", 0.0) + reqs
        a["isl"] = a.get("isl", 0.0) + reqs * (p.mean_prompt_tokens or 0.0)
        ttft = self._client_ttft if self._client_ttft is not None else p.mean_ttft_s
        a["ttft"] = a.get("ttft", 0.0) + reqs * (ttft or 0.0)
        gen = (d.generation_tokens_per_s or 0.0) * tick_s
        a["gen"] = a.get("gen", 0.0) + gen
        a["itl"] = a.get("itl", 0.0) + gen * (d.mean_itl_s or 0.0)
        done = (d.mean_output_tokens or 0.0) and gen / max(1.0, d.mean_output_tokens or 1.0)
        a["osl_n"] = a.get("osl_n", 0.0) + done
        a["osl"] = a.get("osl", 0.0) + done * (d.mean_output_tokens or 0.0)
        a["t"] = a.get("t", 0.0) + tick_s

    def decide(self, now: float, pools: Mapping[str, PoolState]) -> Mapping[str, int | None]:
        tick_s = now - self._acc.get("now", 0.0)
        self._acc["now"] = now
        self._accumulate(pools, tick_s)
        if now - self._last < self.interval_s - 1e-6:
            return {}
        self._last = now
        a, self._acc = self._acc, {"now": now}
        ps, ds = pools[self.prefill.name], pools[self.decode.name]
        if ps.starting or ds.starting or a.get("t", 0.0) <= 0:
            return {}
        n = a.get("n", 0.0)
        rps = n / a["t"]
        isl = a["isl"] / n if n else 1024.0
        osl = a["osl"] / a["osl_n"] if a.get("osl_n") else 128.0
        p_corr = d_corr = 1.0
        if n and a.get("ttft"):
            model_ttft = engine_prefill_rps(self.prefill, self.model, isl, self.slo.ttft_s)[
                1
            ] + kv_transfer_seconds(self.model, round(isl), NIC_GBS_PER_DEVICE * self.prefill.tp)
            p_corr = (a["ttft"] / n) / model_ttft
        if a.get("gen") and a.get("itl"):
            prof = profile(self.decode.accelerator, self.model, self.decode.tp)
            conc = max(1.0, (pools[self.decode.name].observation.running or 1.0) / max(1, ds.ready))
            model_itl = prof.decode_step(math.ceil(conc), int(conc * (isl + osl / 2)))
            d_corr = (a["itl"] / a["gen"]) / model_itl
        num_p, num_d = dynamo_replicas(
            self.prefill, self.decode, self.model, self.slo, rps, isl, osl, p_corr, d_corr
        )
        out: dict[str, int | None] = {}
        for spec, want, state in ((self.prefill, num_p, ps), (self.decode, num_d, ds)):
            want = max(spec.min_replicas, min(spec.max_replicas, want))
            out[spec.name] = None if want == state.replicas else want
        return out


# ----------------------------------------------------------------------------- llm-d WVA


@dataclass
class Saturation:
    """llm-d workload-variant-autoscaler's saturation analyzer, per pool.

    A replica is saturated at KV usage >= 0.8 or >= 5 waiting requests. Spare capacity is
    ``0.8 - kv`` and ``5 - waiting`` per replica; +1 when spare KV < 0.1 or spare queue < 3;
    -1 when, with the load spread over N-1 replicas, spare KV >= 0.1 and spare queue >= 3
    (and N >= 2). Pools with replicas still starting are skipped (cascade prevention).
    Every ``interval_s`` (WVA reconciles about every 60 s). Source: llm-d
    workload-variant-autoscaler docs/saturation-analyzer.md (perf-anchors §4). The
    simulator gives pool sums and means, so the per-replica values are averages.
    """

    kv_limit: float = 0.8
    queue_limit: float = 5.0
    spare_kv: float = 0.1
    spare_queue: float = 3.0
    interval_s: float = 60.0
    name: str = "saturation"
    _last: float = -math.inf

    def _step(self, pool: PoolState) -> int:
        obs = pool.observation
        if obs.waiting is None or pool.starting or pool.ready == 0:
            return 0
        n = pool.ready
        kv = obs.kv_usage or 0.0
        q = obs.waiting / n
        if self.kv_limit - kv < self.spare_kv or self.queue_limit - q < self.spare_queue:
            return 1
        if n >= 2:
            kv_after, q_after = kv * n / (n - 1), obs.waiting / (n - 1)
            if self.kv_limit - kv_after >= self.spare_kv and self.queue_limit - q_after >= self.spare_queue:
                return -1
        return 0

    def decide(self, now: float, pools: Mapping[str, PoolState]) -> Mapping[str, int | None]:
        if now - self._last < self.interval_s - 1e-6:
            return {}
        self._last = now
        out: dict[str, int | None] = {}
        for name, pool in pools.items():
            step = self._step(pool)
            want = max(pool.min_replicas, min(pool.max_replicas, pool.replicas + step))
            out[name] = None if want == pool.replicas else want
        return out
