"""KVTransferReady: from the compatibility check and the sidecars' reports to a condition (pure).

The operator gathers, per worker pod, whether its ``kv-sidecar`` container is ready (pod status)
and, for a sidecar that is not (`tandem.kv_probe`, the operator's ``--probe-kv-sidecars``), which
transport its ``/readyz`` answer names (`report_from_readyz`): a sidecar whose RDMA fell back to
TCP fails its readiness probe, and only that answer tells it from one still starting. This
module decides. Reasons, in order of precedence:

- ``Incompatible``: a prefill/decode pair cannot exchange KV (`tandem.builders.kv.check_compatibility`);
- ``TcpFallback``: RDMA was expected and a sidecar runs TCP, and its pool does not allow fallback;
- ``SidecarNotReady``: a sidecar is not ready yet (or none reported);
- ``Ready`` (True), or ``NotDisaggregated`` (True) for a service without prefill pools.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tandem.builders.kv import CONDITION_TYPE, SIDECAR_CONTAINER, KvProfile, PairProblem
from tandem.models.common import Condition
from tandem.models.inference_service import InferenceServiceSpec, Role
from tandem.names import LABEL_POOL as POOL_LABEL

TCP_FALLBACK = "TcpFallback"
SIDECAR_NOT_READY = "SidecarNotReady"
INCOMPATIBLE = "Incompatible"

_TRANSPORT_SERIES = re.compile(
    r'^tandem_kv_transport\{[^}]*transport="(?P<t>\w+)"[^}]*\}\s+(?P<v>[-+.\deE]+)', re.M
)


@dataclass(frozen=True)
class SidecarReport:
    pool: str
    pod: str
    ready: bool
    transport: str | None = None  # rdma | tcp | shm | None (not known yet)


def parse_transport(metrics_text: str) -> str | None:
    """The transport whose ``tandem_kv_transport`` series is 1 in a sidecar's /metrics text."""
    for match in _TRANSPORT_SERIES.finditer(metrics_text):
        if float(match["v"]) == 1.0:
            return match["t"]
    return None


def report_from_readyz(
    pool: str, pod: str, status_code: int | None, body: Mapping[str, Any] | None
) -> SidecarReport:
    """A report from one ``GET http://<pod IP>:8200/readyz`` (``status_code`` None: unreachable).
    The body names the transport even when the answer is 503, so TcpFallback is told apart."""
    transport = (body or {}).get("transport")
    return SidecarReport(
        pool=pool,
        pod=pod,
        ready=status_code == 200,
        transport=str(transport) if transport in ("rdma", "tcp", "shm") else None,
    )


def sidecar_ready(pod: Mapping[str, Any]) -> bool:
    """Whether a pod's ``kv-sidecar`` container is ready (pod ``status.containerStatuses``)."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == SIDECAR_CONTAINER:
            return bool(status.get("ready"))
    return False


def _cond(status: str, reason: str, message: str, generation: int) -> Condition:
    return Condition.model_validate(
        {
            "type": CONDITION_TYPE,
            "status": status,
            "reason": reason,
            "message": message,
            "observedGeneration": generation,
        }
    )


def _strict_rdma(profile: KvProfile | None, role: Role) -> bool:
    """Whether this end expects RDMA and does not accept TCP instead."""
    if profile is None:
        return False
    return profile.expected_transport(role) == "rdma" and not profile.endpoint(role).allow_tcp_fallback


def kv_transfer_condition(
    spec: InferenceServiceSpec,
    profiles: Mapping[str, KvProfile],
    problems: Sequence[PairProblem],
    reports: Sequence[SidecarReport],
    generation: int,
) -> Condition:
    """The ``KVTransferReady`` condition. ``profiles``: pool name -> `tandem.builders.kv.pool_profile`."""
    if problems:
        return _cond("False", INCOMPATIBLE, " ".join(p.sentence for p in problems), generation)
    if not spec.pools_by_role("prefill"):
        return _cond("True", "NotDisaggregated", "No prefill pool: no KV moves between pools.", generation)
    roles = {p.name: p.role for p in spec.pools}
    fallbacks = []
    for r in reports:
        profile = profiles.get(r.pool)
        if profile is None or r.transport is None:
            continue
        role = roles.get(r.pool, "mixed")
        if r.transport == "tcp" and _strict_rdma(profile, role):
            fallbacks.append(r)
    if fallbacks:
        pods = ", ".join(f"{r.pod} (pool {r.pool})" for r in fallbacks[:5])
        return _cond(
            "False",
            TCP_FALLBACK,
            f"RDMA was requested but the KV transfer runs over TCP on {pods}; set fabric.allowTcpFallback "
            "on the AcceleratorPool to accept it.",
            generation,
        )
    kv_pools = {p.name for p in spec.pools if p.role in ("prefill", "decode")}
    relevant = [r for r in reports if r.pool in kv_pools]
    not_ready = [r for r in relevant if not r.ready]
    if not relevant or not_ready:
        ready = len(relevant) - len(not_ready)
        message = f"{ready} of {len(relevant)} KV-transfer sidecars are ready"
        if not_ready:
            more = ", ..." if len(not_ready) > 3 else ""
            message += f" (not ready: {', '.join(r.pod for r in not_ready[:3])}{more})"
        if any(_strict_rdma(profiles.get(r.pool), roles.get(r.pool, "mixed")) for r in not_ready):
            message += (
                "; a sidecar whose RDMA fell back to TCP stays not ready and logs why "
                "(kubectl logs POD -c kv-sidecar)"
            )
        return _cond("False", SIDECAR_NOT_READY, message + ".", generation)
    transports = sorted({r.transport for r in relevant if r.transport})
    over = f" over {', '.join(transports)}" if transports else ""
    return _cond("True", "Ready", f"{len(relevant)} KV-transfer sidecars are ready{over}.", generation)


def kv_condition_from_pods(
    spec: InferenceServiceSpec,
    accelerator_pools: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    generation: int,
    readyz: Mapping[str, tuple[int | None, Mapping[str, Any] | None]] | None = None,
) -> tuple[Condition, list[PairProblem]]:
    """``KVTransferReady`` from the resolved pools and the service's live pods (their sidecars'
    readiness in pod status), with the incompatible pairs behind it. ``accelerator_pools``:
    pool name -> AcceleratorPoolSpec, as resolved. ``readyz``: pod name -> (status, body) of its
    sidecar's /readyz where the operator asked (`tandem.kv_probe`): the transport it names."""
    from tandem.builders.kv import check_compatibility, pool_profile

    problems = check_compatibility(spec, accelerator_pools)
    profiles = {
        p.name: pool_profile(spec, p, accelerator_pools) for p in spec.pools if p.name in accelerator_pools
    }
    answers = readyz or {}
    reports = []
    for pod in pods:
        meta = pod["metadata"]
        if meta.get("deletionTimestamp") or not meta.get("labels", {}).get(POOL_LABEL):
            continue
        pool, name = str(meta["labels"][POOL_LABEL]), str(meta["name"])
        status, body = answers.get(name, (None, None))
        # pod status (the kubelet's probe) says whether it is ready; the answer, what it runs
        transport = report_from_readyz(pool, name, status, body).transport if body else None
        reports.append(SidecarReport(pool=pool, pod=name, ready=sidecar_ready(pod), transport=transport))
    return kv_transfer_condition(spec, profiles, problems, reports, generation), problems
