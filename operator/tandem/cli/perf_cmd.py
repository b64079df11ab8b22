"""``tandem perf``: predicted prefill and decode times, KV size and capacity."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tandem.perf.catalog import get_accelerator
from tandem.perf.model import decode_step_seconds, kv_bytes_per_token, kv_capacity_tokens, prefill_seconds
from tandem.perf.models import get_model


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("perf", help="predict prefill/decode times and KV capacity of one instance")
    p.add_argument("--accelerator", required=True, help="catalog name, e.g. h100, mi300x, gaudi3")
    p.add_argument("--model", required=True, help="model preset, e.g. llama-3.1-70b")
    p.add_argument(
        "--dtype", choices=["fp16", "bf16", "fp8"], default=None, help="override the preset's dtype"
    )
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel devices per instance")
    p.add_argument("--prompt-tokens", type=int, default=2048, help="prompt length for the prefill time")
    p.add_argument("--batch", type=int, default=1, help="decode batch size")
    p.add_argument("--context", type=int, default=None, help="context tokens per sequence (default: prompt)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        acc = get_accelerator(args.accelerator)
        model = get_model(args.model, args.dtype)
    except (KeyError, ValueError) as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    context = args.prompt_tokens if args.context is None else args.context
    capacity = kv_capacity_tokens(acc, model, args.tp)
    if capacity <= 0:
        print(f"error: {model.name} ({model.dtype}) does not fit on {args.tp} x {acc.name}", file=sys.stderr)
        return 1
    out = {
        "accelerator": acc.name,
        "model": model.name,
        "dtype": model.dtype,
        "tp": args.tp,
        "prompt_tokens": args.prompt_tokens,
        "batch": args.batch,
        "context_tokens_per_seq": context,
        "prefill_ms": prefill_seconds(acc, model, args.tp, args.prompt_tokens) * 1e3,
        "decode_step_ms": decode_step_seconds(acc, model, args.tp, args.batch, args.batch * context) * 1e3,
        "kv_bytes_per_token": kv_bytes_per_token(model),
        "kv_capacity_tokens": capacity,
        "price_per_hour": acc.price_per_hour * args.tp,
    }
    if args.json:
        print(json.dumps(out))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model.name} ({model.dtype}) on {args.tp} x {acc.name}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row(f"prefill, {args.prompt_tokens} tokens", f"{out['prefill_ms']:.1f} ms")
    table.add_row(f"decode step, batch {args.batch} x {context} ctx", f"{out['decode_step_ms']:.1f} ms")
    table.add_row("KV bytes per token", f"{out['kv_bytes_per_token']:,}")
    table.add_row("KV capacity", f"{capacity:,} tokens")
    table.add_row("price", f"${out['price_per_hour']:.2f}/h")
    Console().print(table)
    return 0
