"""Helpers for testing the Helm chart (charts/tandem): running helm, rendering, and building a
kubeconfig that authenticates as a ServiceAccount (to prove the chart's RBAC by running the
operator with exactly those permissions).

helm is the v3 binary tools/build.sh builds (``$TANDEM_BIN_DIR`` wins, as for kubectl).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from e2e.harness.common import REPO_ROOT, bin_dir

CHART_DIR = REPO_ROOT / "charts" / "tandem"
CI_VALUES_DIR = CHART_DIR / "ci"


def in_ci() -> bool:
    """CI sets CI=true: there a missing tool is a failure, not a reason to skip."""
    return os.environ.get("CI", "").lower() == "true"


def helm_binary() -> Path:
    return bin_dir() / "helm"


def kubectl_binary() -> Path:
    return bin_dir() / "kubectl"


def helm(
    *args: str,
    kubeconfig: Path | str | None = None,
    check: bool = True,
    input: str | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Runs helm with its own config/cache dirs under .tandem (never the user's repositories)."""
    state = REPO_ROOT / ".tandem" / "helm"
    env = dict(
        os.environ,
        HELM_CONFIG_HOME=str(state / "config"),
        HELM_CACHE_HOME=str(state / "cache"),
        HELM_DATA_HOME=str(state / "data"),
    )
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    proc = subprocess.run(
        [str(helm_binary()), *args],
        capture_output=True,
        text=True,
        env=env,
        input=input,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc


def template(
    release: str = "tandem",
    namespace: str = "tandem-system",
    *,
    values_files: Sequence[Path] = (),
    set_values: Sequence[str] = (),
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    args = ["template", release, str(CHART_DIR), "--namespace", namespace]
    for f in values_files:
        args += ["-f", str(f)]
    for s in set_values:
        args += ["--set", s]
    return helm(*args, check=check)


def render(
    release: str = "tandem",
    namespace: str = "tandem-system",
    *,
    values_files: Sequence[Path] = (),
    set_values: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """The chart's templates (not its CRDs) rendered as a list of objects."""
    text = template(release, namespace, values_files=values_files, set_values=set_values).stdout
    return [d for d in yaml.safe_load_all(text) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def service_account_kubeconfig(admin_kubeconfig: Path | str, token: str, namespace: str, out: Path) -> Path:
    """A kubeconfig with the admin kubeconfig's server and CA but only ``token`` as credentials."""
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())
    context_name = admin.get("current-context") or admin["contexts"][0]["name"]
    context = next(c["context"] for c in admin["contexts"] if c["name"] == context_name)
    cluster = next(c["cluster"] for c in admin["clusters"] if c["name"] == context["cluster"])
    cluster = {
        k: v
        for k, v in cluster.items()
        if k in ("server", "certificate-authority", "certificate-authority-data", "tls-server-name")
    }
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": cluster}],
        "users": [{"name": "service-account", "user": {"token": token}}],
        "contexts": [
            {
                "name": "sa",
                "context": {"cluster": "cluster", "user": "service-account", "namespace": namespace},
            }
        ],
        "current-context": "sa",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config))
    out.chmod(0o600)
    return out


def tool_or_skip(name: str, *candidates: str) -> str:
    """Path of a command-line tool; when it is missing, skip outside CI and fail in CI."""
    import pytest

    for candidate in (*candidates, name):
        found = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
        if found:
            return found
    message = f"{name} is not installed"
    if in_ci():
        pytest.fail(f"{message} (CI=true: required)")
    pytest.skip(message)


ARGOCD_DIR = CHART_DIR / "argocd"
ARGOCD_HEALTH = {
    "InferenceService": ARGOCD_DIR / "inferenceservice-health.lua",
    "AcceleratorPool": ARGOCD_DIR / "acceleratorpool-health.lua",
}


def lua_literal(value: Any) -> str:
    """A JSON-like value as a Lua table constructor, as Argo CD hands objects to health scripts
    (JSON null becomes nil, i.e. the key is absent)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        items = [f"[{lua_literal(str(k))}] = {lua_literal(v)}" for k, v in value.items() if v is not None]
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"not JSON: {value!r}")


def argocd_health(lua: str, script: Path, obj: dict[str, Any]) -> tuple[str, str]:
    """Runs an Argo CD health script on ``obj`` with the ``lua`` interpreter (5.1); returns
    (status, message). Like Argo CD, the object is the global ``obj`` and the chunk returns ``hs``;
    ``os`` and ``io`` are removed first, as Argo CD's sandbox has no such libraries."""
    program = (
        f"obj = {lua_literal(obj)}\n"
        "local chunk = assert(loadfile(arg[1]))\n"
        "os, io = nil, nil\n"
        "local hs = chunk()\n"
        "assert(type(hs) == 'table', 'the script returned no table')\n"
        "print(tostring(hs.status) .. '\\t' .. tostring(hs.message or ''))\n"
    )
    proc = subprocess.run(
        [lua, "-", str(script)], input=program, capture_output=True, text=True, check=False, timeout=30
    )
    if proc.returncode != 0:
        raise AssertionError(f"{script.name} failed: {proc.stderr}")
    status, _, message = proc.stdout.rstrip("\n").partition("\t")
    return status, message
