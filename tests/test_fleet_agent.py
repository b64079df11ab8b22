"""The e2e fleet agent's translation of a pod's command line into a loopback worker's."""

from e2e.harness.fleet_agent import sidecar_env, worker_args


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


def test_sidecar_env_is_the_containers_on_the_agents_loopback() -> None:
    container = {
        "name": "kv-sidecar",
        "env": [
            {"name": "TANDEM_KV_LAYOUT", "value": "HND"},
            {"name": "TANDEM_KV_PORT", "value": "8200"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        ],
    }
    env = sidecar_env(container, "decode-0", 41234)
    assert env["TANDEM_KV_LAYOUT"] == "HND"
    assert env["POD_NAME"] == "decode-0"  # the NIXL agent name: unique per pod
    assert env["POD_IP"] == "127.0.0.1"
    assert env["TANDEM_KV_PORT"] == "41234"
    assert "SECRET" not in env
