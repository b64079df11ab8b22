from __future__ import annotations

import dataclasses

import pytest

from tandem.perf import (
    ACCELERATORS,
    MODEL_PRESETS,
    custom_accelerator,
    decode_step_seconds,
    get_accelerator,
    get_model,
    kv_bytes_per_token,
    kv_capacity_tokens,
    kv_transfer_seconds,
    prefill_seconds,
)


def test_catalog_has_the_issue_accelerators_with_reference_values() -> None:
    expected = {
        "h100": (989, 1979, 80, 3350),
        "h200": (989, 1979, 141, 4800),
        "b200": (2250, 4500, 180, 7700),
        "mi300x": (1307.4, 2614.9, 192, 5300),
        "mi325x": (1307.4, 2614.9, 256, 6000),
        "gaudi3": (1835, 1835, 128, 3700),
        "a100": (312, 312, 80, 2039),
        "l40s": (362, 733, 48, 864),
    }
    assert set(expected) <= set(ACCELERATORS)
    for name, (bf16, fp8, mem, bw) in expected.items():
        acc = ACCELERATORS[name]
        assert (acc.bf16_tflops, acc.fp8_tflops, acc.memory_gib, acc.memory_bw_gbs) == (bf16, fp8, mem, bw)
        assert acc.price_per_hour > 0 and acc.tdp_w > 0
    assert ACCELERATORS["mi300x"].resource_name == "amd.com/gpu"
    assert ACCELERATORS["gaudi3"].resource_name == "habana.ai/gaudi"
    assert ACCELERATORS["h100"].price_per_hour == 3.0


def test_get_accelerator_aliases_and_error_lists_names() -> None:
    assert get_accelerator("H100-SXM").name == "h100"
    with pytest.raises(KeyError, match="known: a100"):
        get_accelerator("tpu-v5")


def test_custom_accelerator_overrides() -> None:
    acc = custom_accelerator("x1", "other", 500, 1000, 96, 4000, price_per_hour=1.5, mbu=0.7)
    assert acc.resource_name == "tandem.dev/accelerator"
    assert acc.mbu == 0.7 and acc.price_per_hour == 1.5
    with pytest.raises(ValueError):
        custom_accelerator("x2", "other", 0, 0, 96, 4000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        acc.name = "y"  # type: ignore[misc]


def test_model_presets_and_dtype_override() -> None:
    for name in ("opt-13b", "llama-2-70b", "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"):
        assert name in MODEL_PRESETS
    assert any(m.is_moe and m.active_params < m.params for m in MODEL_PRESETS.values())
    fp8 = get_model("llama-3.1-70b", "fp8")
    assert fp8.bytes_per_param == 1.0 and fp8.dtype == "fp8"
    with pytest.raises(KeyError, match="known"):
        get_model("gpt-5")
    with pytest.raises(ValueError):
        get_model("llama-3.1-8b", "int3")


def test_kv_bytes_per_token_matches_the_formula() -> None:
    assert kv_bytes_per_token(get_model("llama-2-70b")) == 2 * 80 * 8 * 128 * 2 == 327_680
    assert kv_bytes_per_token(get_model("llama-3.1-8b")) == 131_072
    assert kv_bytes_per_token(get_model("llama-3.1-70b", "fp8")) == 163_840


def test_kv_capacity_is_memory_minus_weights_and_zero_when_it_does_not_fit() -> None:
    model = get_model("llama-3.1-70b")
    h100 = get_accelerator("h100")
    assert kv_capacity_tokens(h100, model, 1) == 0  # 141 GB of bf16 weights > 80 GB
    assert kv_capacity_tokens(h100, model, 4) > kv_capacity_tokens(h100, model, 2) > 0
    assert kv_capacity_tokens(get_accelerator("mi300x"), model, 1) > 0


def test_prefill_grows_superlinearly_and_batches() -> None:
    acc, model = get_accelerator("h100"), get_model("llama-3.1-8b")
    t1, t4 = prefill_seconds(acc, model, 1, 1000), prefill_seconds(acc, model, 1, 4000)
    assert t4 > 3.5 * (t1 - acc.step_overhead_s)
    # batching two prompts costs less than running them one after the other
    assert prefill_seconds(acc, model, 1, [1000, 1000]) < 2 * t1
    assert prefill_seconds(acc, model, 1, []) == 0.0


def test_decode_is_memory_bound_and_faster_on_more_bandwidth() -> None:
    model = get_model("llama-3.1-70b", "fp8")
    h100, h200, b200 = (get_accelerator(n) for n in ("h100", "h200", "b200"))
    small = decode_step_seconds(h100, model, 2, 1, 1000)
    assert decode_step_seconds(h100, model, 2, 64, 64 * 4000) > small
    assert decode_step_seconds(h200, model, 2, 8, 8000) < decode_step_seconds(h100, model, 2, 8, 8000)
    assert decode_step_seconds(b200, model, 2, 8, 8000) < decode_step_seconds(h200, model, 2, 8, 8000)
    with pytest.raises(ValueError):
        decode_step_seconds(h100, model, 2, 0, 0)


def test_tensor_parallel_speeds_up_prefill_but_pays_all_reduce() -> None:
    acc, model = get_accelerator("h100"), get_model("llama-3.1-70b", "fp8")
    t1, t8 = prefill_seconds(acc, model, 1, 4096), prefill_seconds(acc, model, 8, 4096)
    assert t8 < t1
    assert t8 > t1 / 8  # all-reduce and overheads keep TP8 from an 8x speedup


def test_moe_decode_reads_fewer_weights_at_small_batch() -> None:
    acc = get_accelerator("h100")
    moe = get_model("mixtral-8x7b")
    dense_like = dataclasses.replace(moe, num_experts=0, experts_per_token=0, expert_params=0.0)
    assert decode_step_seconds(acc, moe, 1, 1, 100) < decode_step_seconds(acc, dense_like, 1, 1, 100)


def test_kv_transfer_pipelined_exposes_setup_plus_one_layer() -> None:
    model = get_model("llama-2-70b")
    serial = kv_transfer_seconds(model, 8192, 50.0, pipelined=False)
    piped = kv_transfer_seconds(model, 8192, 50.0)
    assert piped < serial
    # Splitwise measured ~5-8 ms non-overlapped with layer-wise transfer (Sec. 4.3)
    assert 0.004 <= kv_transfer_seconds(model, 1500, 400.0) <= 0.010
    # a slow link that the prefill cannot hide shows up
    assert kv_transfer_seconds(model, 8192, 1.0, compute_seconds=0.1) > 1.0
