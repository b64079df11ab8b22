"""Parsing the engines' queue gauges for the router's replica choice (tandem.router.load)."""

from tandem.router.decide import ReplicaState, pick_replica
from tandem.router.load import engine_queue, outside_load

VLLM = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:num_requests_waiting_by_reason{reason="capacity"} 40.0
vllm:num_requests_total 99
"""


def test_vllm_queue_is_waiting_plus_running_over_every_engine() -> None:
    assert engine_queue(VLLM) == 6  # not the _by_reason series nor other vllm:num_requests_*


def test_sglang_names_and_timestamps() -> None:
    text = 'sglang:num_running_reqs{tp_rank="0"} 5 1700000000000\nsglang:num_queue_reqs 2\n'
    assert engine_queue(text) == 7


def test_no_queue_gauge_is_no_reading_and_garbage_is_skipped() -> None:
    assert engine_queue("# nothing here\nprocess_cpu_seconds_total 3\n") is None
    assert engine_queue("vllm:num_requests_waiting NaN\nvllm:num_requests_running -1\n") is None
    assert engine_queue('vllm:num_requests_waiting{a="b"} oops\nvllm:num_requests_running 2\n') == 2


def test_outside_load_is_what_the_router_did_not_send() -> None:
    assert outside_load(6, 2) == 4
    assert outside_load(1, 3) == 0  # the router's requests not yet (or no longer) on the engine


def test_outside_load_steers_the_pick() -> None:
    busy = ReplicaState("a:1", "mixed", outside=4, last_pick=0)
    idle = ReplicaState("b:1", "mixed", inflight=1, last_pick=5)
    assert pick_replica([busy, idle], now=0.0) is idle
    busy.outside = 0
    assert pick_replica([busy, idle], now=0.0) is busy
