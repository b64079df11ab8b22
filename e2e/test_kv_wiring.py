"""KV-transfer wiring on the real cluster: RDMA resources and Multus networks reach the pods, and an
incompatible prefill/decode pair is refused with KVTransferReady=False and an Event."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from e2e.harness.common import wait_for
from e2e.harness.operator import OperatorProcess, install_crds

MULTUS = "k8s.v1.cni.cncf.io/networks"
RDMA = "rdma/rdma_shared_device_a"


def pool(name: str, vendor: str, model: str, taint: str, fabric: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "inference.tandem.dev/v1alpha1",
        "kind": "AcceleratorPool",
        "metadata": {"name": name},
        "spec": {
            "vendor": vendor,
            "model": model,
            "nodeSelector": {"inference.tandem.dev/accelerator-model": model},
            "tolerations": [{"key": taint, "operator": "Exists", "effect": "NoSchedule"}],
            "fabric": fabric,
        },
    }


RDMA_FABRIC = {"type": "rdma", "rdmaResource": {"name": RDMA, "count": 1}, "networks": ["kv-rdma"]}


@pytest.fixture(scope="module")
def kv_pools(cluster: Any) -> Iterator[None]:
    install_crds(cluster)
    docs = [
        pool("kv-b200", "nvidia", "B200", "nvidia.com/gpu", RDMA_FABRIC),
        pool("kv-gaudi3", "intel", "Gaudi3", "habana.ai/gaudi", RDMA_FABRIC),
        pool("kv-mi300x", "amd", "MI300X", "amd.com/gpu", {"type": "tcp"}),
        pool("kv-h100", "nvidia", "H100-SXM", "nvidia.com/gpu", {"type": "tcp"}),
    ]
    cluster.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs))
    yield
    cluster.kubectl("delete", "accpool", *(d["metadata"]["name"] for d in docs), "--wait=false", check=False)


@pytest.fixture
def op(cluster: Any, namespace: str, kv_pools: None, diagnostics: Any) -> Iterator[OperatorProcess]:
    # as the chart runs it; KWOK marks the sidecars ready, so none is asked (kv_probe.to_ask)
    proc = OperatorProcess.for_namespace(cluster, namespace, extra_args=["--probe-kv-sidecars"])
    diagnostics.add_log(proc.log_path)
    with proc:
        yield proc


def get(cluster: Any, namespace: str, *what: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", *what, "-n", namespace, "-o", "json").stdout)  # type: ignore[no-any-return]


def condition(svc: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (svc.get("status") or {}).get("conditions", []) if c["type"] == type_), None)


def kv_config(pod: dict[str, Any]) -> dict[str, Any]:
    """The engine's --kv-transfer-config of a worker pod."""
    command = next(c for c in pod["spec"]["containers"] if c["name"] == "engine")["command"]
    return json.loads(command[command.index("--kv-transfer-config") + 1])  # type: ignore[no-any-return]


def service(name: str, model: dict[str, Any], prefill: str, decode: str) -> dict[str, Any]:
    return {
        "apiVersion": "inference.tandem.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {
            "model": model,
            "engine": "vllm",
            "pools": [
                {"name": "prefill", "role": "prefill", "acceleratorPool": prefill, "tensorParallelSize": 2},
                {"name": "decode", "role": "decode", "acceleratorPool": decode, "tensorParallelSize": 2},
            ],
        },
    }


def test_rdma_fabric_reaches_the_pods(cluster: Any, namespace: str, op: OperatorProcess) -> None:
    doc = service("kv", {"name": "meta-llama/Llama-3.1-8B", "preset": "llama-3.1-8b"}, "kv-b200", "kv-gaudi3")
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))

    def running() -> list[dict[str, Any]] | None:
        pods = [
            p
            for p in get(cluster, namespace, "pods", "-l", "inference.tandem.dev/service=kv")["items"]
            if "inference.tandem.dev/pool" in p["metadata"]["labels"]
        ]
        ok = len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods)
        return pods if ok else None

    pods = wait_for(running, timeout=90, what="the prefill and decode pods Running")
    for p in pods:
        assert "kv-rdma" in p["metadata"]["annotations"][MULTUS]
        containers = {c["name"]: c for c in p["spec"]["containers"]}
        sidecar = containers["kv-sidecar"]
        assert sidecar["resources"]["requests"][RDMA] == "1"
        assert sidecar["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
        assert not sidecar["securityContext"].get("privileged")
        assert not p["spec"].get("hostNetwork")
        assert kv_config(p)["kv_connector"] == "NixlConnector"
    roles = {p["metadata"]["labels"]["inference.tandem.dev/pool"]: p for p in pods}
    buffers = {pool: kv_config(p)["kv_buffer_device"] for pool, p in roles.items()}
    assert buffers == {"prefill": "cuda", "decode": "cpu"}  # Gaudi stages KV in host memory

    def kv_ready() -> dict[str, Any] | None:
        c = condition(get(cluster, namespace, "tisvc", "kv"), "KVTransferReady")
        return c if c and c["status"] == "True" else None

    c = wait_for(kv_ready, timeout=60, what="KVTransferReady=True")
    assert "2 KV-transfer sidecars are ready" in c["message"]


def test_incompatible_pair_is_refused(cluster: Any, namespace: str, op: OperatorProcess) -> None:
    fp8 = {
        "name": "example/fp8-model",
        "architecture": {
            "parametersBillions": 8,
            "layers": 32,
            "hiddenSize": 4096,
            "kvHeads": 8,
            "headDim": 128,
            "dtype": "fp8",
        },
    }
    doc = service("bad", fp8, "kv-mi300x", "kv-h100")
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))

    def refused() -> dict[str, Any] | None:
        c = condition(get(cluster, namespace, "tisvc", "bad"), "KVTransferReady")
        return c if c and c["reason"] == "Incompatible" else None

    c = wait_for(refused, timeout=60, what="KVTransferReady=False Incompatible")
    assert c["status"] == "False"
    assert "'prefill'" in c["message"] and "'decode'" in c["message"]
    deployments = {d["metadata"]["name"] for d in get(cluster, namespace, "deployments")["items"]}
    assert "bad-prefill" not in deployments and "bad-decode" not in deployments
    # the service waits for a fix rather than "rolling out" Deployments that never come
    svc = get(cluster, namespace, "tisvc", "bad")
    for kind, status in (("Ready", "False"), ("Progressing", "False"), ("Degraded", "True")):
        c = condition(svc, kind)
        assert c is not None and (c["status"], c["reason"]) == (status, "Incompatible"), (kind, c)
    wait_for(
        lambda: any(
            e.get("reason") == "Incompatible" and e.get("type") == "Warning"
            for e in get(cluster, namespace, "events")["items"]
        ),
        timeout=30,
        what="a Warning Event naming the pair",
    )
