"""The Gateway API Inference Extension's InferencePool API for e2e tests.

Tests that need the API install Tandem's stand-in CRD (``e2e/crds/``) unless the cluster already
serves a real one (a kind or other external cluster with the upstream CRDs: then the tests run
against it, and it is never replaced or removed). Only the stand-in, recognised by its label, is
ever deleted.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from e2e.harness.common import REPO_ROOT, wait_for

CRD_FILE = REPO_ROOT / "e2e" / "crds" / "inferencepools.inference.networking.k8s.io.yaml"
CRD_NAME = "inferencepools.inference.networking.k8s.io"
STAND_IN_LABEL = "inference.tandem.dev/e2e-stand-in"


def installed(cluster: Any) -> dict[str, Any] | None:
    """The InferencePool CRD in the cluster, or None."""
    proc = cluster.kubectl("get", "crd", CRD_NAME, "-o", "json", "--ignore-not-found", check=False)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def is_stand_in(crd: dict[str, Any] | None) -> bool:
    return crd is not None and (crd["metadata"].get("labels") or {}).get(STAND_IN_LABEL) == "true"


def install(cluster: Any) -> bool:
    """Makes the cluster serve InferencePools: the stand-in unless a real CRD is there. True when
    the stand-in is (now) the one installed."""
    crd = installed(cluster)
    if crd is not None and not is_stand_in(crd):
        return False
    if crd is not None and crd["metadata"].get("deletionTimestamp"):
        remove(cluster)  # a removal still finishing would take the re-applied one with it
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    return True


def remove(cluster: Any) -> None:
    """Removes the stand-in (and with it every InferencePool) and waits until it is gone; a real
    CRD is left alone."""
    if not is_stand_in(installed(cluster)):
        return
    cluster.kubectl("delete", "crd", CRD_NAME, "--ignore-not-found", "--wait=false")
    wait_for(lambda: installed(cluster) is None, timeout=90, what=f"CRD {CRD_NAME} removed")


def served(cluster: Any) -> bool:
    """Whether the apiserver's discovery lists inferencepools in inference.networking.k8s.io/v1."""
    proc = cluster.kubectl("get", "--raw", "/apis/inference.networking.k8s.io/v1", check=False)
    if proc.returncode != 0:
        return False
    return any(r.get("name") == "inferencepools" for r in json.loads(proc.stdout).get("resources", []))
