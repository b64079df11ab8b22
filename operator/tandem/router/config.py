"""The router's configuration: the JSON document the operator writes into the router's ConfigMap.

The format (``tandem.builders.router.router_config`` writes it; every key not listed as required
has a default, so older documents stay valid)::

    {
      "model": "meta-llama/Llama-3.1-8B",            # required
      "namespace": "team-a",                          # where the pool Services live
      "pools": [                                      # required, at least one
        {"name": "prefill", "role": "prefill",        # role: prefill | decode | mixed
         "service": "llama-prefill", "port": 8000, "vendor": "nvidia",
         "endpoints": ["127.0.0.1:8001"],             # optional: static replicas, no discovery
         "secondsPerPromptToken": 4.1e-05}            # optional: modelled prefill time per token
      ],
      "disaggregation": "auto",                       # auto | always | never
      "splitThresholdTokens": 1024,                   # split at or above this many prompt tokens
      "timeouts": {"connectSeconds": 5, "prefillSeconds": 300, "decodeSeconds": 3600},
      "limits": {"prefillInflightPerReplica": 4,      # the prefill pool is saturated when every
                 "mixedInflightPerReplica": 16},      # replica has this many requests in flight
      "tokenizer": null                               # optional: local tokenizer path or name
    }

``secondsPerPromptToken`` (prefill pools; the operator writes it from the performance model) lets
the router send a prompt to the prefill replica that would finish it first, so a faster part takes
more of the work; without it on every prefill pool, replicas are picked by request counts.

`parse_config` is pure; `load_config` reads a file. A document that does not parse raises
`ConfigError` with a sentence naming the field, and the running router keeps its previous config.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("prefill", "decode", "mixed")
DISAGGREGATION_MODES = ("auto", "always", "never")

DEFAULT_SPLIT_THRESHOLD_TOKENS = 1024  # the InferenceService's routing.minPromptTokens default
DEFAULT_CONNECT_SECONDS = 5.0
DEFAULT_PREFILL_SECONDS = 300.0
DEFAULT_DECODE_SECONDS = 3600.0
# A prefill replica runs a few prompts per iteration before its token budget (vLLM's
# max_num_batched_tokens, 8192 by default) is full; past that a request only queues.
DEFAULT_LOAD_POLL_SECONDS = 1.0  # how often the engines' queues are read (0: never)
DEFAULT_PREFILL_INFLIGHT_PER_REPLICA = 4
DEFAULT_MIXED_INFLIGHT_PER_REPLICA = 16


class ConfigError(ValueError):
    """The router config is not valid; the message names the field."""


@dataclass(frozen=True)
class PoolConfig:
    name: str
    role: str
    service: str
    port: int
    vendor: str = ""
    # Static replicas ("host:port"); None means discover them from the Service's EndpointSlices.
    endpoints: tuple[str, ...] | None = None
    # Modelled prefill seconds per prompt token of one replica (None: unknown).
    seconds_per_prompt_token: float | None = None


@dataclass(frozen=True)
class Timeouts:
    connect_seconds: float = DEFAULT_CONNECT_SECONDS
    prefill_seconds: float = DEFAULT_PREFILL_SECONDS  # the prefill step, or time to first byte
    decode_seconds: float = DEFAULT_DECODE_SECONDS  # the whole response of a decode or mixed call


@dataclass(frozen=True)
class Limits:
    prefill_inflight_per_replica: int = DEFAULT_PREFILL_INFLIGHT_PER_REPLICA
    mixed_inflight_per_replica: int = DEFAULT_MIXED_INFLIGHT_PER_REPLICA


@dataclass(frozen=True)
class RouterConfig:
    model: str
    pools: tuple[PoolConfig, ...]
    namespace: str = "default"
    disaggregation: str = "auto"
    split_threshold_tokens: int = DEFAULT_SPLIT_THRESHOLD_TOKENS
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    tokenizer: str | None = None
    load_poll_seconds: float = DEFAULT_LOAD_POLL_SECONDS

    @property
    def discovers(self) -> bool:
        """True when some pool has no static endpoints (so the Kubernetes API is needed)."""
        return any(pool.endpoints is None for pool in self.pools)


def _positive_number(doc: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{where}{key} must be a positive number, not {value!r}")
    return float(value)


def _positive_int(doc: Mapping[str, Any], key: str, default: int, where: str, minimum: int = 1) -> int:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}{key} must be an integer >= {minimum}, not {value!r}")
    return value


def _mapping(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be an object")
    return value


def _parse_endpoint(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty 'host:port' string, not {value!r}")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{where} must be 'host:port', not {value!r}")
    return value


def _parse_pool(doc: Any, index: int) -> PoolConfig:
    where = f"pools[{index}]."
    if not isinstance(doc, Mapping):
        raise ConfigError(f"pools[{index}] must be an object")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}name must be a non-empty string")
    role = doc.get("role")
    if role not in ROLES:
        raise ConfigError(f"{where}role must be one of {', '.join(ROLES)}, not {role!r}")
    service = doc.get("service", name)
    if not isinstance(service, str) or not service:
        raise ConfigError(f"{where}service must be a non-empty string")
    port = _positive_int(doc, "port", 8000, where)
    endpoints_doc = doc.get("endpoints")
    endpoints: tuple[str, ...] | None = None
    if endpoints_doc is not None:
        if not isinstance(endpoints_doc, list):
            raise ConfigError(f"{where}endpoints must be a list of 'host:port' strings")
        endpoints = tuple(_parse_endpoint(e, f"{where}endpoints[{i}]") for i, e in enumerate(endpoints_doc))
    vendor = doc.get("vendor", "")
    speed = doc.get("secondsPerPromptToken")
    if speed is not None and (
        isinstance(speed, bool) or not isinstance(speed, int | float) or not 0 < speed < math.inf
    ):
        raise ConfigError(f"{where}secondsPerPromptToken must be a positive number or null, not {speed!r}")
    return PoolConfig(
        name=name,
        role=str(role),
        service=service,
        port=port,
        vendor=str(vendor or ""),
        endpoints=endpoints,
        seconds_per_prompt_token=None if speed is None else float(speed),
    )


def parse_config(doc: Any) -> RouterConfig:
    """A `RouterConfig` from the JSON document; raises `ConfigError` naming the first bad field."""
    if not isinstance(doc, Mapping):
        raise ConfigError("the router config must be a JSON object")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError("model must be a non-empty string")
    pools_doc = doc.get("pools")
    if not isinstance(pools_doc, list) or not pools_doc:
        raise ConfigError("pools must be a non-empty list")
    pools = tuple(_parse_pool(p, i) for i, p in enumerate(pools_doc))
    if len({p.name for p in pools}) != len(pools):
        raise ConfigError("pool names must be unique")
    mode = doc.get("disaggregation", "auto")
    if mode not in DISAGGREGATION_MODES:
        raise ConfigError(f"disaggregation must be one of {', '.join(DISAGGREGATION_MODES)}, not {mode!r}")
    threshold = _positive_int(doc, "splitThresholdTokens", DEFAULT_SPLIT_THRESHOLD_TOKENS, "", minimum=0)
    t = _mapping(doc, "timeouts")
    timeouts = Timeouts(
        connect_seconds=_positive_number(t, "connectSeconds", DEFAULT_CONNECT_SECONDS, "timeouts."),
        prefill_seconds=_positive_number(t, "prefillSeconds", DEFAULT_PREFILL_SECONDS, "timeouts."),
        decode_seconds=_positive_number(t, "decodeSeconds", DEFAULT_DECODE_SECONDS, "timeouts."),
    )
    lim = _mapping(doc, "limits")
    limits = Limits(
        prefill_inflight_per_replica=_positive_int(
            lim, "prefillInflightPerReplica", DEFAULT_PREFILL_INFLIGHT_PER_REPLICA, "limits."
        ),
        mixed_inflight_per_replica=_positive_int(
            lim, "mixedInflightPerReplica", DEFAULT_MIXED_INFLIGHT_PER_REPLICA, "limits."
        ),
    )
    poll = doc.get("loadPollSeconds", DEFAULT_LOAD_POLL_SECONDS)
    if isinstance(poll, bool) or not isinstance(poll, int | float) or not 0 <= poll <= 3600:
        raise ConfigError(f"loadPollSeconds must be a number of seconds from 0 (off) to 3600, not {poll!r}")
    namespace = doc.get("namespace") or "default"
    tokenizer = doc.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise ConfigError("tokenizer must be a string (a local path or model name) or null")
    return RouterConfig(
        model=model,
        pools=pools,
        namespace=str(namespace),
        disaggregation=str(mode),
        split_threshold_tokens=threshold,
        timeouts=timeouts,
        limits=limits,
        tokenizer=tokenizer or None,
        load_poll_seconds=float(poll),
    )


def parse_config_text(text: str | bytes) -> RouterConfig:
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the router config is not valid JSON: {exc}") from None
    return parse_config(doc)


def load_config(path: str | Path) -> RouterConfig:
    """Read and parse a config file (blocking: call it from a thread inside the event loop)."""
    return parse_config_text(Path(path).read_bytes())
