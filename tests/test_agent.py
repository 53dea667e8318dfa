"""install-cni's node agent against the tests' HTTPS API server (tests/support/apiserver.py): the
pod watch (list, watch from the resourceVersion, bookmarks, a stream broken mid-way, 410 Gone in
both forms), the repair decision and the delete and label modes with their Events, the startup
taint, authorisation per verb, the metrics over HTTP with the plugin's records, and the
settings' validation. Every client is the real one (cni/kube.py); nothing is mocked."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cni import addstats
from cni.agent.metrics import Metrics, StatsReceiver, serve_metrics
from cni.agent.repair import RepairConfig, Repairer
from cni.agent.taint import remove_taint, untaint_when_ready
from cni.agent.watch import PodWatcher
from cni.install.settings import SettingsError, build_parser, parse_settings
from cni.kube import ApiError, Client, in_cluster
from cni.plugin import PluginConf
from tests.support.apiserver import KubeAPIServer
from tests.support.metrics import scrape as scrape_metrics
from tests.support.pki import Pki, make_pki
from tests.support.pods import meshed_pod, pod_object

TOKEN = "agent-token"
NODE = "node-1"
TAINT = "cni.istio.io/not-ready"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def api(pki: Pki) -> Iterator[KubeAPIServer]:
    server = KubeAPIServer(pki, TOKEN)
    server.state.bookmark_interval = 0.2
    with server:
        yield server


def client_for(api: KubeAPIServer, tmp_path: Path, token: str = TOKEN) -> Client:
    token_file = tmp_path / f"token-{token}"
    token_file.write_text(token)
    return Client(lambda: in_cluster(api.url, str(api.pki.ca_cert), str(token_file)), timeout=5)


def wait_for(cond: Callable[[], Any], timeout: float = 10, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what or cond}"
        time.sleep(0.02)
    return value


def on_node(pod: dict[str, Any], node: str = NODE) -> dict[str, Any]:
    pod["spec"]["nodeName"] = node
    return pod


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, kind: str, pod: dict[str, Any]) -> None:
        with self.lock:
            self.events.append((kind, pod["metadata"]["name"]))

    def names(self, kind: str | None = None) -> list[str]:
        with self.lock:
            return [n for k, n in self.events if kind is None or k == kind]


@pytest.fixture
def watching(api: KubeAPIServer, tmp_path: Path) -> Iterator[tuple[PodWatcher, Recorder]]:
    stop = threading.Event()
    rec = Recorder()
    w = PodWatcher(client_for(api, tmp_path), NODE, rec, stop, watch_seconds=30, initial_backoff=0.05)
    threads.clear()
    yield w, rec
    stop.set()
    api.break_watches()
    for t in threads:
        t.join(timeout=10)
        assert not t.is_alive()


threads: list[threading.Thread] = []


def start(w: PodWatcher) -> None:
    t = threading.Thread(target=w.run, daemon=True)
    threads.append(t)
    t.start()


# --- the watch ---------------------------------------------------------------------------------


def test_list_then_watch_hands_on_this_nodes_pods_only(
    api: KubeAPIServer, watching: tuple[PodWatcher, Recorder]
) -> None:
    w, rec = watching
    api.add_pod(on_node(pod_object("before", "default")))
    api.add_pod(on_node(pod_object("elsewhere", "default"), "node-2"))
    start(w)
    wait_for(w.synced.is_set, what="the first list")
    assert rec.names() == ["before"]
    list_call = next(c for c in api.calls if c.verb == "list")
    assert "fieldSelector=spec.nodeName%3Dnode-1" in list_call.path
    api.add_pod(on_node(pod_object("after", "default")))
    api.add_pod(on_node(pod_object("other-after", "default"), "node-2"))
    wait_for(lambda: "after" in rec.names("ADDED"), what="the ADDED event")
    api.update_pod("default", "after", {"status": {"phase": "Running"}})
    wait_for(lambda: "after" in rec.names("MODIFIED"))
    api.delete_pod("default", "after")
    wait_for(lambda: "after" in rec.names("DELETED"))
    assert "other-after" not in rec.names() and "elsewhere" not in rec.names()
    watch_call = next(c for c in api.calls if c.verb == "watch")
    assert "allowWatchBookmarks=true" in watch_call.path and "resourceVersion=" in watch_call.path


def test_bookmarks_move_the_resource_version_on(
    api: KubeAPIServer, watching: tuple[PodWatcher, Recorder]
) -> None:
    w, _ = watching
    start(w)
    wait_for(w.synced.is_set)
    listed = int(w.resource_version)
    # Pods of another node change the resourceVersion; only bookmarks tell this watch about it.
    for i in range(3):
        api.add_pod(on_node(pod_object(f"far-{i}", "default"), "node-2"))
    wait_for(lambda: int(w.resource_version) >= listed + 3, what="a bookmark")


def test_a_watch_broken_mid_stream_resumes_without_missing_a_pod(
    api: KubeAPIServer, watching: tuple[PodWatcher, Recorder]
) -> None:
    w, rec = watching
    start(w)
    wait_for(w.synced.is_set)
    wait_for(lambda: api.watches >= 1)
    with api.state.lock:  # the pod is added and the stream cut before the watch can send it
        api.break_watches()
        api.add_pod(on_node(pod_object("during-the-break", "default")))
    wait_for(lambda: "during-the-break" in rec.names("ADDED"), what="the pod added during the break")
    assert w.lists == 1, "resumed from the resourceVersion, not listed again"
    assert api.watches >= 2


@pytest.mark.parametrize("gone_as", ["event", "status"])
def test_410_gone_lists_again_and_reports_what_changed(
    api: KubeAPIServer, watching: tuple[PodWatcher, Recorder], gone_as: str
) -> None:
    w, rec = watching
    api.add_pod(on_node(pod_object("stays", "default")))
    api.add_pod(on_node(pod_object("goes", "default")))
    start(w)
    wait_for(w.synced.is_set)
    with api.state.lock:
        api.state.gone_as = gone_as
        api.break_watches()
        api.delete_pod("default", "goes")
        api.add_pod(on_node(pod_object("new", "default")))
        api.compact(gone_as=gone_as)
    wait_for(lambda: w.lists == 2, what="the second list")
    wait_for(lambda: "goes" in rec.names("DELETED") and "new" in rec.names("SYNCED"))
    assert sorted(w.pods) == [("default", "new"), ("default", "stays")]
    if gone_as == "status":
        assert any(c.verb == "watch" and c.status == 410 for c in api.calls)


def test_a_token_may_do_only_what_it_was_granted(api: KubeAPIServer, tmp_path: Path) -> None:
    api.grant("reader", "list pods", "watch pods")
    api.add_node(NODE)
    c = client_for(api, tmp_path, "reader")
    assert c.request("GET", "/api/v1/pods")["kind"] == "PodList"
    with pytest.raises(ApiError) as e:
        c.request("GET", f"/api/v1/nodes/{NODE}")
    assert e.value.status == 403 and "cannot get resource" in str(e.value)
    with pytest.raises(ApiError) as e:
        c.request("POST", "/api/v1/namespaces/default/events", body={"involvedObject": {}})
    assert e.value.status == 403


# --- the taint ----------------------------------------------------------------------------------


def test_only_the_startup_taint_goes_and_only_once_ready(api: KubeAPIServer, tmp_path: Path) -> None:
    others = [{"key": "dedicated", "value": "mesh", "effect": "NoSchedule"}]
    api.add_node(NODE, taints=[*others, {"key": TAINT, "effect": "NoSchedule"}])
    ready = threading.Event()
    stop = threading.Event()
    t = untaint_when_ready(client_for(api, tmp_path), NODE, TAINT, ready.is_set, stop, interval=0.02)
    time.sleep(0.3)
    assert not any(c.method == "PATCH" for c in api.calls), "patched before ready"
    ready.set()
    t.join(timeout=10)
    assert api.node(NODE)["spec"]["taints"] == others
    patch = next(c for c in api.calls if c.method == "PATCH")
    assert patch.body[0]["op"] == "test" and patch.body[1]["op"] == "replace"


def test_a_concurrent_change_of_the_taints_is_kept(api: KubeAPIServer, tmp_path: Path) -> None:
    api.add_node(NODE, taints=[{"key": TAINT, "effect": "NoSchedule"}])
    c = client_for(api, tmp_path)
    real = c.request
    changed = []

    def request(method: str, path: str, **kw: Any) -> dict[str, Any]:
        if method == "PATCH" and not changed:  # another writer adds a taint between GET and PATCH
            api.set_node_taints(
                NODE, [{"key": TAINT, "effect": "NoSchedule"}, {"key": "x", "effect": "NoExecute"}]
            )
            changed.append(1)
        return real(method, path, **kw)

    c.request = request  # type: ignore[method-assign]
    assert remove_taint(c, NODE, TAINT)
    assert api.node(NODE)["spec"]["taints"] == [{"key": "x", "effect": "NoExecute"}]
    assert [x.status for x in api.calls if x.method == "PATCH"] == [422, 200]


# --- repair decision and the API modes ----------------------------------------------------------


def validation_failed(pod: dict[str, Any], code: int = 126, now_ok: bool = False) -> dict[str, Any]:
    state = (
        {"terminated": {"exitCode": 0, "reason": "Completed"}}
        if now_ok
        else {"waiting": {"reason": "CrashLoopBackOff"}}
    )
    pod["status"] = {
        "phase": "Pending",
        "podIP": "10.1.2.3",
        "initContainerStatuses": [
            {
                "name": "istio-validation",
                "state": state,
                "lastState": {
                    "terminated": {
                        "exitCode": code,
                        "reason": "Error",
                        "message": "iptables validation failed",
                    }
                },
                "restartCount": 1,
            }
        ],
    }
    return on_node(pod)


def plugin_conf() -> PluginConf:
    return PluginConf.parse(
        {"type": "istio-cni", "kubernetes": {"exclude_namespaces": ["kube-system"]}}, "1.0.0"
    )


def repairer(
    api: KubeAPIServer, tmp_path: Path, mode: str, repaired: list[str] | None = None, **kw: Any
) -> Repairer:
    metrics = Metrics()

    def fake_repair(pod: dict[str, Any], found: Any) -> None:
        raise AssertionError("no namespace in these tests")

    r = Repairer(RepairConfig(node=NODE, mode=mode, check_running=False, **kw), client_for(api, tmp_path),
                 plugin_conf, metrics=metrics, repair=fake_repair)  # fmt: skip
    return r


def counter(r: Repairer, kind: str, result: str) -> float:
    return float(r.metrics.repaired.labels(type=kind, result=result)._value.get())


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: validation_failed(meshed_pod("other-code", "default"), code=1), "another exit code"),
        (lambda: validation_failed(meshed_pod("passed-now", "default"), now_ok=True), "passes now"),
        (
            lambda: validation_failed(
                pod_object("no-sidecar", "default", init_containers=("istio-validation",))
            ),
            "no sidecar annotation",
        ),
        (lambda: validation_failed(meshed_pod("kube", "kube-system")), "excluded namespace"),
        (
            lambda: validation_failed(
                meshed_pod("optout", "default", labels={"sidecar.istio.io/inject": "false"})
            ),
            "opted out",
        ),
        (lambda: on_node(validation_failed(meshed_pod("far", "default")), "node-2"), "another node"),
    ],
)
def test_pods_the_plugin_would_not_capture_are_left_alone(
    api: KubeAPIServer, tmp_path: Path, make: Callable[[], dict[str, Any]], why: str
) -> None:
    pod = make()
    api.add_pod(pod)
    r = repairer(api, tmp_path, "delete")
    assert (
        r.reconcile(
            api.get_pod("default" if "kube" not in why else "kube-system", pod["metadata"]["name"]) or pod
        )
        is None
    ), why
    assert not [c for c in api.calls if c.method in ("DELETE", "POST")]


def test_delete_mode_deletes_with_preconditions_once_and_records_an_event(
    api: KubeAPIServer, tmp_path: Path
) -> None:
    api.add_pod(validation_failed(meshed_pod("broken", "default")))
    pod = api.get_pod("default", "broken")
    assert pod is not None
    r = repairer(api, tmp_path, "delete")
    assert r.reconcile(pod) == "delete"
    assert api.get_pod("default", "broken") is None
    (delete,) = [c for c in api.calls if c.method == "DELETE"]
    assert delete.body["preconditions"] == {
        "uid": pod["metadata"]["uid"],
        "resourceVersion": pod["metadata"]["resourceVersion"],
    }
    (event,) = api.events
    assert event["reason"] == "DeleteBrokenPod" and event["type"] == "Warning"
    assert (
        event["involvedObject"]["uid"] == pod["metadata"]["uid"]
        and event["source"]["component"] == "cni-repair"
    )
    assert r.reconcile(pod) is None, "never the same pod twice"
    assert counter(r, "delete", "success") == 1


def test_a_pod_seen_before_the_plugin_was_installed_is_looked_at_once_it_is(
    api: KubeAPIServer, tmp_path: Path
) -> None:
    # A broken pod that runs steadily brings no further event: when the agent's first list comes
    # before the installer's first pass, the pod must be looked at again once the plugin is there.
    api.add_pod(validation_failed(meshed_pod("early", "default")))
    pod = api.get_pod("default", "early")
    assert pod is not None
    installed: list[PluginConf] = []
    r = Repairer(
        RepairConfig(node=NODE, mode="delete", check_running=False),
        client_for(api, tmp_path),
        lambda: installed[0] if installed else None,
        metrics=Metrics(),
    )
    stop = threading.Event()
    r.start(stop)
    try:
        r.handle("ADDED", pod)
        time.sleep(1)
        assert api.get_pod("default", "early") is not None, "nothing is done before the plugin is in place"
        installed.append(plugin_conf())
        r.plugin_installed()
        wait_for(lambda: api.get_pod("default", "early") is None, what="the early pod deleted")
    finally:
        stop.set()
        r.close()


def test_a_watch_the_server_ends_at_once_is_not_repeated_in_a_tight_loop(
    api: KubeAPIServer, tmp_path: Path
) -> None:
    stop = threading.Event()
    w = PodWatcher(client_for(api, tmp_path), NODE, Recorder(), stop, watch_seconds=30, initial_backoff=0.2)
    tries: list[float] = []

    def ends_at_once() -> int:  # every watch ends at once, with no event
        tries.append(time.monotonic())
        return 0

    w.watch_once = ends_at_once  # type: ignore[method-assign]
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    time.sleep(2)
    stop.set()
    t.join(timeout=15)
    lists = [c for c in api.calls if c.method == "GET" and "watch" not in c.path]
    assert len(lists) == 1, "one list, then watches"
    assert not t.is_alive()
    # Backoff 0.2, 0.4, 0.8, ... s (jitter down to half): a handful of tries in 2 s, not thousands.
    assert 2 <= len(tries) <= 8, len(tries)


def test_delete_of_a_changed_pod_fails_on_its_precondition(api: KubeAPIServer, tmp_path: Path) -> None:
    api.add_pod(validation_failed(meshed_pod("moving", "default")))
    stale = api.get_pod("default", "moving")
    assert stale is not None
    api.update_pod("default", "moving", {"metadata": {"labels": {"x": "y"}}})
    r = repairer(api, tmp_path, "delete")
    assert r.reconcile(stale) is None
    assert api.get_pod("default", "moving") is not None
    assert [c.status for c in api.calls if c.method == "DELETE"] == [409]
    assert api.events[0]["message"].startswith("pod detected as broken, but failed to delete")
    assert counter(r, "delete", "fail") == 1


def test_label_mode_patches_pod_status_and_skips_a_labelled_pod(api: KubeAPIServer, tmp_path: Path) -> None:
    api.add_pod(validation_failed(meshed_pod("tolabel", "default")))
    r = repairer(api, tmp_path, "label")
    pod = api.get_pod("default", "tolabel")
    assert pod is not None and r.reconcile(pod) == "label"
    (patch,) = [c for c in api.calls if c.method == "PATCH"]
    assert patch.path == "/api/v1/namespaces/default/pods/tolabel/status"
    assert patch.resource == "pods/status"
    labelled = api.get_pod("default", "tolabel")
    assert labelled is not None and labelled["metadata"]["labels"]["cni.istio.io/uninitialized"] == "true"
    assert api.events[0]["reason"] == "LabelBrokenPod"
    again = repairer(api, tmp_path, "label")
    assert again.reconcile(labelled) == "skip"
    assert counter(again, "label", "skip") == 1


def test_the_modes_need_only_their_own_grants(api: KubeAPIServer, tmp_path: Path) -> None:
    """What deploy/kubernetes grants for the label mode is enough; a delete is forbidden."""
    api.grant("label-mode", "list pods", "watch pods", "create events", "patch pods/status")
    api.add_pod(validation_failed(meshed_pod("a", "default")))
    api.add_pod(validation_failed(meshed_pod("b", "default")))
    c = client_for(api, tmp_path, "label-mode")
    label = Repairer(RepairConfig(node=NODE, mode="label", check_running=False), c, plugin_conf)
    assert label.reconcile(api.get_pod("default", "a") or {}) == "label"
    delete = Repairer(RepairConfig(node=NODE, mode="delete", check_running=False), c, plugin_conf)
    assert delete.reconcile(api.get_pod("default", "b") or {}) is None
    assert [x.status for x in api.calls if x.method == "DELETE"] == [403]


# --- metrics ------------------------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    return scrape_metrics(f"http://127.0.0.1:{port}/metrics")


def test_metrics_count_installs_repairs_and_the_plugins_calls(tmp_path: Path) -> None:
    m = Metrics()
    ready = threading.Event()
    m.ready_from(ready.is_set)
    server = serve_metrics(m, "127.0.0.1", 0)
    sock = tmp_path / "run" / addstats.SOCKET_NAME
    receiver = StatsReceiver(m, sock)
    try:
        port = server.server_port
        assert scrape(port)["istio_cni_install_ready"] == 0
        m.installs.labels(result="CREATE_CNI_CONFIG_FAILURE").inc()
        m.installs.labels(result="SUCCESS").inc()
        ready.set()
        m.repaired.labels(type="repair", result="success").inc()
        raw = {"stats_socket": str(sock)}
        addstats.record("ADD", 0, 0.012, raw)
        addstats.record("ADD", 0, 0.2, raw)
        addstats.record("ADD", 1, 0.03, raw)
        addstats.record("DEL", 0, 0.001, raw)
        addstats.record("CHECK", 0, 0.001, raw)  # not counted
        values = wait_for(
            lambda: (v := scrape(port)).get('istio_cni_plugin_dels_total{result="success"}') and v
        )
        assert values["istio_cni_install_ready"] == 1
        assert values['istio_cni_installs_total{result="SUCCESS"}'] == 1
        assert values['istio_cni_installs_total{result="CREATE_CNI_CONFIG_FAILURE"}'] == 1
        assert values['istio_cni_repair_pods_repaired_total{result="success",type="repair"}'] == 1
        assert values['istio_cni_repair_pods_repaired_total{result="fail",type="delete"}'] == 0
        assert values['istio_cni_plugin_adds_total{result="success"}'] == 2
        assert values['istio_cni_plugin_adds_total{result="fail"}'] == 1
        assert values["istio_cni_plugin_add_duration_seconds_count"] == 3
        assert values['istio_cni_plugin_add_duration_seconds_bucket{le="0.025"}'] == 1
        assert values['istio_cni_plugin_add_duration_seconds_bucket{le="0.05"}'] == 2
        # Anything else arriving on the socket is counted apart and changes nothing.
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"istio-cni 1 ADD success nan", str(sock))
            s.sendto(b"\xff garbage", str(sock))
        wait_for(lambda: scrape(port)["istio_cni_plugin_records_invalid_total"] == 2)
        assert scrape(port)['istio_cni_plugin_adds_total{result="success"}'] == 2
    finally:
        receiver.close()
        server.shutdown()
        server.server_close()
    assert not sock.exists()


def test_record_never_fails_without_an_agent(tmp_path: Path) -> None:
    addstats.record("ADD", 0, 0.01, {"stats_socket": str(tmp_path / "nothing-here.sock")})
    addstats.record("ADD", 0, 0.01, {"stats_socket": "\0bad"})
    addstats.record("DEL", 0, 0.01, None)
    addstats.record("ADD", 0, 0.01, {"stats_socket": 42})


# --- settings -----------------------------------------------------------------------------------


BASE_ENV = {
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "KUBERNETES_SERVICE_PORT": "443",
    "PLUGIN_INTERPRETER": "/usr/bin/python3",
}


def settings(**env: str) -> Any:
    return parse_settings(build_parser().parse_args([]), {**BASE_ENV, **env})


def test_settings_take_istios_variables() -> None:
    s = settings(
        REPAIR_REPAIR_PODS="false", REPAIR_DELETE_PODS="true", REPAIR_BROKEN_POD_LABEL_KEY="example.com/broken",
        REPAIR_INIT_CONTAINER_EXIT_CODE="0", REPAIR_NODE_NAME="n9", MONITORING_PORT="9090", STARTUP_TAINT="",
    )  # fmt: skip
    assert s.repair_mode == "delete" and s.repair_label_key == "example.com/broken"
    assert s.repair_init_exit_code == 0 and s.node_name == "n9" and s.monitoring_port == 9090
    assert s.startup_taint == ""
    d = settings()
    assert (d.repair_mode, d.monitoring_port, d.startup_taint, d.repair_init_exit_code) == (
        "repair",
        15014,
        TAINT,
        126,
    )
    assert d.stats_socket == "/var/run/istio-cni/plugin-stats.sock"


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("REPAIR_ENABLED", "sometimes", "is not a boolean"),
        ("REPAIR_BROKEN_POD_LABEL_KEY", "bad key!", "not a valid label key"),
        ("REPAIR_BROKEN_POD_LABEL_VALUE", "-x", "not a valid label value"),
        ("REPAIR_INIT_CONTAINER_EXIT_CODE", "300", "not an exit code"),
        ("REPAIR_INIT_CONTAINER_NAME", "Istio_Validation", "not a container name"),
        ("MONITORING_PORT", "70000", "not a port number"),
        ("STARTUP_TAINT", "a/b/c", "not a valid taint key"),
        ("MOUNTED_NETNS_DIRS", "relative/dir", "not an absolute path"),
        ("REPAIR_FIELD_SELECTORS", "a=\nb", "not a selector"),
    ],
)
def test_a_bad_setting_names_the_variable_and_value(name: str, value: str, says: str) -> None:
    with pytest.raises(SettingsError) as e:
        settings(**{name: value})
    assert str(e.value).startswith(f"{name}: ") and says in str(e.value) and repr(value) in str(e.value)


def test_a_bad_setting_exits_2_without_a_traceback(venv_bin: Path) -> None:
    import subprocess

    p = subprocess.run([str(venv_bin / "install-cni")], env={**BASE_ENV, "PATH": "/usr/bin:/bin", "MONITORING_PORT": "x"},
                       capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert p.returncode == 2 and "MONITORING_PORT: 'x' is not a port number" in p.stderr
    assert "Traceback" not in p.stderr
    assert json.dumps  # keeps the import used by the module's helpers
