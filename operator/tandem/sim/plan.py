"""Fleet planning: the cheapest fleet of prefill / decode / mixed replicas that meets an SLO.

For every candidate *shape* (co-located on one accelerator, or prefill on accelerator A
with decode on accelerator B) the planner binary-searches replica counts with the
simulator, because attainment rises monotonically with replicas. It then reports the
cheapest feasible fleet overall, the cheapest homogeneous one (one accelerator type) and
the cheapest co-located one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tandem.perf.catalog import Accelerator, get_accelerator, with_price
from tandem.perf.model import kv_capacity_tokens
from tandem.perf.models import ModelArch
from tandem.sim.fleet import SLO, FleetSpec, PoolSpec, SimConfig, SimResult, simulate
from tandem.sim.policies import Role, RouterPolicy
from tandem.sim.trace import TraceRequest


@dataclass(frozen=True)
class Offer:
    """Accelerators a user can rent: up to ``max_devices`` devices at ``accelerator.price_per_hour``."""

    accelerator: Accelerator
    max_devices: int = 32


def parse_offer(text: str) -> Offer:
    """``NAME[=MAX_DEVICES][@PRICE]``, e.g. ``h100=16@2.5``."""
    price: float | None = None
    if "@" in text:
        text, price_text = text.split("@", 1)
        price = float(price_text)
    max_devices = 32
    if "=" in text:
        text, count = text.split("=", 1)
        max_devices = int(count)
    acc = get_accelerator(text)
    if price is not None:
        acc = with_price(acc, price)
    return Offer(acc, max_devices)


def parse_pool(text: str, model: ModelArch, index: int = 0) -> PoolSpec:
    """``ROLE:ACCELERATOR:COUNT[:tpN][@PRICE]``, e.g. ``prefill:h100:2:tp4@2.5``; TP defaults
    to the smallest that leaves room for 32k tokens of KV cache."""
    price: float | None = None
    if "@" in text:
        text, price_text = text.split("@", 1)
        price = float(price_text)
    parts = text.split(":")
    if len(parts) < 3 or parts[0] not in ("prefill", "decode", "mixed"):
        raise ValueError(
            f"pool {text!r}: expected ROLE:ACCELERATOR:COUNT[:tpN][@PRICE], ROLE in prefill/decode/mixed"
        )
    role: Role = parts[0]  # type: ignore[assignment]
    acc = get_accelerator(parts[1])
    count = int(parts[2])
    tp = int(parts[3].removeprefix("tp")) if len(parts) > 3 else auto_tp(acc, model)
    return PoolSpec(f"{role}-{acc.name}-{index}", role, acc, tp, count, price_per_hour=price)


def auto_tp(acc: Accelerator, model: ModelArch, min_kv_tokens: int = 32768) -> int:
    """Smallest power-of-two TP (<= 8) whose KV capacity holds ``min_kv_tokens``."""
    tp = 1
    while tp <= 8:
        if kv_capacity_tokens(acc, model, tp) >= min_kv_tokens:
            return tp
        tp *= 2
    raise ValueError(f"{model.name} does not fit on 8 x {acc.name} with {min_kv_tokens} tokens of KV")


@dataclass
class Candidate:
    label: str
    kind: str  # "co-located" or "disaggregated"
    accelerators: tuple[str, ...]
    fleet: FleetSpec
    result: SimResult
    feasible: bool

    @property
    def homogeneous(self) -> bool:
        return len(set(self.accelerators)) == 1

    @property
    def hourly_cost(self) -> float:
        return self.fleet.hourly_cost()


@dataclass
class PlanResult:
    candidates: list[Candidate] = field(default_factory=list)  # every simulated fleet
    shapes: list[Candidate] = field(default_factory=list)  # cheapest feasible fleet per shape

    def _best(self, keep: Callable[[Candidate], bool]) -> Candidate | None:
        pool = [c for c in self.shapes if c.feasible and keep(c)]
        return min(pool, key=lambda c: (c.hourly_cost, -c.result.slo_attainment)) if pool else None

    @property
    def recommended(self) -> Candidate | None:
        return self._best(lambda c: True)

    @property
    def best_homogeneous(self) -> Candidate | None:
        return self._best(lambda c: c.homogeneous)

    @property
    def best_colocated(self) -> Candidate | None:
        return self._best(lambda c: c.kind == "co-located")


class Planner:
    def __init__(
        self,
        trace: Sequence[TraceRequest],
        model: ModelArch,
        slo: SLO,
        offers: Sequence[Offer],
        *,
        router: RouterPolicy | None = None,
        config: SimConfig | None = None,
        on_simulated: Callable[[Candidate], None] | None = None,
    ) -> None:
        self.trace = trace
        self.model = model
        self.slo = slo
        self.offers = list(offers)
        self.router = router
        self.config = config
        self.on_simulated = on_simulated
        self.plan = PlanResult()
        self._cache: dict[tuple[tuple[str, str, int, int], ...], Candidate] = {}

    def evaluate(self, label: str, kind: str, pools: tuple[PoolSpec, ...]) -> Candidate:
        key = tuple((p.role, p.accelerator.name, p.tp, p.replicas) for p in pools)
        if key in self._cache:
            return self._cache[key]
        fleet = FleetSpec(self.model, pools)
        result = simulate(self.trace, fleet, self.slo, router=self.router, config=self.config)
        cand = Candidate(
            label,
            kind,
            tuple(p.accelerator.name for p in pools),
            fleet,
            result,
            result.slo_attainment >= self.slo.attainment_target,
        )
        self._cache[key] = cand
        self.plan.candidates.append(cand)
        if self.on_simulated is not None:
            self.on_simulated(cand)
        return cand

    def _search(self, hi: int, build: Callable[[int], Candidate]) -> Candidate | None:
        """Smallest n in [1, hi] whose candidate is feasible (attainment is monotone in n)."""
        if hi < 1:
            return None
        top = build(hi)
        if not top.feasible:
            return None
        lo, best = 1, top
        while lo < hi:
            mid = (lo + hi) // 2
            cand = build(mid)
            if cand.feasible:
                hi, best = mid, cand
            else:
                lo = mid + 1
        return best

    def colocated(self, offer: Offer) -> Candidate | None:
        acc = offer.accelerator
        tp = auto_tp(acc, self.model)
        label = f"co-located {acc.name}"

        def build(n: int) -> Candidate:
            return self.evaluate(label, "co-located", (PoolSpec("mixed", "mixed", acc, tp, n),))

        return self._search(offer.max_devices // tp, build)

    def disaggregated(self, pre: Offer, dec: Offer) -> Candidate | None:
        a, b = pre.accelerator, dec.accelerator
        tpa, tpb = auto_tp(a, self.model), auto_tp(b, self.model)
        label = f"prefill {a.name} / decode {b.name}"
        if a.name == b.name:
            budget = min(pre.max_devices, dec.max_devices)
            hi_p = max(1, (budget - tpb) // tpa)
            hi_d = max(1, (budget - tpa) // tpb)
        else:
            hi_p, hi_d = pre.max_devices // tpa, dec.max_devices // tpb

        def pools(np: int, nd: int) -> tuple[PoolSpec, ...]:
            return (PoolSpec("prefill", "prefill", a, tpa, np), PoolSpec("decode", "decode", b, tpb, nd))

        best_p = self._search(hi_p, lambda n: self.evaluate(label, "disaggregated", pools(n, hi_d)))
        if best_p is None:
            return None
        np = best_p.fleet.pools[0].replicas
        found = self._search(hi_d, lambda n: self.evaluate(label, "disaggregated", pools(np, n)))
        if (
            found is not None
            and a.name == b.name
            and np * tpa + found.fleet.pools[1].replicas * tpb > pre.max_devices
        ):
            return None
        return found

    def run(self) -> PlanResult:
        for offer in self.offers:
            cand = self.colocated(offer)
            if cand is not None:
                self.plan.shapes.append(cand)
        for pre in self.offers:
            for dec in self.offers:
                cand = self.disaggregated(pre, dec)
                if cand is not None:
                    self.plan.shapes.append(cand)
        return self.plan
