"""The plugin as install-cni installs it: the zipapp ``cni.bundle`` builds, run with the node's
Python and ``-S`` (no site-packages) as a runtime runs it (CNI_* environment, configuration on
stdin), against the tests' HTTPS API server. What it carries (PyYAML's pure-Python package for
kubeconfigs beyond the plain YAML the plugin reads itself, nothing compiled), kubeconfigs in
the forms people write, and kubeconfigs that cannot be used failing at once, not at the
deadline."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from cni import kube
from cni.bundle import build_archive
from tests.support.apiserver import KubeAPIServer
from tests.support.kubeconfig import (
    PYYAML_ONLY_FORMS,
    YAML_KUBECONFIG_FORMS,
    write_kubeconfig,
    yaml_kubeconfig,
)
from tests.support.pki import Pki
from tests.support.plugin import PluginRun, k8s_args, netconf, run_plugin
from tests.support.pods import pod_object

TOKEN = "bundle-token"
NS = "shop"
INTERPRETER = f"{sys.executable} -S"


@pytest.fixture(scope="module")
def archive() -> bytes:
    return build_archive(INTERPRETER)


@pytest.fixture(scope="module")
def exe(archive: bytes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The executable as install-cni writes it into the node's CNI bin dir."""
    path = tmp_path_factory.mktemp("bin") / "istio-cni"
    path.write_bytes(archive)
    path.chmod(0o755)
    return path


def outcome(run: PluginRun) -> Any:
    assert "Traceback" not in run.stderr, run.stderr
    return json.loads(run.stdout) if run.stdout else None


def test_the_interpreter_has_no_pyyaml_of_its_own() -> None:
    # Otherwise the tests below would not show that the executable carries what it needs.
    p = subprocess.run(
        [sys.executable, "-S", "-c", "import yaml"], capture_output=True, timeout=60, check=False
    )
    assert p.returncode != 0


def test_the_executable_carries_pure_python_pyyaml(archive: bytes) -> None:
    names = zipfile.ZipFile(io.BytesIO(archive[archive.index(b"PK\x03\x04") :])).namelist()
    assert "yaml/__init__.py" in names and "yaml/__init__.pyc" in names
    assert not [n for n in names if n.startswith("pyroute2/")], "routes are netlink requests of our own"
    assert not [n for n in names if n.endswith((".so", ".pyd"))], "nothing compiled for this machine"
    assert build_archive(INTERPRETER) == archive, "the same sources give the same bytes"


@pytest.mark.parametrize("form", YAML_KUBECONFIG_FORMS)
def test_add_reads_a_yaml_kubeconfig(
    exe: Path, api: KubeAPIServer, pki: Pki, tmp_path: Path, sandbox: str, form: str
) -> None:
    text = yaml_kubeconfig(form, api.url, pki.ca_cert, TOKEN)
    if form in PYYAML_ONLY_FORMS:
        with pytest.raises(kube._NotSimple):
            kube._simple_yaml(text)
    kc = tmp_path / "kubeconfig"
    kc.write_text(text)
    name = f"plain-{form}"
    api.add_pod(pod_object(name, NS))  # not meshed: read, then passed through
    run = run_plugin(exe, "ADD", netconf(kc), netns=sandbox, args=k8s_args(NS, name))
    assert run.code == 0, f"stdout={run.stdout} stderr={run.stderr}"
    assert outcome(run) == {"cniVersion": "1.0.0", "dns": {}}
    assert "does not have istio-proxy container" in run.stderr
    assert ("GET", f"/api/v1/namespaces/{NS}/pods/{name}", True) in api.requests


UNUSABLE = {
    "malformed-yaml": (b"clusters: [{name: c, cluster: {server: https://x}\n", "is not valid YAML"),
    "not-utf8": (b"apiVersion: v1\nkind: Conf\xe9g\n", "is not UTF-8 text"),
    "not-a-mapping": (b"- just\n- a list\n", "is not a mapping"),
}


@pytest.mark.parametrize("how", UNUSABLE)
def test_add_with_an_unusable_kubeconfig_fails_at_once(
    exe: Path, api: KubeAPIServer, tmp_path: Path, sandbox: str, how: str
) -> None:
    content, message = UNUSABLE[how]
    kc = tmp_path / "kubeconfig"
    kc.write_bytes(content)
    conf = netconf(kc, kubernetes={"api_deadline_seconds": 20})
    start = time.monotonic()
    run = run_plugin(exe, "ADD", conf, netns=sandbox, args=k8s_args(NS, "web-0"))
    assert time.monotonic() - start < 6, "a kubeconfig no retry can fix fails before the deadline"
    doc = outcome(run)
    assert run.code != 0 and doc["code"] == 11, doc
    assert doc["msg"] == f"cannot read pod {NS}/web-0 from the Kubernetes API"
    assert f"kubeconfig {kc} {message}" in doc["details"] and "gave up" not in doc["details"]


def test_add_of_the_node_pod_passes_with_an_unusable_kubeconfig(
    exe: Path, tmp_path: Path, sandbox: str
) -> None:
    kc = tmp_path / "kubeconfig"
    kc.write_bytes(UNUSABLE["malformed-yaml"][0])
    conf = netconf(
        kc, pod_namespace="istio-system", kubernetes={"exclude_namespaces": [], "api_deadline_seconds": 60}
    )
    run = run_plugin(exe, "ADD", conf, netns=sandbox, args=k8s_args("istio-system", "istio-cni-node-7xk2p"))
    assert run.code == 0, f"stdout={run.stdout} stderr={run.stderr}"
    assert outcome(run) == {"cniVersion": "1.0.0", "dns": {}}
    assert "looks like our own istio-cni-node pod" in run.stderr


def test_add_with_an_unreachable_api_is_retried_until_the_deadline(
    exe: Path, pki: Pki, tmp_path: Path, sandbox: str
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kc = write_kubeconfig(tmp_path / "kc", f"https://127.0.0.1:{port}", ca_file=pki.ca_cert, token=TOKEN)
    conf = netconf(kc, kubernetes={"api_deadline_seconds": 1.5, "api_request_timeout_seconds": 0.5})
    run = run_plugin(exe, "ADD", conf, netns=sandbox, args=k8s_args(NS, "web-0"))
    doc = outcome(run)
    assert doc["code"] == 11 and "gave up after" in doc["details"] and "Connection refused" in doc["details"]
