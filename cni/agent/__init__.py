"""install-cni's node agent, run in the installer's process (docs/node-agent.md): the metrics
server, the plugin's statistics socket, the watch of this node's pods with the repair of broken
ones, and the removal of the startup taint once the plugin is installed.

``Agent(settings, ready, entry).start(stop)`` starts its threads; ``close()`` ends them. The
installer's loop tells it the outcome of every pass (``install_result``) and ``ready()`` says
whether the plugin is in place right now.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any

from cni.install.settings import STATS_SOCKET_NAME, Settings

log = logging.getLogger("install-cni")

CNI_VERSION = "1.0.0"


class Agent:
    def __init__(self, settings: Settings, ready: Callable[[], bool], entry: dict[str, Any]) -> None:
        from cni.agent.metrics import Metrics

        self.settings = settings
        self.ready = ready
        self.entry = entry
        self.metrics = Metrics()
        self.metrics.ready_from(ready)
        self.server: ThreadingHTTPServer | None = None
        self.receiver: Any = None
        self.watcher: Any = None
        self.repairer: Any = None
        self.threads: list[threading.Thread] = []
        self._last_result = ""

    def plugin_conf(self) -> Any:
        """The plugin's configuration from the entry install-cni writes (None until the plugin is
        installed), with the kubeconfig where this process sees it."""
        if not self.ready():
            return None
        from cni.plugin import PluginConf

        conf = PluginConf.parse(self.entry, CNI_VERSION)
        return conf._replace(kubeconfig=str(self.settings.kubeconfig_path))

    def install_result(self, result: str) -> None:
        """One pass of the installer: SUCCESS or the stage that failed (Istio's results), counted
        when it changes (a pass runs every POLL_INTERVAL)."""
        if result != self._last_result:
            self.metrics.installs.labels(result=result).inc()
            self._last_result = result
            if result == "SUCCESS" and self.repairer is not None:
                self.repairer.plugin_installed()

    def start(self, stop: threading.Event) -> Agent:
        s = self.settings
        if s.monitoring_port:
            from cni.agent.metrics import serve_metrics

            try:
                self.server = serve_metrics(self.metrics, s.health_address, s.monitoring_port)
            except OSError as e:
                # The installer and repair still run: a metrics port must not stop the node.
                log.error("cannot serve /metrics on port %d: %s (no metrics)", s.monitoring_port, e)
            else:
                log.info("serving /metrics on %s:%d", s.health_address or "*", self.server.server_port)
        if s.agent_run_dir:
            from cni.agent.metrics import StatsReceiver

            path = s.mounted_agent_run_dir / STATS_SOCKET_NAME
            try:
                self.receiver = StatsReceiver(self.metrics, path)
            except OSError as e:
                log.error("cannot bind the plugin's statistics socket %s: %s (no plugin metrics)", path, e)
        if not (s.repair_enabled or s.startup_taint):
            return self
        if not s.node_name:
            log.error(
                "no node name (KUBERNETES_NODE_NAME, NODE_NAME or REPAIR_NODE_NAME): "
                "pod repair and the startup taint are off"
            )
            return self
        from cni.agent.watch import PodWatcher
        from cni.kube import Client, in_cluster

        client = Client(lambda: in_cluster(s.server, str(s.ca_file), str(s.token_file)))
        handler: Callable[[str, dict[str, Any]], None] = lambda kind, pod: None  # noqa: E731
        if s.repair_enabled:
            from cni.agent.repair import RepairConfig, Repairer

            cfg = RepairConfig(
                node=s.node_name,
                mode=s.repair_mode,
                label_key=s.repair_label_key,
                label_value=s.repair_label_value,
                sidecar_annotation=s.repair_sidecar_annotation,
                init_container_name=s.repair_init_container_name,
                init_termination_msg=s.repair_init_termination_msg,
                init_exit_code=s.repair_init_exit_code,
                check_running=s.repair_check_running,
                netns_dirs=s.netns_dirs,
                host_proc=s.host_proc,
            )
            self.repairer = Repairer(cfg, client, self.plugin_conf, metrics=self.metrics)
            self.threads.append(self.repairer.start(stop))
            handler = self.repairer.handle
            log.info(
                "repairing broken pods on node %s: %s", s.node_name, s.repair_mode or "detect and log only"
            )
        self.watcher = PodWatcher(
            client,
            s.node_name,
            handler,
            stop,
            field_selector=s.repair_field_selectors,
            label_selector=s.repair_label_selectors,
        )
        t = threading.Thread(target=self.watcher.run, name="pod-watch", daemon=True)
        t.start()
        self.threads.append(t)
        if s.startup_taint:
            from cni.agent.taint import untaint_when_ready

            watcher = self.watcher

            def installed_and_listed() -> bool:
                return self.ready() and watcher.synced.is_set()

            self.threads.append(
                untaint_when_ready(client, s.node_name, s.startup_taint, installed_and_listed, stop)
            )
        return self

    def close(self) -> None:
        """Ends what start() started (``stop`` must be set already for the threads)."""
        if self.repairer is not None:
            self.repairer.close()
        if self.watcher is not None:
            self.watcher.close()
        for t in self.threads:
            t.join(timeout=2)
        if self.receiver is not None:
            self.receiver.close()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
