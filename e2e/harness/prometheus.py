"""A real Prometheus server for the e2e tests, on a loopback port, with file-based service discovery.

Tests add scrape targets by writing JSON target groups into ``<workdir>/targets/<name>.json``
(``add_targets``); Prometheus picks them up within about a second. Scrape and evaluation intervals
are 1 s so tests see data quickly.

The binary is ``$TANDEM_PROMETHEUS``, else ``prometheus`` on PATH (Debian: ``apt-get install
--no-install-recommends prometheus``, which installs /usr/bin/prometheus; the service it registers
is never used). The server runs in its own process group and is stopped by signalling that group.

Run as a script (state in ``.tandem/prometheus/``)::

    python -m e2e.harness.prometheus up [--port N]
    python -m e2e.harness.prometheus down
    python -m e2e.harness.prometheus status
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from e2e.harness.common import (
    STATE_ROOT,
    HarnessError,
    free_port,
    group_alive,
    log,
    stop_process_group,
    wait_for,
)

PROMETHEUS_ENV = "TANDEM_PROMETHEUS"
STATE_DIR = STATE_ROOT / "prometheus"
SCRAPE_INTERVAL = "1s"
FILE_SD_JOB = "file-sd"


def prometheus_binary() -> str:
    path = os.environ.get(PROMETHEUS_ENV) or shutil.which("prometheus")
    if not path:
        raise HarnessError(
            "prometheus not found: apt-get install -y --no-install-recommends prometheus, "
            f"or set ${PROMETHEUS_ENV}"
        )
    return path


def render_config(
    targets_dir: Path, extra_scrape_configs: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """Prometheus config: one file_sd job watching ``targets_dir/*.json``, 1 s scrapes, and
    ``extra_scrape_configs`` after it."""
    return {
        "global": {
            "scrape_interval": SCRAPE_INTERVAL,
            "scrape_timeout": SCRAPE_INTERVAL,
            "evaluation_interval": SCRAPE_INTERVAL,
        },
        "scrape_configs": [
            {
                # A target group's own `job` label overrides this default (add_targets sets it).
                "job_name": FILE_SD_JOB,
                "file_sd_configs": [{"files": [str(targets_dir / "*.json")], "refresh_interval": "1s"}],
            },
            *[dict(c) for c in extra_scrape_configs],
        ],
    }


class Prometheus:
    """One Prometheus server rooted at ``workdir`` (config, TSDB, file_sd targets, log, pid)."""

    def __init__(
        self,
        workdir: Path | str,
        port: int | None = None,
        *,
        extra_scrape_configs: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.targets_dir = self.workdir / "targets"
        self.port = port or 0
        self.pid: int | None = None
        self.extra_scrape_configs = list(extra_scrape_configs)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    @property
    def _pid_file(self) -> Path:
        return self.workdir / "prometheus.pid"

    def start(self, *, timeout: float = 60.0) -> None:
        """Starts the server and waits until /-/ready answers."""
        t0 = time.monotonic()
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "prometheus.yml"
        config = render_config(self.targets_dir, self.extra_scrape_configs)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.port = self.port or free_port()
        cmd = [
            prometheus_binary(),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1d",
            "--log.level=warn",
        ]
        with self.log_path.open("ab") as logf:
            proc = subprocess.Popen(
                cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.pid = proc.pid
        self._pid_file.write_text(json.dumps({"pid": proc.pid, "port": self.port}))

        def ready() -> bool:
            if proc.poll() is not None:
                raise HarnessError(f"prometheus exited with {proc.returncode}; see {self.log_path}")
            return self._get("/-/ready") is not None

        try:
            wait_for(ready, timeout=timeout, what=f"prometheus on {self.url}")
        except BaseException:
            self.stop()
            raise
        log(f"Prometheus ready on {self.url} in {time.monotonic() - t0:.1f} s")

    @classmethod
    def attach(cls, workdir: Path | str) -> Prometheus | None:
        """The server recorded in ``workdir`` if it is still running."""
        workdir = Path(workdir)
        try:
            info = json.loads((workdir / "prometheus.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None
        if not group_alive(int(info["pid"])):
            return None
        server = cls(workdir, int(info["port"]))
        server.pid = int(info["pid"])
        return server

    def stop(self) -> None:
        if self.pid is not None:
            stop_process_group(self.pid)
            self.pid = None
        self._pid_file.unlink(missing_ok=True)

    # --- file_sd targets -------------------------------------------------------------------

    def add_targets(self, name: str, targets: Sequence[str], labels: Mapping[str, str] | None = None) -> None:
        """Writes target group ``name`` (``host:port`` strings); ``job`` defaults to ``name``.

        The file is written under a temporary name and renamed, so Prometheus never reads half of it.
        """
        group = {"targets": list(targets), "labels": {"job": name, **(labels or {})}}
        final = self.targets_dir / f"{name}.json"
        tmp = self.targets_dir / f".{name}.json.tmp"
        tmp.write_text(json.dumps([group], indent=2))
        tmp.replace(final)

    def remove_targets(self, name: str) -> None:
        (self.targets_dir / f"{name}.json").unlink(missing_ok=True)

    # --- HTTP API ----------------------------------------------------------------------------

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> bytes | None:
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return bytes(resp.read())
        except (urllib.error.URLError, OSError):
            return None

    def active_targets(self) -> list[dict[str, Any]]:
        """``data.activeTargets`` of /api/v1/targets: each with its ``labels`` after relabelling
        and its ``scrapePool`` (the job name), whether or not its scrapes succeed."""
        raw = self._get("/api/v1/targets", {"state": "active"})
        if raw is None:
            raise HarnessError(f"no answer from {self.url}/api/v1/targets")
        targets: list[dict[str, Any]] = json.loads(raw)["data"]["activeTargets"]
        return targets

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; returns ``data.result`` (a vector: ``[{"metric": {...}, "value": [t, "v"]}]``)."""
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise HarnessError(f"query {promql!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def query_value(self, promql: str) -> float | None:
        """The first sample's value of an instant query, or None when the result is empty."""
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_for_value(self, promql: str, expected: float, *, timeout: float = 30.0) -> None:
        """Polls ``promql`` until its first sample equals ``expected``."""
        wait_for(
            lambda: self.query_value(promql) == expected,
            timeout=timeout,
            interval=0.5,
            what=f"{promql} == {expected}",
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.harness.prometheus", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    args = parser.parse_args(argv)
    running = Prometheus.attach(STATE_DIR)
    try:
        if args.action == "up":
            if running is not None:
                log(f"Reusing the running Prometheus on {running.url}")
            else:
                STATE_DIR.mkdir(parents=True, exist_ok=True)
                Prometheus(STATE_DIR, args.port or None).start()
            server = Prometheus.attach(STATE_DIR)
            assert server is not None
            print(f"export TANDEM_PROMETHEUS_URL={server.url}")
            print(f"# file_sd targets: {server.targets_dir}/<name>.json")
        elif args.action == "down":
            if running is not None:
                running.stop()
                log("Prometheus stopped")
            shutil.rmtree(STATE_DIR, ignore_errors=True)
        else:
            if running is None:
                print("prometheus: not running")
                return 1
            print(
                f"prometheus: running on {running.url} (pid {running.pid}), targets in {running.targets_dir}"
            )
    except (HarnessError, TimeoutError) as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
