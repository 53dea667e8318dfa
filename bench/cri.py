"""Item ``cri``: what the plugin adds to a real pod start. RunPodSandbox through a private
containerd's CRI (Debian 12's containerd 1.6, the tests' set-up in tests/containerd.py), three
ways in the same run, one of each per round after a warm-up round:

- without our plugin: a runtime handler whose CNI conf dir holds the node's bridge network alone;
- with it, an unmeshed pod: the default handler, whose network install-cni chained the plugin
  into (the plugin reads the Pod from the API and passes it through);
- with it, a meshed pod: the same, and the plugin installs the rules.

install-cni runs on this machine as the DaemonSet would run it on a node (the ConfigMap's
settings, the node's directories being containerd's), so the plugin measured is what it
installs today. Every sandbox is checked (rules in the meshed one's namespace, none in the
others), then stopped and removed; that time is reported too."""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support import apiserver
from tests.support.pki import make_pki

from . import fixtures
from .stats import summary

KINDS = ("nomesh", "unmeshed", "meshed")
LABELS = {
    "nomesh": "RunPodSandbox, no istio-cni in the chain",
    "unmeshed": "RunPodSandbox, istio-cni, unmeshed pod",
    "meshed": "RunPodSandbox, istio-cni, meshed pod",
}


def _tests_dir(repo: Path) -> Path:
    return repo / "tests"


def _modules(repo: Path) -> tuple[Any, Any]:
    """tests/containerd.py and tests/cri.py (the CRI client compiles its proto on import)."""
    tests = str(_tests_dir(repo))
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import containerd
    import cri

    return containerd, cri


def unavailable(repo: Path) -> str:
    """'' when the item can run here; otherwise why not."""
    try:
        containerd, _ = _modules(repo)
    except ImportError as e:
        return f"the CRI client cannot be built: {e} (run scripts/setup)"
    return containerd.unavailable_reason() or ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _unmeshed(pod: dict[str, Any]) -> dict[str, Any]:
    """The same Pod without the injector's work: no sidecar, no init container, no status."""
    out = copy.deepcopy(pod)
    out["spec"]["containers"] = [c for c in out["spec"]["containers"] if c["name"] != "istio-proxy"]
    out["spec"].pop("initContainers", None)
    out["metadata"]["annotations"].pop("sidecar.istio.io/status", None)
    return out


class _Run:
    def __init__(self, repo: Path, work: Path, venv_bin: Path, log: Callable[[str], None]) -> None:
        self.repo, self.work, self.venv_bin, self.log = repo, work, venv_bin, log
        self.containerd_mod, self.cri_mod = _modules(repo)
        # A short root: the CNI bin dir is in the self-contained plugin's shebang.
        self.ctd = self.containerd_mod.Containerd(Path(tempfile.mkdtemp(prefix="cri-", dir="/tmp")))
        self.server: subprocess.Popen[bytes] | None = None
        self.installer: subprocess.Popen[bytes] | None = None
        self.installer_log = work / "install-cni.log"
        self.seconds: dict[str, list[float]] = {k: [] for k in KINDS}
        self.teardown_seconds: dict[str, list[float]] = {k: [] for k in KINDS}
        self.failures: dict[str, list[str]] = {k: [] for k in KINDS}
        self.info: dict[str, Any] = {}

    # -- set-up --

    def setup(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.ctd.start()
        self.ctd.import_busybox_images()
        v = self.ctd.client.version()
        self.info["containerd"] = f"{v.runtime_name} {v.runtime_version} (CRI {v.runtime_api_version})"
        self._start_api()
        self._start_installer()
        types = self.containerd_mod.plugin_types(self.ctd.wait_cni_config(lambda t: "istio-cni" in t))
        self.info["chain"] = types
        nomesh = self.ctd.networks["nomesh"]
        self.info["chain_without_plugin"] = [p["type"] for p in nomesh.conflist["plugins"]]

    def _start_api(self) -> None:
        pki = make_pki(self.work / "pki")
        self.ca, self.token = pki.ca_cert, fixtures.new_token()
        meshed = fixtures.meshed_pod("meshed")
        pods = {"default": meshed, "meshed": meshed, "unmeshed": _unmeshed(fixtures.meshed_pod("unmeshed"))}
        self.pods = pods
        self.server, self.api_port = apiserver.spawn(
            pki, self.token, pods, self.work, timeout=20, start_new_session=True
        )

    def _plugin_template(self) -> dict[str, str]:
        """What install-cni needs on this machine to write the plugin it writes on a node: the
        self-contained plugin's template where that exists (the image carries it at
        /opt/istio-cni/plugin), built here the way the image's build does."""
        env: dict[str, str] = {}
        if importlib.util.find_spec("cni.selfcontained") is not None:
            template = self.work / "plugin-template"
            argv = [sys.executable, "-m", "cni.selfcontained", "--template-only", str(template)]
            p = subprocess.run(argv, cwd=self.repo, capture_output=True, text=True, timeout=600, check=False)
            if p.returncode != 0:
                raise RuntimeError(f"building the self-contained plugin failed: {p.stderr.strip()[-2000:]}")
            env["PLUGIN_TEMPLATE"] = str(template)
        return env

    def _start_installer(self) -> None:
        import yaml

        cm = yaml.safe_load((self.repo / "deploy" / "kubernetes" / "configmap.yaml").read_text())
        sa = self.work / "serviceaccount"
        sa.mkdir()
        (sa / "token").write_text(self.token)
        shutil.copy(self.ca, sa / "ca.crt")
        port = _free_port()
        env = {k: str(v) for k, v in cm["data"].items()}
        # The node's directories are containerd's; there is no /host mount outside a pod.
        env.update(
            PATH=os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            CNI_NET_DIR=str(self.ctd.conf_dir), MOUNTED_CNI_NET_DIR=str(self.ctd.conf_dir),
            CNI_BIN_DIR=str(self.ctd.bin_dir), MOUNTED_CNI_BIN_DIRS=str(self.ctd.bin_dir),
            SERVICE_ACCOUNT_DIR=str(sa), KUBERNETES_SERVICE_HOST="127.0.0.1",
            KUBERNETES_SERVICE_PORT=str(self.api_port), POD_NAMESPACE="istio-system",
            KUBERNETES_NODE_NAME="node-1", HEALTH_ADDRESS="127.0.0.1", HEALTH_PORT=str(port),
        )  # fmt: skip
        env.update(self._plugin_template())
        with self.installer_log.open("wb") as out:
            self.installer = subprocess.Popen(
                [str(self.venv_bin / "install-cni")], env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}/readyz"
        deadline = time.monotonic() + 120
        while not _ready(url):
            if self.installer.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"install-cni did not become ready: {self.installer_log.read_text()[-2000:]}"
                )
            time.sleep(0.1)
        exe = self.ctd.bin_dir / "istio-cni"
        with exe.open("rb") as f:
            shebang = f.readline(300).decode(errors="replace").strip()
        self.info["plugin_shebang"] = shebang.replace(str(self.ctd.bin_dir), "<bin_dir>")

    # -- the measurements --

    def once(self, kind: str, record: bool) -> None:
        name = {"nomesh": "meshed"}.get(kind, kind)  # without the plugin: the meshed pod, unread
        annotations = self.pods[name]["metadata"]["annotations"]
        uid, parent = str(uuid.uuid4()), self.ctd.cgroup_parent
        make = self.cri_mod.sandbox_config
        sb = make(name, fixtures.NAMESPACE, uid, annotations=annotations, cgroup_parent=parent)
        cri = self.ctd.client
        t0 = time.perf_counter()
        try:
            sid = cri.run_pod_sandbox(sb, runtime_handler="nomesh" if kind == "nomesh" else "")
        except self.cri_mod.CRIError as e:
            if not record:
                raise RuntimeError(f"{kind}: {e}") from None
            self.failures[kind].append(str(e)[:300])
            return
        took = time.perf_counter() - t0
        why = self._check(kind, cri.netns_path(sid))
        t1 = time.perf_counter()
        cri.stop_pod_sandbox(sid)
        cri.remove_pod_sandbox(sid)
        down = time.perf_counter() - t1
        if why and not record:
            raise RuntimeError(f"{kind}: {why}")
        if record:
            if why:
                self.failures[kind].append(why)
            else:
                self.seconds[kind].append(took)
                self.teardown_seconds[kind].append(down)

    @staticmethod
    def _check(kind: str, netns: str) -> str:
        p = subprocess.run(["nsenter", f"--net={netns}", "iptables-save", "-t", "nat"],
                           capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
        if p.returncode != 0:
            return f"iptables-save in the sandbox failed: {p.stderr.strip()}"
        has = "-A OUTPUT -j ISTIO_OUTPUT" in p.stdout
        if kind == "meshed" and not has:
            return "the meshed pod's sandbox has no capture rules"
        if kind != "meshed" and "ISTIO" in p.stdout:
            return f"the {kind} pod's sandbox has capture rules"
        return ""

    def rounds(self, reps: int) -> None:
        for kind in KINDS:  # warm-up: bridges created, caches filled; not timed
            self.once(kind, record=False)
        for i in range(reps):
            # A different order each round, so that no kind always follows the same one.
            for kind in KINDS[i % 3 :] + KINDS[: i % 3]:
                self.once(kind, record=True)

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok", **self.info}
        for kind in KINDS:
            out[kind] = summary(self.seconds[kind], failures=len(self.failures[kind]))
            out[f"{kind}_teardown"] = summary(self.teardown_seconds[kind])
            if self.failures[kind]:
                out[kind]["failure_reasons"] = sorted(set(self.failures[kind]))[:5]
        med = {k: statistics.median(v) * 1000 for k, v in self.seconds.items() if v}
        out["added_ms"] = {
            k: round(med[k] - med["nomesh"], 2) if k in med and "nomesh" in med else None
            for k in ("unmeshed", "meshed")
        }
        failed = [k for k in KINDS if self.failures[k]]
        if failed:
            out.update(status="failed", reason=f"{failed[0]}: {self.failures[failed[0]][0]}")
        return out

    # -- tear-down --

    def teardown(self) -> list[str]:
        problems = self.ctd.stop()
        for p in (self.installer, self.server):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        return problems


def cri_item(bench: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """Runs the item with the benchmark's repetitions; its document for the report."""
    why = unavailable(bench.repo)
    if why:
        return {"status": "not run", "reason": why}
    run = _Run(bench.repo, bench.work / "cri", bench.venv_bin, log)
    try:
        log("cri: containerd, install-cni, warm-up")
        run.setup()
        run.rounds(bench.reps)
        doc = run.result()
    except Exception as e:  # noqa: BLE001 - reported as the item's failure, the run goes on
        doc = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:1000], **run.info}
    finally:
        problems = run.teardown()
    if problems:
        doc["teardown_problems"] = problems
    log(f"cri: {doc['status']}")
    return doc


def lines(item: dict[str, Any], row: Callable[[str, dict[str, Any] | None], str], status: str) -> list[str]:
    """The item's rows of the table (``row`` and ``status`` are the report's formatters)."""
    out = ["10. pod start through containerd's CRI (RunPodSandbox)" + status]
    if item.get("status") == "not run":
        return out
    for kind in KINDS:
        out.append(row(LABELS[kind], item.get(kind)))
    added = item.get("added_ms") or {}
    if added:
        out.append(
            f"  {'istio-cni adds (medians, same run):':<46} unmeshed pod {added.get('unmeshed')} ms, "
            f"meshed pod {added.get('meshed')} ms"
        )
    tear = [f"{k} {(item.get(f'{k}_teardown') or {}).get('median_ms')}" for k in KINDS]
    out.append(f"  {'StopPodSandbox + RemovePodSandbox (median ms):':<46} " + ", ".join(tear))
    if item.get("containerd"):
        out.append(f"  {item['containerd']}; chain {item.get('chain')}; plugin {item.get('plugin_shebang')}")
    return out
