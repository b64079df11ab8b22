"""Accelerator catalog: peak compute, memory, bandwidth, power and a default hourly price.

Every spec number carries its public source. Peak TFLOPS are *dense* (no 2:4 sparsity).
``memory_gib`` is the nominal HBM/GDDR capacity as vendors quote it (HBM stacks are
binary-sized, so "80 GB" on an H100 is 80 GiB of physical memory). Prices are
2025-26 street snapshots for one device-hour (on-demand, specialty clouds); they move
monthly and users override them in ``AcceleratorPool``.

The efficiency fields (``mfu``, ``attn_efficiency``, ``mbu``, overheads) feed the roofline
in :mod:`tandem.perf.model`. A100 and H100 values are calibrated against the Splitwise
``perf_model.csv`` measurements (vLLM, late 2023; see ``tests/test_perf_calibration.py``).
Accelerators without a public measurement reuse the factors of the closest calibrated
part (stated per entry); treat those predictions as spec-sheet ratios, low confidence.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

Vendor = Literal["nvidia", "amd", "intel", "other"]

_RESOURCE_NAMES: dict[str, str] = {
    "nvidia": "nvidia.com/gpu",
    "amd": "amd.com/gpu",
    "intel": "habana.ai/gaudi",
    "other": "tandem.dev/accelerator",
}


@dataclass(frozen=True)
class Accelerator:
    """One accelerator device (a GPU or Gaudi card). Units are in the field names.

    ``bf16_tflops``/``fp8_tflops``: dense peak TFLOPS. ``memory_bw_gbs``: HBM bandwidth in
    GB/s (1e9 bytes/s). ``link_gbs``: per-device scale-up interconnect bandwidth in GB/s,
    both directions summed, as vendors quote it (used for tensor-parallel all-reduce).
    ``price_per_hour``: USD per device-hour. Efficiency factors are dimensionless;
    overheads are seconds.
    """

    name: str
    vendor: Vendor
    bf16_tflops: float
    fp8_tflops: float
    memory_gib: float
    memory_bw_gbs: float
    tdp_w: float
    price_per_hour: float
    resource_name: str
    link_gbs: float = 600.0
    # Roofline efficiency factors (see tandem.perf.model).
    mfu: float = 0.75  # achieved / peak FLOPS on the dense GEMMs of a prefill
    attn_efficiency: float = 0.03  # achieved / peak FLOPS in prefill attention (sum of l_i^2 term)
    mbu: float = 0.8  # achieved / peak HBM bandwidth when streaming weights and KV
    allreduce_efficiency: float = 0.8  # achieved / nominal one-direction link bandwidth
    # Fixed costs per iteration (seconds).
    step_overhead_s: float = 0.002  # scheduler + sampling, once per iteration
    layer_overhead_prefill_s: float = 3.0e-4  # kernel launches per layer, eager prefill
    layer_overhead_decode_s: float = 1.2e-4  # kernel launches per layer, decode
    allreduce_latency_s: float = 8.0e-5  # fixed latency of one all-reduce call (tp > 1)
    per_seq_overhead_s: float = 3.0e-4  # host-side cost per running sequence per decode step


# Efficiency factors fitted to Splitwise perf_model.csv (github.com/Mutinifni/splitwise-sim,
# data/perf_model.csv, MIT; Llama-2-70B TP8 on DGX-H100 / DGX-A100, vLLM late 2023):
# prefill 512/2048/8192 tokens and decode at batch 1/32/64. The fit is in
# tests/test_perf_calibration.py; the quadratic (attention) term of that stack is slow.
_H100_FACTORS = {
    "mfu": 0.72,
    "attn_efficiency": 0.021,
    "mbu": 0.8,  # AIConfigurator mem_bw_empirical_scaling_factor (ai-dynamo/aiconfigurator systems/*.yaml)
    "step_overhead_s": 0.002,
    "layer_overhead_prefill_s": 2.6e-4,
    "layer_overhead_decode_s": 1.1e-4,
    "allreduce_latency_s": 8.0e-5,
    "per_seq_overhead_s": 3.0e-4,
}
_A100_FACTORS = {
    "mfu": 0.80,
    "attn_efficiency": 0.045,
    "mbu": 0.8,  # AIConfigurator mem_bw_empirical_scaling_factor
    "step_overhead_s": 0.002,
    "layer_overhead_prefill_s": 3.4e-4,
    "layer_overhead_decode_s": 1.9e-4,
    "allreduce_latency_s": 1.0e-4,
    "per_seq_overhead_s": 3.0e-4,
}


def _acc(name: str, vendor: Vendor, factors: dict[str, float], **kw: float) -> Accelerator:
    return Accelerator(name=name, vendor=vendor, resource_name=_RESOURCE_NAMES[vendor], **kw, **factors)


ACCELERATORS: dict[str, Accelerator] = {
    # NVIDIA H100 SXM5 80GB: 989 BF16 / 1979 FP8 dense TFLOPS, 80 GB HBM3, 3.35 TB/s, 700 W,
    # NVLink 4 900 GB/s. Source: NVIDIA H100 Tensor Core GPU datasheet (SXM column; the
    # datasheet's 1979/3958 are with sparsity) and aiconfigurator systems/h100_sxm.yaml.
    # Price ~$3/device-hour: median of 2026 on-demand quotes $2.95-3.49 (aimultiple.com GPU index).
    "h100": _acc(
        "h100",
        "nvidia",
        _H100_FACTORS,
        bf16_tflops=989.0,
        fp8_tflops=1979.0,
        memory_gib=80.0,
        memory_bw_gbs=3350.0,
        tdp_w=700.0,
        price_per_hour=3.0,
        link_gbs=900.0,
    ),
    # NVIDIA H200 SXM 141GB: same GH100 compute as H100 (989 / 1979), 141 GB HBM3e, 4.8 TB/s,
    # 700 W, NVLink 900 GB/s. Source: NVIDIA H200 datasheet. Efficiency: H100 factors (same die).
    # Price ~$3.8/h: mid-range of $2.50-7.00 on-demand quotes (mercatus-ai.com 2026).
    "h200": _acc(
        "h200",
        "nvidia",
        _H100_FACTORS,
        bf16_tflops=989.0,
        fp8_tflops=1979.0,
        memory_gib=141.0,
        memory_bw_gbs=4800.0,
        tdp_w=700.0,
        price_per_hour=3.8,
        link_gbs=900.0,
    ),
    # NVIDIA B200 (HGX): 2250 BF16 / 4500 FP8 dense TFLOPS, 180 GB usable HBM3e, 7.7 TB/s
    # (aiconfigurator systems/b200_sxm.yaml; marketing says 8 TB/s), 1000 W, NVLink 5 1800 GB/s.
    # Source: NVIDIA HGX B200 spec sheet / aiconfigurator. Efficiency: H100 factors (no public
    # Splitwise-style measurement). Price ~$5/h: $4.50-6.00 on-demand (lyceum.technology, 2026-03).
    "b200": _acc(
        "b200",
        "nvidia",
        _H100_FACTORS,
        bf16_tflops=2250.0,
        fp8_tflops=4500.0,
        memory_gib=180.0,
        memory_bw_gbs=7700.0,
        tdp_w=1000.0,
        price_per_hour=5.0,
        link_gbs=1800.0,
    ),
    # AMD Instinct MI300X: 1307.4 BF16 / 2614.9 FP8 dense TFLOPS, 192 GB HBM3, 5.3 TB/s, 750 W,
    # Infinity Fabric 7 x 128 GB/s = 896 GB/s. Source: AMD Instinct MI300X data sheet; MLPerf
    # Inference v4.1 system description (MI300X-192GB-750W). Efficiency: H100 factors (low
    # confidence). Price ~$2/h: median of $1.50-1.99 specialty-cloud quotes (cliffcenter.com 2026-05).
    "mi300x": _acc(
        "mi300x",
        "amd",
        _H100_FACTORS,
        bf16_tflops=1307.4,
        fp8_tflops=2614.9,
        memory_gib=192.0,
        memory_bw_gbs=5300.0,
        tdp_w=750.0,
        price_per_hour=2.0,
        link_gbs=896.0,
    ),
    # AMD Instinct MI325X: same CDNA3 compute as MI300X (1307.4 / 2614.9), 256 GB HBM3E,
    # 6.0 TB/s, 1000 W. Source: AMD Instinct MI325X product page; awesomeagents.ai/hardware/amd-mi325x.
    # Efficiency: H100 factors (low confidence). Price ~$2.1/h: $1.95-2.25 quotes (awesomeagents.ai).
    "mi325x": _acc(
        "mi325x",
        "amd",
        _H100_FACTORS,
        bf16_tflops=1307.4,
        fp8_tflops=2614.9,
        memory_gib=256.0,
        memory_bw_gbs=6000.0,
        tdp_w=1000.0,
        price_per_hour=2.1,
        link_gbs=896.0,
    ),
    # Intel Gaudi 3 (OAM HL-325L): 1835 TFLOPS BF16 and FP8 (matrix engines), 128 GB HBM2e,
    # 3.7 TB/s, 900 W (air-cooled OAM), 24 x 200 GbE RoCE = 600 GB/s. Source: Intel Gaudi 3
    # white paper and Hot Chips 2024 deck (R. Kaplan). Efficiency: H100 factors (low confidence).
    # Price: no public hourly quote found [unverified]; $1.9/h assumed from list price
    # (~$15.6k/chip, Intel 2024) relative to MI300X. Override it.
    "gaudi3": _acc(
        "gaudi3",
        "intel",
        _H100_FACTORS,
        bf16_tflops=1835.0,
        fp8_tflops=1835.0,
        memory_gib=128.0,
        memory_bw_gbs=3700.0,
        tdp_w=900.0,
        price_per_hour=1.9,
        link_gbs=600.0,
    ),
    # NVIDIA A100 SXM4 80GB: 312 BF16 dense TFLOPS, no FP8 tensor cores (FP8 checkpoints run
    # weight-only, so fp8_tflops = the BF16 rate), 80 GB HBM2e, 2.039 TB/s, 400 W, NVLink 3
    # 600 GB/s. Source: NVIDIA A100 datasheet. Price ~$1.4/h: specialty clouds $1.10-1.50
    # (aimultiple.com 2026-05).
    "a100": _acc(
        "a100",
        "nvidia",
        _A100_FACTORS,
        bf16_tflops=312.0,
        fp8_tflops=312.0,
        memory_gib=80.0,
        memory_bw_gbs=2039.0,
        tdp_w=400.0,
        price_per_hour=1.4,
        link_gbs=600.0,
    ),
    # NVIDIA L40S: 362 BF16 / 733 FP8 dense TFLOPS, 48 GB GDDR6, 864 GB/s, 350 W, PCIe Gen4 x16
    # (64 GB/s both directions, no NVLink). Source: NVIDIA L40S datasheet (dense = half the
    # sparsity figures). Efficiency: A100 factors (closest measured part). Price ~$1.2/h:
    # typical $1.20-2.00 (aimultiple.com 2026-05).
    "l40s": _acc(
        "l40s",
        "nvidia",
        _A100_FACTORS,
        bf16_tflops=362.0,
        fp8_tflops=733.0,
        memory_gib=48.0,
        memory_bw_gbs=864.0,
        tdp_w=350.0,
        price_per_hour=1.2,
        link_gbs=64.0,
    ),
}

_ALIASES: dict[str, str] = {
    "h100-sxm": "h100",
    "h100-80gb": "h100",
    "h200-sxm": "h200",
    "a100-80gb": "a100",
    "a100-sxm": "a100",
    "gaudi-3": "gaudi3",
    "hl-325l": "gaudi3",
}


def get_accelerator(name: str) -> Accelerator:
    """Look up a catalog accelerator by name (case-insensitive; ``H100-SXM`` works).

    Raises ``KeyError`` whose message lists the known names.
    """
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    try:
        return ACCELERATORS[key]
    except KeyError:
        known = ", ".join(sorted(ACCELERATORS))
        raise KeyError(f"unknown accelerator {name!r}; known: {known}") from None


def custom_accelerator(
    name: str,
    vendor: Vendor,
    bf16_tflops: float,
    fp8_tflops: float,
    memory_gib: float,
    memory_bw_gbs: float,
    price_per_hour: float = 2.0,
    *,
    tdp_w: float = 700.0,
    resource_name: str | None = None,
    like: str = "h100",
    **overrides: float,
) -> Accelerator:
    """Build a user-defined accelerator (``AcceleratorPool`` custom profile).

    Efficiency factors and overheads are copied from the catalog entry ``like`` (H100 by
    default) unless given in ``overrides`` (any float field of :class:`Accelerator`).
    """
    if vendor not in _RESOURCE_NAMES:
        raise ValueError(f"vendor must be one of {sorted(_RESOURCE_NAMES)}, got {vendor!r}")
    for field_name, value in (
        ("bf16_tflops", bf16_tflops),
        ("memory_gib", memory_gib),
        ("memory_bw_gbs", memory_bw_gbs),
    ):
        if value <= 0:
            raise ValueError(f"{field_name} must be positive, got {value}")
    base = get_accelerator(like)
    acc = replace(
        base,
        name=name,
        vendor=vendor,
        bf16_tflops=bf16_tflops,
        fp8_tflops=fp8_tflops if fp8_tflops > 0 else bf16_tflops,
        memory_gib=memory_gib,
        memory_bw_gbs=memory_bw_gbs,
        tdp_w=tdp_w,
        price_per_hour=price_per_hour,
        resource_name=resource_name or _RESOURCE_NAMES[vendor],
    )
    unknown = set(overrides) - {f.name for f in fields(Accelerator) if f.type in ("float", float)}
    if unknown:
        raise ValueError(f"not a numeric Accelerator field: {sorted(unknown)}")
    return replace(acc, **overrides)  # type: ignore[arg-type]


def with_price(acc: Accelerator, price_per_hour: float) -> Accelerator:
    """Return ``acc`` with another hourly price (users' negotiated rates)."""
    return replace(acc, price_per_hour=price_per_hour)
