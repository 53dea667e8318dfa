"""The node's Prometheus metrics, served on ``:15014/metrics`` (Istio's monitoring port).

Istio's names: ``istio_cni_installs_total{result}`` (SUCCESS, COPY_BINARIES_FAILURE,
CREATE_KUBECONFIG_FAILURE, CREATE_CNI_CONFIG_FAILURE), ``istio_cni_install_ready`` and
``istio_cni_repair_pods_repaired_total{type,result}`` (type repair, delete or label; result
success, skip or fail). Ours: the plugin's ADDs and DELs on this node by result (success, fail)
and the ADDs' latency, from the records the plugin sends (cni/addstats.py) to a datagram socket
this module binds in the agent's run directory.

prometheus_client is imported here only: the plugin and istio-iptables never load it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cni.addstats import COMMANDS, RECORD_PREFIX

log = logging.getLogger("install-cni")

# Istio's result values of istio_cni_installs_total.
INSTALL_SUCCESS = "SUCCESS"
COPY_BINARIES_FAILURE = "COPY_BINARIES_FAILURE"
CREATE_KUBECONFIG_FAILURE = "CREATE_KUBECONFIG_FAILURE"
CREATE_CNI_CONFIG_FAILURE = "CREATE_CNI_CONFIG_FAILURE"
# Istio's label values of istio_cni_repair_pods_repaired_total.
REPAIR_TYPES = ("repair", "delete", "label")
RESULTS = ("success", "skip", "fail")
PLUGIN_RESULTS = ("success", "fail")
# Seconds; a pod start's plugin call takes tens of milliseconds, the API deadline is 30 s.
ADD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every metric of this process, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.installs = Counter(
            "istio_cni_installs_total",
            "Total number of CNI plugins installed by the Istio CNI installer",
            ["result"],
            registry=r,
        )
        self.install_ready = Gauge(
            "istio_cni_install_ready", "Whether the CNI plugin installation is ready or not", registry=r
        )
        self.repaired = Counter(
            "istio_cni_repair_pods_repaired_total",
            "Total number of pods repaired by repair controller",
            ["type", "result"],
            registry=r,
        )
        self.plugin_adds = Counter(
            "istio_cni_plugin_adds_total",
            "CNI ADDs the istio-cni plugin answered on this node",
            ["result"],
            registry=r,
        )
        self.plugin_dels = Counter(
            "istio_cni_plugin_dels_total",
            "CNI DELs the istio-cni plugin answered on this node",
            ["result"],
            registry=r,
        )
        self.add_seconds = Histogram(
            "istio_cni_plugin_add_duration_seconds",
            "Time the istio-cni plugin spent on a CNI ADD on this node",
            buckets=ADD_BUCKETS,
            registry=r,
        )
        self.plugin_records_dropped = Counter(
            "istio_cni_plugin_records_invalid_total",
            "Datagrams on the plugin's statistics socket that were not a plugin record",
            registry=r,
        )
        # Every label value exists from the start (a rate() over a counter that appears later
        # misses its first increment).
        for result in (
            INSTALL_SUCCESS,
            COPY_BINARIES_FAILURE,
            CREATE_KUBECONFIG_FAILURE,
            CREATE_CNI_CONFIG_FAILURE,
        ):
            self.installs.labels(result=result)
        for kind in REPAIR_TYPES:
            for result in RESULTS:
                self.repaired.labels(type=kind, result=result)
        for result in PLUGIN_RESULTS:
            self.plugin_adds.labels(result=result)
            self.plugin_dels.labels(result=result)

    def ready_from(self, ready: Callable[[], bool]) -> None:
        """istio_cni_install_ready follows ``ready()`` at every scrape."""
        self.install_ready.set_function(lambda: 1.0 if ready() else 0.0)

    def plugin_record(self, data: bytes) -> bool:
        """Counts one datagram from the plugin; False when it is not a record (counted apart)."""
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        fields = text.removeprefix(RECORD_PREFIX).split(" ") if text.startswith(RECORD_PREFIX) else []
        if len(fields) != 3 or fields[0] not in COMMANDS or fields[1] not in PLUGIN_RESULTS:
            self.plugin_records_dropped.inc()
            return False
        try:
            seconds = float(fields[2])
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds < 86400:
            self.plugin_records_dropped.inc()
            return False
        if fields[0] == "ADD":
            self.plugin_adds.labels(result=fields[1]).inc()
            self.add_seconds.observe(seconds)
        else:
            self.plugin_dels.labels(result=fields[1]).inc()
        return True

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))


def serve_metrics(metrics: Metrics, address: str, port: int) -> ThreadingHTTPServer:
    """``/metrics`` in Prometheus' text format on ``address:port`` (all addresses for "")."""
    from cni.install.health import _bind

    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # seconds a connection may sit idle: pods can reach this port

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404)
                return
            data = metrics.exposition()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server API
            log.debug("metrics: " + format, *args)

    server = _bind(address, port, Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


class StatsReceiver:
    """The datagram socket the plugin sends its records to, and the thread counting them."""

    def __init__(self, metrics: Metrics, path: Path) -> None:
        self.metrics = metrics
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if path.is_socket():
                    path.unlink()
            self.sock.bind(str(path))
            os.chmod(path, 0o660)
            # A burst of pod starts while this thread is busy: keep their records queued.
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self.sock.settimeout(0.5)
        except BaseException:
            self.sock.close()
            raise
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="plugin-stats", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(512)
            except TimeoutError:
                continue
            except OSError as e:
                if not self._stop.is_set():
                    log.error("the plugin's statistics socket %s failed: %s", self.path, e)
                return
            self.metrics.plugin_record(data)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
