"""The e2e fleet agent's translation of a pod's command line into a loopback worker's."""

from e2e.harness.fleet_agent import worker_args


def test_worker_args_drop_what_the_agent_sets_and_the_sidecar_it_does_not_run() -> None:
    command = [
        "tandem-sim-worker",
        "--role",
        "decode",
        "--port=8000",
        "--kv-sidecar",
        "$(TANDEM_KV_SIDECAR_URL)",
        "--model",
        "llama-3.1-8b",
        "--host",
        "0.0.0.0",
    ]
    assert worker_args(command) == ["--role", "decode", "--model", "llama-3.1-8b"]
