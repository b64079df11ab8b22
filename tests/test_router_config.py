"""The router's config format (as the operator writes it), token counting, EndpointSlice parsing and
the InferencePool interop builder."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
import yaml

from helpers import check_golden, make_ctx
from tandem.builders import desired_objects
from tandem.builders.router import build_inference_pools, build_router_configmap, router_config
from tandem.router.config import ConfigError, parse_config, parse_config_text
from tandem.router.discovery import addresses_from_slices
from tandem.router.replicas import ReplicaTable
from tandem.router.tokens import TokenCounter, estimate_bytes, load_counter


def test_the_operators_config_parses(sample_service: dict[str, Any], sample_pools: dict[str, dict]) -> None:
    ctx = make_ctx(sample_service["spec"], sample_pools)
    configmap = build_router_configmap(ctx, split_threshold=2048)
    config = parse_config_text(configmap["data"]["router.json"])
    assert config.model == "meta-llama/Llama-3.1-70B-Instruct"
    assert config.namespace == "team-a"
    assert [(p.name, p.role, p.service, p.port, p.endpoints) for p in config.pools] == [
        ("prefill", "prefill", "llama-prefill", 8000, None),
        ("decode", "decode", "llama-decode", 8000, None),
        ("mixed", "mixed", "llama-mixed", 8000, None),
    ]
    assert config.split_threshold_tokens == 2048  # the planner's threshold wins over the spec's
    assert config.discovers
    assert config.limits.prefill_inflight_per_replica == 4
    assert config.timeouts.decode_seconds == 3600


def test_older_configs_without_the_new_keys_still_parse(
    sample_service: dict[str, Any], sample_pools: dict[str, dict]
) -> None:
    doc = router_config(make_ctx(sample_service["spec"], sample_pools))
    del doc["limits"], doc["timeouts"]
    config = parse_config(doc)
    assert config.limits.mixed_inflight_per_replica == 16
    assert config.timeouts.connect_seconds == 5


def test_static_endpoints() -> None:
    config = parse_config(
        {
            "model": "m",
            "pools": [{"name": "x", "role": "mixed", "endpoints": ["127.0.0.1:8001", "[::1]:8002"]}],
        }
    )
    assert config.pools[0].endpoints == ("127.0.0.1:8001", "[::1]:8002")
    assert config.pools[0].service == "x"
    assert not config.discovers


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "must be a JSON object"),
        ({"pools": [{"name": "a", "role": "mixed"}]}, "model must be"),
        ({"model": "m", "pools": []}, "pools must be a non-empty list"),
        ({"model": "m", "pools": [{"name": "a", "role": "both"}]}, "pools[0].role must be one of"),
        ({"model": "m", "pools": [{"name": "a", "role": "mixed"}] * 2}, "pool names must be unique"),
        ({"model": "m", "pools": [{"name": "a", "role": "mixed", "endpoints": ["nohost"]}]}, "host:port"),
        ({"model": "m", "pools": [{"name": "a", "role": "mixed"}], "disaggregation": "x"}, "disaggregation"),
        (
            {"model": "m", "pools": [{"name": "a", "role": "mixed"}], "splitThresholdTokens": -1},
            "splitThreshold",
        ),
        (
            {"model": "m", "pools": [{"name": "a", "role": "mixed"}], "timeouts": {"decodeSeconds": 0}},
            "decodeSec",
        ),
        (
            {
                "model": "m",
                "pools": [{"name": "a", "role": "mixed"}],
                "limits": {"mixedInflightPerReplica": 0},
            },
            "mixed",
        ),
        (
            {"model": "m", "pools": [{"name": "a", "role": "prefill", "secondsPerPromptToken": 0}]},
            "pools[0].secondsPerPromptToken must be a positive number or null",
        ),
        (
            {"model": "m", "pools": [{"name": "a", "role": "prefill", "secondsPerPromptToken": "fast"}]},
            "secondsPerPromptToken",
        ),
        (
            {
                "model": "m",
                "pools": [{"name": "a", "role": "prefill", "secondsPerPromptToken": float("inf")}],
            },
            "secondsPerPromptToken",
        ),
    ],
)
def test_invalid_configs_name_the_field(doc: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(doc)


def test_invalid_json() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_config_text("{")


def test_token_counting_by_bytes() -> None:
    counter = TokenCounter()
    assert counter.method == "bytes"
    assert estimate_bytes("") == 0
    assert estimate_bytes("abcd") == 1 and estimate_bytes("abcde") == 2
    assert estimate_bytes("é" * 4) == 2  # 8 UTF-8 bytes
    assert counter.completion({"prompt": "a" * 4000}) == 1000
    assert counter.completion({"prompt": list(range(77))}) == 77
    assert counter.completion({"prompt": ["a" * 8, [1, 2, 3]]}) == 5
    assert counter.completion({"prompt": None}) == 0
    chat = {
        "messages": [
            {"role": "system", "content": "a" * 40},
            {"role": "user", "content": [{"text": "b" * 8}]},
        ]
    }
    assert counter.chat(chat) == 3 + 4 + 10 + 4 + 2
    assert counter.chat({"messages": "nope"}) == 0


def test_tokenizer_is_optional() -> None:
    # transformers is not a dependency: an unavailable tokenizer falls back to the byte estimate
    assert load_counter(None).method == "bytes"
    assert load_counter("/nonexistent/tokenizer").method == "bytes"
    counter = TokenCounter(lambda text: len(text.split()))
    assert counter.method == "tokenizer"
    assert counter.completion({"prompt": "three short words"}) == 3


def test_addresses_from_endpointslices() -> None:
    slices = [
        {
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.0.0.2"], "conditions": {"ready": True}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": False}},  # not ready
                {"addresses": ["10.0.0.4"], "conditions": {}},  # unknown counts as ready
                {"addresses": ["10.0.0.2"], "conditions": {"ready": True}},  # duplicate
            ],
        },
        {
            "addressType": "IPv6",
            "ports": [{"name": "metrics", "port": 9000}],
            "endpoints": [{"addresses": ["fd00::5"]}],
        },
        {"ports": None, "endpoints": None},
    ]
    assert addresses_from_slices(slices, default_port=8000) == [
        "10.0.0.2:8000",
        "10.0.0.4:8000",
        "[fd00::5]:9000",
    ]


def test_the_operator_quotes_each_prefill_parts_modelled_speed(sample_pools: dict[str, dict]) -> None:
    """Prefill pools on different parts get their modelled seconds per prompt token (the router
    picks by it); the faster part's is the smaller, and the replicas carry it."""
    spec = {
        "model": {"name": "meta-llama/Llama-3.1-70B-Instruct", "preset": "llama-3.1-70b"},
        "pools": [
            {"name": "pf-h100", "role": "prefill", "acceleratorPool": "h100"},
            {"name": "pf-mi300x", "role": "prefill", "acceleratorPool": "mi300x"},
            {"name": "decode", "role": "decode", "acceleratorPool": "mi300x"},
        ],
    }
    config = parse_config(router_config(make_ctx(spec, sample_pools)))
    speeds = {p.name: p.seconds_per_prompt_token for p in config.pools}
    assert speeds["decode"] is None
    h100, mi300x = speeds["pf-h100"], speeds["pf-mi300x"]
    assert h100 is not None and mi300x is not None and 0 < mi300x < h100  # MI300X: more FLOPS than H100
    table = ReplicaTable()
    table.configure(config.pools)
    table.set_endpoints("pf-h100", ["a:1"])
    assert table.by_role["prefill"][0].seconds_per_token == h100
    faster = replace(config.pools[0], seconds_per_prompt_token=h100 / 2)
    table.configure((faster, *config.pools[1:]))  # a reload updates the replicas that stay
    assert table.by_role["prefill"][0].seconds_per_token == h100 / 2


def test_replica_table_keeps_counters_across_updates() -> None:
    config = parse_config(
        {"model": "m", "pools": [{"name": "d", "role": "decode"}, {"name": "d2", "role": "decode"}]}
    )
    table = ReplicaTable()
    table.configure(config.pools)
    assert table.set_endpoints("d", ["a:1", "b:1"])
    assert table.set_endpoints("d2", ["c:1"])
    table.by_pool["d"][0].inflight = 3
    assert not table.set_endpoints("d", ["a:1", "b:1"])  # unchanged
    assert table.set_endpoints("d", ["b:1", "a:1", "e:1"])
    assert {r.address: r.inflight for r in table.by_role["decode"]} == {
        "a:1": 3,
        "b:1": 0,
        "e:1": 0,
        "c:1": 0,
    }
    assert not table.set_endpoints("unknown", ["x:1"])
    table.configure(config.pools[:1])
    assert [r.address for r in table.by_role["decode"]] == ["b:1", "a:1", "e:1"]


def test_inference_pools_golden(sample_service: dict[str, Any], sample_pools: dict[str, dict]) -> None:
    ctx = make_ctx(sample_service["spec"], sample_pools)
    objects = build_inference_pools(ctx)
    check_golden("inferencepools-llama", objects)
    by_role = {o["metadata"]["name"]: o for o in objects}
    assert sorted(by_role) == ["llama-decode", "llama-mixed", "llama-prefill"]
    decode = by_role["llama-decode"]
    assert decode["apiVersion"] == "inference.networking.k8s.io/v1" and decode["kind"] == "InferencePool"
    assert decode["spec"]["selector"] == {
        "matchLabels": {"inference.tandem.dev/service": "llama", "inference.tandem.dev/role": "decode"}
    }
    assert decode["spec"]["targetPorts"] == [{"number": 8000}]
    assert decode["spec"]["endpointPickerRef"]["name"] == "llama-epp"
    assert decode["metadata"]["ownerReferences"][0]["kind"] == "InferenceService"
    custom = build_inference_pools(ctx, epp_service="llm-d-epp", epp_port=9100)
    assert {o["spec"]["endpointPickerRef"]["name"] for o in custom} == {"llm-d-epp"}
    assert {json.dumps(o["spec"]["endpointPickerRef"]["port"]) for o in custom} == {'{"number": 9100}'}
    # the selector matches the worker pods the builders make
    pods = [
        o["spec"]["template"]["metadata"]["labels"]
        for o in desired_objects(ctx)
        if o["kind"] == "Deployment" and o["metadata"]["name"] != "llama-router"
    ]
    for pool in objects:
        wanted = pool["spec"]["selector"]["matchLabels"]
        assert sum(all(p.get(k) == v for k, v in wanted.items()) for p in pods) == 1
    assert yaml.safe_load(json.dumps(objects)) == objects


def test_inference_pools_are_desired_only_where_served_and_not_turned_off(
    sample_service: dict[str, Any], sample_pools: dict[str, dict]
) -> None:
    ctx = make_ctx(sample_service["spec"], sample_pools)
    kinds = lambda objs: [o["kind"] for o in objs]  # noqa: E731
    assert "InferencePool" not in kinds(desired_objects(ctx))  # the API is not served
    served = desired_objects(ctx, inference_pools=True)
    assert kinds(served)[-3:] == ["InferencePool"] * 3  # after the router: nothing waits on them
    spec = {
        **sample_service["spec"],
        "routing": {"inferencePool": {"endpointPicker": "llm-d-epp", "failureMode": "FailOpen"}},
    }
    custom = desired_objects(make_ctx(spec, sample_pools), inference_pools=True)
    refs = [o["spec"]["endpointPickerRef"] for o in custom if o["kind"] == "InferencePool"]
    assert {(r["name"], r["port"]["number"], r["failureMode"]) for r in refs} == {
        ("llm-d-epp", 9002, "FailOpen")
    }
    off = {**sample_service["spec"], "routing": {"inferencePool": {"mode": "off"}}}
    assert "InferencePool" not in kinds(desired_objects(make_ctx(off, sample_pools), inference_pools=True))
