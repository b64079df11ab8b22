"""The Argo CD health checks (charts/tandem/argocd/*.lua) on sample objects, run by a real Lua 5.1
interpreter (Argo CD runs health scripts with Lua 5.1 semantics). Skipped without lua5.1, except
in CI (CI=true), where a missing interpreter fails."""

from __future__ import annotations

import sys
from pathlib import Path as _Path

# e2e/harness/chart.py (helm, Lua runner) is shared with the e2e suite; `pytest tests` does not
# put the repository root on sys.path by itself.
sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))

import shutil
from typing import Any

import pytest
from e2e.harness.chart import ARGOCD_HEALTH, argocd_health, in_ci


@pytest.fixture(scope="module")
def lua() -> str:
    found = shutil.which("lua5.1")
    if found is None:
        if in_ci():
            pytest.fail("lua5.1 is not installed (CI=true: required; apt-get install lua5.1)")
        pytest.skip("lua5.1 is not installed (apt-get install lua5.1)")
    return found


def cond(type_: str, status: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message, "observedGeneration": 3}


def service(*conditions: dict[str, Any], generation: int = 3, observed: int | None = 3) -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": list(conditions), "ratio": "1:2"}
    if observed is not None:
        status["observedGeneration"] = observed
    return {
        "apiVersion": "inference.tandem.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "llama", "namespace": "team-a", "generation": generation},
        "spec": {"model": {"name": "m"}},
        "status": status,
    }


READY = cond("Ready", "True", "AllReplicasReady", "All pools and the router are ready.")
ROLLING = cond("Progressing", "True", "RollingOut", "Rolling out: decode.")
NOT_DEGRADED = cond("Degraded", "False", "AsExpected")


@pytest.mark.parametrize(
    ("obj", "status", "in_message"),
    [
        pytest.param(
            {"kind": "InferenceService", "metadata": {"name": "x", "generation": 1}, "spec": {}},
            "Progressing",
            "reconcile",
            id="new-no-status",
        ),
        pytest.param(
            service(READY, cond("Progressing", "False", "RolloutComplete"), NOT_DEGRADED),
            "Healthy",
            "P:D 1:2",
            id="ready",
        ),
        pytest.param(
            service(READY, NOT_DEGRADED, generation=4, observed=3),
            "Progressing",
            "generation 4",
            id="spec-changed-not-yet-observed",
        ),
        pytest.param(
            service(READY, NOT_DEGRADED, observed=None),
            "Progressing",
            "generation 3",
            id="no-observed-generation",
        ),
        pytest.param(
            service(cond("Ready", "False", "RollingOut", "Waiting for decode."), ROLLING, NOT_DEGRADED),
            "Progressing",
            "Rolling out: decode.",
            id="rolling-out",
        ),
        pytest.param(
            service(
                cond("Ready", "False", "AcceleratorPoolNotFound", "acceleratorPool gaudi3 does not exist"),
                cond("Progressing", "False", "AcceleratorPoolNotFound"),
                cond("Degraded", "True", "AcceleratorPoolNotFound", "acceleratorPool gaudi3 does not exist"),
            ),
            "Degraded",
            "AcceleratorPoolNotFound: acceleratorPool gaudi3 does not exist",
            id="degraded",
        ),
        pytest.param(
            service(cond("Ready", "False", "Starting", "Waiting for pods.")),
            "Progressing",
            "Starting: Waiting for pods.",
            id="not-ready-no-progressing",
        ),
        pytest.param(
            service(cond("Ready", "True", "AllReplicasReady", 'quotes " and \\ and\nnewlines')),
            "Healthy",
            "newlines",
            id="odd-characters",
        ),
    ],
)
def test_inferenceservice_health(lua: str, obj: dict[str, Any], status: str, in_message: str) -> None:
    got_status, message = argocd_health(lua, ARGOCD_HEALTH["InferenceService"], obj)
    assert got_status == status
    assert in_message in message


def pool(ready: dict[str, Any] | None, **status: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "inference.tandem.dev/v1alpha1",
        "kind": "AcceleratorPool",
        "metadata": {"name": "h100", "generation": 1},
        "spec": {"vendor": "nvidia", "model": "H100-SXM"},
    }
    if ready is not None or status:
        obj["status"] = {"observedGeneration": 1, **status, "conditions": [ready] if ready else []}
    return obj


@pytest.mark.parametrize(
    ("obj", "status", "in_message"),
    [
        pytest.param(pool(None), "Progressing", "count", id="no-status"),
        pytest.param(
            pool(
                cond("Ready", "True", "DevicesAvailable", "4 nodes"),
                matchingNodes=4,
                allocatableDevices=32,
                allocatedDevices=12,
            ),
            "Healthy",
            "4 nodes, 32 devices (12 allocated)",
            id="ready",
        ),
        pytest.param(
            pool(cond("Ready", "False", "NoMatchingNodes", "No schedulable node matches the nodeSelector.")),
            "Degraded",
            "NoMatchingNodes",
            id="no-nodes",
        ),
        pytest.param(
            pool(cond("Ready", "False", "NoDevices", "The matching nodes expose no nvidia.com/gpu.")),
            "Degraded",
            "NoDevices",
            id="no-devices",
        ),
    ],
)
def test_acceleratorpool_health(lua: str, obj: dict[str, Any], status: str, in_message: str) -> None:
    got_status, message = argocd_health(lua, ARGOCD_HEALTH["AcceleratorPool"], obj)
    assert got_status == status
    assert in_message in message


def test_scripts_use_only_lua_5_1(lua: str) -> None:
    """Lua 5.2+ only syntax (goto, integer division, bit operators) would not compile under 5.1."""
    import subprocess

    for script in ARGOCD_HEALTH.values():
        proc = subprocess.run([lua, "-e", f"assert(loadfile('{script}'))"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_argocd_readme_embeds_the_scripts() -> None:
    """The README's argocd-cm snippet holds the current scripts (copy-paste must not install stale ones)."""
    readme = (ARGOCD_HEALTH["InferenceService"].parent / "README.md").read_text()
    for kind, script in ARGOCD_HEALTH.items():
        assert f"resource.customizations.health.inference.tandem.dev_{kind}: |" in readme
        body = "\n".join("    " + line if line else "" for line in script.read_text().splitlines())
        assert body in readme, f"{script.name} differs from the copy in argocd/README.md"
