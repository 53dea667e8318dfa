"""End to end with a second CNI runtime, podman (CNI backend), for what the CRI tests
(tests/test_cri.py, containerd as kubelet drives it) do not cover: a Multus-style standalone
attachment (istio-cni alone on a second network, no prevResult, eth1), a token the API rejects,
and the installer's own pod starting while the API is down (the plugin's bypass). Containers run
on networks whose conflists chain bridge -> istio-cni or hold istio-cni alone; the plugin reads
Pods from the HTTPS test API server (recipe: ../shared/notes/podman-cni.md).

podman passes only ``K8S_POD_NAME`` (the container name); the tests add ``K8S_POD_NAMESPACE``
through the ``CNI_ARGS`` environment variable, as the notes describe."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.apiserver import KubeAPIServer
from tests.support.kubeconfig import write_kubeconfig
from tests.support.pki import Pki, make_pki
from tests.support.pods import meshed_pod, pod_object

pytestmark = [pytest.mark.podman, pytest.mark.kernel]

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "localhost/mesh-test:1"
TOKEN = "podman-e2e-token"
NS = "default"
# Listeners inside the meshed container: where captured connections land, and the app itself.
MESHED_CMD = (
    "nc -ll -p 15001 -e echo outbound-captured & "
    "nc -ll -p 15006 -e echo inbound-captured & "
    "nc -ll -p 8080 -e echo app & exec sleep 600"
)
PLAIN_CMD = "nc -ll -p 8080 -e echo direct & exec sleep 600"


class Mesh:
    """A private podman configuration with a bridge -> istio-cni network and the API behind it."""

    def __init__(self, root: Path, api: KubeAPIServer, pki: Pki) -> None:
        self.root = root
        self.api = api
        self.pki = pki
        tag = secrets.token_hex(3)
        self.tag = tag
        self.net = f"mesh-{tag}"
        self.plain_net = f"plain-{tag}"
        self.solo_net = f"solo-{tag}"
        self.bridges = [f"mb{tag}", f"pb{tag}"]
        third = 100 + secrets.randbelow(150)
        self.kubeconfig = root / "ZZZ-istio-cni-kubeconfig"
        self.log = root / "istio-cni.log"
        self.containers: list[str] = []
        bin_dir, net_d = root / "bin", root / "net.d"
        bin_dir.mkdir()
        net_d.mkdir()
        # The runtime execs plugins by type name from its plugin dirs; this one hands over to the
        # installed console script (absolute path: podman's PATH may hold a different python).
        wrapper = bin_dir / "istio-cni"
        wrapper.write_text(f'#!/bin/sh\nexec {ROOT / ".venv" / "bin" / "istio-cni"} "$@"\n')
        wrapper.chmod(0o755)
        istio = {
            "type": "istio-cni",
            "plugin_log_level": "debug",
            "log_file": str(self.log),
            "exclude_namespaces": ["kube-system"],
            "pod_namespace": "istio-system",
            "kubernetes": {
                "kubeconfig": str(self.kubeconfig),
                "cni_bin_dir": str(bin_dir),
                "api_deadline_seconds": 3,
                "api_request_timeout_seconds": 1,
            },
        }

        def bridge(name: str, subnet: int) -> dict[str, Any]:
            return {
                "type": "bridge",
                "bridge": name,
                "isGateway": True,
                "ipMasq": True,
                "ipam": {
                    "type": "host-local",
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "ranges": [
                        [{"subnet": f"10.{subnet}.{third}.0/24", "gateway": f"10.{subnet}.{third}.1"}]
                    ],
                },
            }

        lists = {
            self.net: [bridge(self.bridges[0], 86), istio],
            self.plain_net: [bridge(self.bridges[1], 87)],
            self.solo_net: [istio],  # Multus-style: istio-cni alone, no prevResult
        }
        for name, plugins in lists.items():
            (net_d / f"{name}.conflist").write_text(
                json.dumps({"cniVersion": "1.0.0", "name": name, "plugins": plugins}, indent=2)
            )
        self.conf = root / "containers.conf"
        self.conf.write_text(
            "[containers]\ndefault_ulimits = []\n\n"
            f'[network]\nnetwork_backend = "cni"\ncni_plugin_dirs = ["{bin_dir}", "/usr/lib/cni"]\n'
            f'network_config_dir = "{net_d}"\n\n'
            '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n'
        )
        self.good_kubeconfig()

    def good_kubeconfig(self) -> None:
        write_kubeconfig(self.kubeconfig, self.api.url, ca_data=self.pki.ca_cert, token=TOKEN)

    def podman(
        self, *args: str, cni_args: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": os.environ.get("HOME", "/root"),
            "CONTAINERS_CONF": str(self.conf),
        }
        if cni_args is not None:
            env["CNI_ARGS"] = cni_args
        p = subprocess.run(
            ["podman", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and p.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
        return p

    def run(
        self, name: str, networks: str, command: str, *, namespace: str = NS
    ) -> subprocess.CompletedProcess[str]:
        self.containers.append(name)
        return self.podman(
            "run", "-d", "--name", name, "--network", networks, "--cap-add", "NET_ADMIN",
            IMAGE, "sh", "-c", command,
            cni_args=f"K8S_POD_NAMESPACE={namespace}",
            check=False,
        )  # fmt: skip

    def sh(self, name: str, command: str, *, user: str = "0") -> str:
        return self.podman("exec", "--user", user, name, "sh", "-c", command).stdout

    def ip(self, name: str, network: str) -> str:
        info = json.loads(self.podman("inspect", name).stdout)[0]
        return str(info["NetworkSettings"]["Networks"][network]["IPAddress"])

    def connect(self, name: str, ip: str, port: int, *, user: str = "0") -> str:
        return self.sh(name, f"nc -w 3 {ip} {port} </dev/null", user=user).strip()

    def wait_listening(self, name: str, ports: list[int]) -> None:
        self.sh(
            name,
            "for i in $(seq 50); do ok=1; for p in " + " ".join(map(str, ports)) + "; do "
            'netstat -ltn 2>/dev/null | grep -q ":$p " || ok=0; done; [ $ok = 1 ] && exit 0; sleep 0.1; done; exit 1',
        )

    def cleanup(self) -> None:
        for name in self.containers:
            self.podman("rm", "-f", "-t", "0", name, check=False)
        for br in self.bridges:
            subprocess.run(["ip", "link", "del", br], capture_output=True, check=False)
        for net in (self.net, self.plain_net, self.solo_net):
            shutil.rmtree(f"/var/lib/cni/networks/{net}", ignore_errors=True)
            for cached in Path("/var/lib/cni/results").glob(f"{net}-*"):
                cached.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    # The image the tests run, built from host files by the infra script (a no-op when present).
    subprocess.run(["bash", str(ROOT / "scripts" / "build-test-image")], check=True, timeout=600)
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    with KubeAPIServer(pki, TOKEN) as api:
        m = Mesh(tmp_path_factory.mktemp("podman"), api, pki)
        try:
            yield m
        finally:
            m.cleanup()


def iptables(mesh: Mesh, name: str) -> str:
    return mesh.sh(name, "iptables-save; ip6tables-save")


def test_multus_style_standalone_attachment(mesh: Mesh) -> None:
    # The primary network is a plain bridge; istio-cni runs as a second, standalone attachment
    # (no prevResult, CNI_IFNAME=eth1), as Multus runs it from a NetworkAttachmentDefinition.
    solo, peer = f"reviews-{mesh.tag}", f"ratings-{mesh.tag}"
    mesh.api.add_pod(meshed_pod(solo, NS))
    mesh.api.add_pod(pod_object(peer, NS))
    assert mesh.run(peer, mesh.plain_net, PLAIN_CMD).returncode == 0
    run = mesh.run(solo, f"{mesh.plain_net},{mesh.solo_net}", MESHED_CMD)
    assert run.returncode == 0, run.stderr
    mesh.wait_listening(solo, [15001, 15006, 8080])
    mesh.wait_listening(peer, [8080])
    assert "-A OUTPUT -j ISTIO_OUTPUT" in iptables(mesh, solo)
    assert mesh.connect(solo, mesh.ip(peer, mesh.plain_net), 8080, user="1000") == "outbound-captured"
    assert mesh.connect(peer, mesh.ip(solo, mesh.plain_net), 8080) == "inbound-captured"


def test_pod_does_not_start_when_the_api_rejects_the_token(mesh: Mesh) -> None:
    # (The API down, under containerd: tests/test_cri.py.)
    name = f"wrong-token-{mesh.tag}"
    mesh.api.add_pod(meshed_pod(name, NS))
    write_kubeconfig(mesh.kubeconfig, mesh.api.url, ca_data=mesh.pki.ca_cert, token="not-the-token")
    try:
        run = mesh.run(name, mesh.net, MESHED_CMD)
    finally:
        mesh.good_kubeconfig()
    assert run.returncode != 0
    assert 'plugin type="istio-cni" failed (add)' in run.stderr
    assert f"cannot read pod {NS}/{name} from the Kubernetes API" in run.stderr
    assert "gave up after" in run.stderr
    state = mesh.podman("inspect", name, "--format", "{{.State.Status}}", check=False).stdout.strip()
    assert state != "running"


def test_node_daemon_pod_starts_while_the_api_is_down(mesh: Mesh) -> None:
    name = f"istio-cni-node-{mesh.tag}"
    write_kubeconfig(mesh.kubeconfig, "https://127.0.0.1:9", ca_data=mesh.pki.ca_cert, token=TOKEN)
    try:
        run = mesh.run(name, mesh.net, PLAIN_CMD, namespace="istio-system")
    finally:
        mesh.good_kubeconfig()
    assert run.returncode == 0, run.stderr
    assert "ISTIO" not in iptables(mesh, name)
    assert "looks like our own istio-cni-node pod, passing through" in mesh.log.read_text()
