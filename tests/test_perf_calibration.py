"""Calibration of the roofline model against published measurements (within +-25 %).

Sources:
* Splitwise (Patel et al., ISCA 2024, arXiv 2311.18677), profiling data released as
  github.com/Mutinifni/splitwise-sim data/perf_model.csv (MIT): Llama-2-70B, TP8, fp16,
  vLLM on DGX-H100 / DGX-A100. Means of the repeated rows: prompt_time for batch 1 and
  token_time (decode step) at batch 1, 32 and 64 with 512-token prompts and 128 output
  tokens (mean context ~576 tokens per sequence).
* DistServe (Zhong et al., OSDI 2024, arXiv 2401.09670), github.com/LLMServe/DistServe
  simdistserve/estimators/profile_data/profiler-a100-80g.distserve.json (Apache-2.0):
  OPT-13B on one A100-80GB, prefill = 18.10 + 0.1019 l + 7.12e-6 l^2 ms -> ~72 ms at
  l = 512; max_num_tokens.csv: 66k KV tokens for OPT-13B TP1.
"""

from __future__ import annotations

import pytest

from tandem.perf import decode_step_seconds, get_accelerator, get_model, kv_capacity_tokens, prefill_seconds

TOL = 0.25

SPLITWISE_PREFILL_MS = [
    ("h100", 512, 57.0),
    ("h100", 2048, 137.0),
    ("h100", 8192, 848.0),
    ("a100", 512, 96.0),
    ("a100", 2048, 274.0),
    ("a100", 8192, 1544.0),
]

SPLITWISE_DECODE_MS = [
    ("h100", 1, 30.5),
    ("h100", 32, 38.9),
    ("h100", 64, 50.0),
    ("a100", 1, 45.2),
    ("a100", 32, 53.2),
    ("a100", 64, 71.3),
]


@pytest.mark.parametrize(("acc", "prompt", "published_ms"), SPLITWISE_PREFILL_MS)
def test_splitwise_llama2_70b_prefill(acc: str, prompt: int, published_ms: float) -> None:
    predicted = prefill_seconds(get_accelerator(acc), get_model("llama-2-70b"), 8, prompt) * 1e3
    assert abs(predicted / published_ms - 1) <= TOL, (predicted, published_ms)


@pytest.mark.parametrize(("acc", "batch", "published_ms"), SPLITWISE_DECODE_MS)
def test_splitwise_llama2_70b_decode_step(acc: str, batch: int, published_ms: float) -> None:
    predicted = (
        decode_step_seconds(get_accelerator(acc), get_model("llama-2-70b"), 8, batch, batch * 576) * 1e3
    )
    assert abs(predicted / published_ms - 1) <= TOL, (predicted, published_ms)


def test_distserve_opt13b_prefill_on_one_a100() -> None:
    published_ms = 18.10 + 0.1019 * 512 + 7.12e-6 * 512**2  # ~72 ms
    predicted = prefill_seconds(get_accelerator("a100"), get_model("opt-13b"), 1, 512) * 1e3
    assert abs(predicted / published_ms - 1) <= TOL, (predicted, published_ms)


def test_distserve_opt13b_kv_capacity() -> None:
    assert abs(kv_capacity_tokens(get_accelerator("a100"), get_model("opt-13b"), 1) / 66_000 - 1) <= 0.1


def test_h100_over_a100_ratios_follow_splitwise() -> None:
    # Splitwise Sec. 3: H100 TTFT ~0.51x and TBT ~0.70x of A100.
    model = get_model("llama-2-70b")
    h, a = get_accelerator("h100"), get_accelerator("a100")
    ttft = prefill_seconds(h, model, 8, 2048) / prefill_seconds(a, model, 8, 2048)
    tbt = decode_step_seconds(h, model, 8, 1, 600) / decode_step_seconds(a, model, 8, 1, 600)
    assert 0.4 <= ttft <= 0.65
    assert 0.55 <= tbt <= 0.8
