"""Replica discovery: a pool's static ``endpoints`` from the config, or its Service's EndpointSlices.

In a cluster the router lists and watches the EndpointSlices labelled
``kubernetes.io/service-name=<pool service>`` in the config's namespace (RBAC: ``get``, ``list``,
``watch`` on ``discovery.k8s.io/endpointslices`` in that namespace). The ``kubernetes`` client is
blocking, so each pool's watch runs in a daemon thread and hands the addresses to the event loop
with ``call_soon_threadsafe``. `addresses_from_slices` (pure) turns slices into ``host:port``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

logger = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PORT_NAME = "http"  # tandem.names.PORT_NAME_HTTP: the pool Services' port name
WATCH_SECONDS = 60  # server-side watch timeout; the thread re-lists after it
RETRY_SECONDS = 5.0

OnChange = Callable[[list[str]], None]


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def addresses_from_slices(slices: Iterable[Mapping[str, Any]], default_port: int) -> list[str]:
    """``host:port`` of every ready endpoint, sorted and de-duplicated.

    The port is the slice's port named ``http``, else its only port, else ``default_port``. An
    endpoint whose ``conditions.ready`` is false is skipped (unset counts as ready, as the API says);
    of its addresses the first is used (the API says they are fungible)."""
    found: set[str] = set()
    for piece in slices:
        ports = piece.get("ports") or []
        port = default_port
        named = [p for p in ports if p.get("name") == PORT_NAME and p.get("port")]
        if named:
            port = int(named[0]["port"])
        elif len(ports) == 1 and ports[0].get("port"):
            port = int(ports[0]["port"])
        for endpoint in piece.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            if conditions.get("ready") is False:
                continue
            addresses = endpoint.get("addresses") or []
            if addresses:
                found.add(format_address(str(addresses[0]), port))
    return sorted(found)


class EndpointSliceWatch:
    """Lists and watches one Service's EndpointSlices in a thread; reports address sets."""

    def __init__(
        self,
        namespace: str,
        service: str,
        port: int,
        on_change: OnChange,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.namespace = namespace
        self.service = service
        self.port = port
        self.on_change = on_change
        self.loop = loop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"endpointslices-{service}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _publish(self, slices: dict[str, dict[str, Any]]) -> None:
        addresses = addresses_from_slices(slices.values(), self.port)
        if not self._stop.is_set():
            self.loop.call_soon_threadsafe(self.on_change, addresses)

    def _run(self) -> None:
        client: Any = importlib.import_module("kubernetes.client")
        watch: Any = importlib.import_module("kubernetes.watch")
        api = client.DiscoveryV1Api()
        serialize = client.ApiClient().sanitize_for_serialization
        selector = f"{SERVICE_NAME_LABEL}={self.service}"
        while not self._stop.is_set():
            try:
                listed = api.list_namespaced_endpoint_slice(
                    self.namespace, label_selector=selector, _request_timeout=30
                )
                slices = {s.metadata.name: serialize(s) for s in listed.items}
                self._publish(slices)
                stream = watch.Watch().stream(
                    api.list_namespaced_endpoint_slice,
                    self.namespace,
                    label_selector=selector,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=WATCH_SECONDS,
                    _request_timeout=WATCH_SECONDS + 30,
                )
                for event in stream:
                    if self._stop.is_set():
                        return
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR":
                        break  # e.g. 410 Gone: list again
                    name = obj.metadata.name
                    if kind == "DELETED":
                        slices.pop(name, None)
                    else:
                        slices[name] = serialize(obj)
                    self._publish(slices)
            except Exception as exc:  # the API server went away, RBAC, ...: retry, keep the last set
                logger.warning(
                    "Failed to watch EndpointSlices of %s/%s: %s", self.namespace, self.service, exc
                )
                self._stop.wait(RETRY_SECONDS)


class KubeDiscovery:
    """One `EndpointSliceWatch` per (pool, namespace, service, port); `sync` starts and stops them."""

    def __init__(self) -> None:
        self.watches: dict[tuple[str, str, str, int], EndpointSliceWatch] = {}
        self._loaded = False

    def _load_kube_config(self) -> bool:
        if self._loaded:
            return True
        config: Any = importlib.import_module("kubernetes.config")
        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config()
            except Exception as exc:
                logger.error("Found no Kubernetes config to discover replicas with: %s", exc)
                return False
        self._loaded = True
        return True

    def sync(
        self,
        wanted: Mapping[tuple[str, str, str, int], OnChange],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Watch exactly the keys of ``wanted`` (blocking on first use: it reads the kube config)."""
        for key in list(self.watches):
            if key not in wanted:
                self.watches.pop(key).stop()
        missing = [k for k in wanted if k not in self.watches]
        if not missing or not self._load_kube_config():
            return
        for key in missing:
            _pool, namespace, service, port = key
            watch = EndpointSliceWatch(namespace, service, port, wanted[key], loop)
            self.watches[key] = watch
            watch.start()
            logger.info("Started watching EndpointSlices of %s/%s", namespace, service)

    def stop(self) -> None:
        for watch in self.watches.values():
            watch.stop()
        self.watches.clear()
