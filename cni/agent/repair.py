"""Pods of this node that should have the capture rules and do not, and what is done about them:
Istio's repair controller (cni/pkg/repair), plus a direct look into running pods.

A pod is a candidate when the plugin would give it rules: it carries the sidecar annotation
(REPAIR_SIDECAR_ANNOTATION, Istio's ``sidecar.istio.io/status``), is on this node and not on the
host's network, and the plugin's own decision (cni/pod.py: excluded namespaces from the entry
install-cni wrote, the inject annotation and label, istio-init, DISABLE_ENVOY, the proxy type)
says capture. A candidate is broken when

- (Istio's test) its init container REPAIR_INIT_CONTAINER_NAME (``istio-validation``) last
  terminated with REPAIR_INIT_CONTAINER_EXIT_CODE (126, istio-iptables' validation failure)
  and, when REPAIR_INIT_CONTAINER_TERMINATION_MESSAGE is set, that message, and is not now
  terminated with success; or
- (ours, REPAIR_CHECK_RUNNING_PODS) it is Running and its network namespace, found by its IP,
  holds none of our rules in either backend (podns.py). This also catches a pod that never
  restarts (a Job's, restartPolicy Never), which Istio's test never sees.

What is done, in Istio's order of precedence: ``repair`` (REPAIR_REPAIR_PODS) installs the rules
in the pod's namespace by the plugin's own ADD (cni.plugin.cmd_add: the Pod read again, the
same decision, Config and applier); ``delete`` (REPAIR_DELETE_PODS) deletes the pod with its uid
and resourceVersion as preconditions; ``label`` (REPAIR_LABEL_PODS) sets
REPAIR_BROKEN_POD_LABEL_KEY=VALUE through ``pods/status``. Each action is logged with the pod
and the reason, counted in istio_cni_repair_pods_repaired_total{type,result} and reported as a
Kubernetes Event (Istio's reasons DeleteBrokenPod and LabelBrokenPod; RepairBrokenPod for a
repair in place, which Istio only logs). A pod is acted on once per uid; a failed action is
tried again on the pod's next change, at most MAX_ATTEMPTS times.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cni.agent import podns
from cni.agent.watch import DELETED, pod_key
from cni.kube import Client, KubeError
from istio_iptables.logsink import shown
from istio_iptables.netns import NetnsError

log = logging.getLogger("install-cni")

MAX_ATTEMPTS = 5
EVENT_COMPONENT = "cni-repair"  # Istio's event recorder's component
REASON_DELETE = "DeleteBrokenPod"
REASON_LABEL = "LabelBrokenPod"
REASON_REPAIR = "RepairBrokenPod"


@dataclass(frozen=True)
class RepairConfig:
    """The repair settings (cni/install/settings.py reads them from Istio's variables)."""

    node: str
    mode: str = "repair"  # "repair", "delete", "label", or "" (detect and log only)
    label_key: str = "cni.istio.io/uninitialized"
    label_value: str = "true"
    sidecar_annotation: str = "sidecar.istio.io/status"
    init_container_name: str = "istio-validation"
    init_termination_msg: str = ""
    init_exit_code: int = 126
    check_running: bool = True
    netns_dirs: tuple[str, ...] = ("/host/var/run/netns",)
    host_proc: str = "/host/proc"


NOT_INSTALLED = "the plugin is not installed yet"


def pod_name(pod: dict[str, Any]) -> str:
    ns, name = pod_key(pod)
    return f"{ns}/{name}"


class Repairer:
    """Decides about each pod the watch hands on and acts, in a worker thread of its own (a look
    into a namespace or an API call must not hold up the watch)."""

    def __init__(
        self,
        cfg: RepairConfig,
        client: Client,
        plugin_conf: Callable[[], Any],
        *,
        metrics: Any = None,
        repair: Callable[[dict[str, Any], podns.Found], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.client = client
        # The plugin's configuration (cni.plugin.PluginConf) from the entry install-cni writes.
        self.plugin_conf = plugin_conf
        self.metrics = metrics
        self._repair_in_place = repair or repair_with_plugin(plugin_conf)
        self.acted: dict[str, str] = {}  # uid -> what was done
        self.verified: set[str] = set()  # uids whose namespace was seen holding our rules
        self.attempts: dict[str, int] = {}
        self._latest: dict[tuple[str, str], dict[str, Any]] = {}
        # Pods seen while the plugin was not installed: looked at again once it is (a pod that
        # runs steadily brings no further event).
        self._waiting: dict[tuple[str, str], dict[str, Any]] = {}
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None

    # --- the queue ---------------------------------------------------------------------------

    def handle(self, kind: str, pod: dict[str, Any]) -> None:
        """The watch's handler: the newest state of each pod, decided about in the worker."""
        key = pod_key(pod)
        with self._lock:
            if kind == DELETED:
                self._latest.pop(key, None)
                self._waiting.pop(key, None)
                uid = str((pod.get("metadata") or {}).get("uid", ""))
                self.acted.pop(uid, None)
                self.verified.discard(uid)
                self.attempts.pop(uid, None)
                return
            queued = key in self._latest
            self._latest[key] = pod
        if not queued:
            self._queue.put(key)

    def plugin_installed(self) -> None:
        """The installer has (again) put the plugin in place: the pods set aside meanwhile are
        queued once more."""
        with self._lock:
            waiting, self._waiting = self._waiting, {}
            fresh = [key for key in waiting if key not in self._latest]
            for key, pod in waiting.items():
                self._latest.setdefault(key, pod)
        for key in fresh:
            self._queue.put(key)

    def start(self, stop: threading.Event) -> threading.Thread:
        def run() -> None:
            while not stop.is_set():
                try:
                    key = self._queue.get(timeout=0.5)
                except queue.Empty:
                    continue
                if key is None:
                    return
                with self._lock:
                    pod = self._latest.pop(key, None)
                if pod is None:
                    continue
                try:
                    self.reconcile(pod)
                except Exception as e:  # noqa: BLE001 - one pod's failure must not end the worker
                    log.exception("repair of pod %s failed", pod_name(pod))
                    uid = str((pod.get("metadata") or {}).get("uid", ""))
                    self._failed(uid, pod_name(pod), f"{type(e).__name__}: {e}")

        self.thread = threading.Thread(target=run, name="repair", daemon=True)
        self.thread.start()
        return self.thread

    def close(self) -> None:
        self._queue.put(None)

    # --- deciding ----------------------------------------------------------------------------

    def candidate(self, pod: dict[str, Any]) -> str | None:
        """Why the pod is not a candidate (None: it is one)."""
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        if spec.get("nodeName") != self.cfg.node:
            return f"not on node {self.cfg.node}"
        if meta.get("deletionTimestamp"):
            return "being deleted"
        if spec.get("hostNetwork"):
            return "on the host's network"
        annotations = meta.get("annotations") or {}
        if self.cfg.sidecar_annotation and self.cfg.sidecar_annotation not in annotations:
            return f"no {self.cfg.sidecar_annotation} annotation"
        conf = self.plugin_conf()
        if conf is None:
            return NOT_INSTALLED
        if meta.get("namespace") in conf.exclude_namespaces:
            return "namespace excluded"
        from cni.pod import PodError, pod_info, skip_reason

        try:
            return skip_reason(pod_info(pod))
        except PodError as e:
            return f"unusable Pod object: {e}"

    def init_failure(self, pod: dict[str, Any]) -> str | None:
        """Istio's test: why the init container says the rules are missing (None: it does not)."""
        cfg = self.cfg
        for status in (pod.get("status") or {}).get("initContainerStatuses") or []:
            if not isinstance(status, dict):
                continue
            if cfg.init_container_name and status.get("name") != cfg.init_container_name:
                continue
            now = (status.get("state") or {}).get("terminated")
            if isinstance(now, dict) and (now.get("reason") == "Completed" or now.get("exitCode") == 0):
                continue
            last = (status.get("lastState") or {}).get("terminated")
            if not isinstance(last, dict):
                continue
            msg = cfg.init_termination_msg.strip()
            if msg and msg != str(last.get("message", "")).strip():
                continue
            code = last.get("exitCode")
            if cfg.init_exit_code and code != cfg.init_exit_code:
                continue
            return f"init container {status.get('name')} last exited with code {code}"
        return None

    def reconcile(self, pod: dict[str, Any]) -> str | None:
        """Decides about one pod and acts; what was done (None: nothing)."""
        meta = pod.get("metadata") or {}
        uid = str(meta.get("uid", ""))
        name = pod_name(pod)
        if uid in self.acted:
            log.debug("pod %s: already %s", name, self.acted[uid])
            return None
        why_not = self.candidate(pod)
        if why_not == NOT_INSTALLED:
            with self._lock:
                self._waiting[pod_key(pod)] = pod
            if self.plugin_conf() is not None:  # installed meanwhile: plugin_installed came first
                self.plugin_installed()
        if why_not is not None:
            log.debug("pod %s: not a candidate for repair (%s)", name, why_not)
            return None
        if self.attempts.get(uid, 0) >= MAX_ATTEMPTS:
            return None
        found: podns.Found | None = None
        reason = self.init_failure(pod)
        try:
            if reason is None:
                if not self.cfg.check_running or uid in self.verified:
                    return None
                status = pod.get("status") or {}
                if status.get("phase") != "Running" or not status.get("podIP"):
                    return None
                found = podns.find_pod_netns(str(status["podIP"]), self.cfg.netns_dirs, self.cfg.host_proc)
                if found is None:
                    self._failed(uid, name, f"no network namespace on this node holds {status['podIP']}")
                    return None
                rules = podns.capture_rules(found.ns)
                if rules:
                    log.debug("pod %s: its namespace holds our rules (%s)", name, ", ".join(rules))
                    self.verified.add(uid)
                    return None
                reason = f"running without the capture rules in its network namespace ({found.path})"
            return self._act(pod, uid, name, reason, found)
        finally:
            if found is not None:
                found.ns.close()

    def _failed(self, uid: str, name: str, why: str) -> None:
        n = self.attempts.get(uid, 0) + 1
        self.attempts[uid] = n
        if n >= MAX_ATTEMPTS:
            log.error("pod %s: giving up after %d attempts: %s", name, n, why)
        else:
            log.warning("pod %s: %s (attempt %d of %d)", name, why, n, MAX_ATTEMPTS)

    def _count(self, kind: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.repaired.labels(type=kind, result=result).inc()

    # --- acting ------------------------------------------------------------------------------

    def _act(
        self, pod: dict[str, Any], uid: str, name: str, reason: str, found: podns.Found | None
    ) -> str | None:
        mode = self.cfg.mode
        if not mode:
            log.warning("pod %s is broken (%s); repair, delete and label are all off", name, reason)
            self.acted[uid] = "reported"
            return None
        log.info("pod %s detected as broken (%s): %s", name, reason, mode)
        try:
            if mode == "repair":
                result = self._repair(pod, found)
            elif mode == "delete":
                result = self._delete(pod)
            else:
                result = self._label(pod)
        except (KubeError, RepairError, NetnsError, OSError) as e:
            self._count(mode, "fail")
            self._failed(uid, name, f"{mode} failed: {e}")
            self._event(pod, _REASONS[mode], f"pod detected as broken, but failed to {_VERBS[mode]}: {e}")
            return None
        self._count(mode, result)
        self.acted[uid] = f"{_PAST[mode]} ({reason})"
        if result == "skip":
            return "skip"
        log.info("pod %s %s", name, _PAST[mode])
        self._event(pod, _REASONS[mode], f"pod detected as broken ({reason}), {_PAST[mode]}")
        return mode

    def _repair(self, pod: dict[str, Any], found: podns.Found | None) -> str:
        status = pod.get("status") or {}
        if found is None:
            ip = status.get("podIP")
            if not ip:
                raise RepairError("the pod has no IP yet, so its network namespace cannot be found")
            found = podns.find_pod_netns(str(ip), self.cfg.netns_dirs, self.cfg.host_proc)
            if found is None:
                raise RepairError(f"no network namespace on this node holds {ip}")
            try:
                self._repair_in_place(pod, found)
            finally:
                found.ns.close()
        else:
            self._repair_in_place(pod, found)
        return "success"

    def _delete(self, pod: dict[str, Any]) -> str:
        ns, name = pod_key(pod)
        meta = pod.get("metadata") or {}
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            # Make sure we are deleting what we think we are (Istio's words).
            "preconditions": {"uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")},
        }
        self.client.request("DELETE", f"/api/v1/namespaces/{_seg(ns)}/pods/{_seg(name)}", body=body)
        return "success"

    def _label(self, pod: dict[str, Any]) -> str:
        ns, name = pod_key(pod)
        labels = (pod.get("metadata") or {}).get("labels") or {}
        key, value = self.cfg.label_key, self.cfg.label_value
        if key in labels:
            log.info("pod %s/%s already has a label %s, skipping", ns, name, key)
            return "skip"
        # pods/status can change the metadata too, and needs less privilege (as Istio).
        self.client.request(
            "PATCH",
            f"/api/v1/namespaces/{_seg(ns)}/pods/{_seg(name)}/status",
            body={"metadata": {"labels": {key: value}}},
            content_type="application/merge-patch+json",
        )
        log.info("labelled pod %s/%s with %s=%s", ns, name, key, shown(value))
        return "success"

    def _event(self, pod: dict[str, Any], reason: str, message: str) -> None:
        ns, name = pod_key(pod)
        meta = pod.get("metadata") or {}
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{name}.{int(now * 1e9):x}", "namespace": ns},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "namespace": ns,
                "name": name,
                "uid": meta.get("uid", ""),
                "resourceVersion": meta.get("resourceVersion", ""),
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning",
            "source": {"component": EVENT_COMPONENT, "host": self.cfg.node},
            "reportingComponent": EVENT_COMPONENT,
            "reportingInstance": self.cfg.node,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.client.request("POST", f"/api/v1/namespaces/{_seg(ns)}/events", body=event)
        except KubeError as e:
            log.warning("could not record the event %s for pod %s/%s: %s", reason, ns, name, e)


_REASONS = {"repair": REASON_REPAIR, "delete": REASON_DELETE, "label": REASON_LABEL}
_VERBS = {"repair": "repair", "delete": "delete", "label": "label"}
_PAST = {"repair": "repaired", "delete": "deleted", "label": "labeled"}


class RepairError(Exception):
    """Repairing in place failed; the message says why."""


def _seg(text: str) -> str:
    from cni.kube import quote_segment

    return quote_segment(text)


def repair_with_plugin(plugin_conf: Callable[[], Any]) -> Callable[[dict[str, Any], podns.Found], None]:
    """Repair in place by the plugin's own ADD (cni.plugin.cmd_add) into the namespace found: the
    Pod read again from the API, the same decision, Config and applier, reconciling."""

    def repair(pod: dict[str, Any], found: podns.Found) -> None:
        from cni import plugin
        from cni.protocol import CniError, Invocation
        from istio_iptables import logsink

        conf = plugin_conf()
        if conf is None:
            raise RepairError("the plugin is not installed yet")
        ns, name = pod_key(pod)
        uid = str((pod.get("metadata") or {}).get("uid", ""))
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID={uid}"
        # The namespace by this process's descriptor: a /proc path whose process exits meanwhile,
        # or a pinned file replaced, cannot send the rules elsewhere.
        path = f"/proc/self/fd/{found.ns.fd}"
        inv = Invocation(command="ADD", container_id=f"repair-{uid}", netns=path, ifname="eth0", args=args)
        sink = logsink.Sink(logsink.level_number(conf.log_level), program="install-cni", stream=sys.stderr)
        call = plugin.Call(inv=inv, raw={}, conf=conf, log=sink.scoped("repair"))
        previous = logsink.set_sink(sink)
        try:
            plugin.cmd_add(call)
        except CniError as e:
            raise RepairError(f"{e.msg}{': ' + e.details if e.details else ''}") from None
        finally:
            logsink.set_sink(previous)

    return repair
