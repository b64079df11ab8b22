"""Simulator speed benchmark: a one-hour, conversation-sized trace on a 20-instance fleet.

The trace is synthetic but shaped like the Azure LLM 2023 conversation trace (19,366
requests over ~58 min, mean 1,155 prompt / 211 output tokens; Splitwise, arXiv 2311.18677;
Azure/AzurePublicDataset AzureLLMInferenceTrace_conv.csv). Goal: < 30 s on one core.

    python -m tandem.sim.bench_speed [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

from tandem.perf.catalog import get_accelerator
from tandem.perf.models import get_model
from tandem.sim.fleet import SLO, FleetSpec, PoolSpec, simulate
from tandem.sim.policies import QueuePolicy
from tandem.sim.trace import synthetic

CONVERSATION_REQUESTS = 19366
CONVERSATION_SECONDS = 3480.0


def conversation_like(seed: int = 0) -> list:  # type: ignore[type-arg]
    return synthetic(
        CONVERSATION_REQUESTS, CONVERSATION_REQUESTS / CONVERSATION_SECONDS, 1155, 211, seed=seed
    )


def fleets() -> dict[str, FleetSpec]:
    model = get_model("llama-3.1-70b", "fp8")
    h100 = get_accelerator("h100")
    mi300x = get_accelerator("mi300x")
    return {
        "20 mixed H100 TP2": FleetSpec(model, (PoolSpec("mixed", "mixed", h100, 2, 20),)),
        "8 prefill H100 TP2 + 12 decode MI300X TP1": FleetSpec(
            model, (PoolSpec("prefill", "prefill", h100, 2, 8), PoolSpec("decode", "decode", mi300x, 1, 12))
        ),
        "6 prefill + 6 decode + 8 mixed H100 TP2": FleetSpec(
            model,
            (
                PoolSpec("prefill", "prefill", h100, 2, 6),
                PoolSpec("decode", "decode", h100, 2, 6),
                PoolSpec("mixed", "mixed", h100, 2, 8),
            ),
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    trace = conversation_like()
    slo = SLO(ttft_s=1.0, itl_s=0.1)
    for name, fleet in fleets().items():
        for policy in (None, QueuePolicy()):
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                result = simulate(trace, fleet, slo, autoscaler=policy if policy is None else QueuePolicy())
                times.append(time.perf_counter() - t0)
            label = "static" if policy is None else "queue"
            print(
                f"{name:45s} {label:6s} requests={len(trace)} events={result.events} "
                f"attainment={result.slo_attainment:.3f} wall min/max={min(times):.2f}/{max(times):.2f} s"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
