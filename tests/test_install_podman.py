"""The full chain with a real CNI runtime: ``install-cni`` installs into a podman CNI config dir
(a bridge network, the bin dir in a temporary directory), podman starts containers on that
network, and the meshed one gets the capture rules from the installed executable, which runs
from the zipapp on the host's Python and reads its Pod from an HTTPS test API server with the
kubeconfig the installer wrote. On SIGTERM the network is as it was, and works without us."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.apiserver import KubeAPIServer
from tests.support.pki import make_pki
from tests.support.pods import meshed_pod, pod_object

pytestmark = [pytest.mark.podman, pytest.mark.kernel]

IMAGE = "localhost/mesh-test:1"
TOKEN = "installer-service-account-token"
NAMESPACE = "default"


@dataclass
class Net:
    name: str
    bridge: str
    net_dir: Path
    bin_dir: Path
    conflist: Path
    original: bytes  # the conflist as "the primary plugin" wrote it
    env: dict[str, str]


def run(
    argv: list[str], env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def image(repo_root: Path) -> str:
    if run(["podman", "image", "exists", IMAGE]).returncode != 0:
        p = run(["bash", str(repo_root / "scripts" / "build-test-image")], timeout=600)
        assert p.returncode == 0, p.stderr
    return IMAGE


@pytest.fixture
def api(tmp_path: Path) -> Iterator[KubeAPIServer]:
    with KubeAPIServer(make_pki(tmp_path / "pki"), TOKEN) as server:
        yield server


@pytest.fixture
def net(tmp_path: Path, short_dir: Path) -> Iterator[Net]:
    tag = secrets.token_hex(3)
    name, bridge = f"instcni-{tag}", f"ic{tag}"
    # The self-contained plugin's bin dir must be short enough for its shebang line.
    net_dir, bin_dir = tmp_path / "net.d", short_dir / "bin"
    net_dir.mkdir()
    bin_dir.mkdir()
    subnet = f"10.{90 + secrets.randbelow(10)}.{secrets.randbelow(250)}"
    conflist = net_dir / f"10-{name}.conflist"
    conflist.write_text(
        json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": name,
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": bridge,
                        "isGateway": True,
                        "ipMasq": True,
                        "ipam": {
                            "type": "host-local",
                            "routes": [{"dst": "0.0.0.0/0"}],
                            "ranges": [[{"subnet": f"{subnet}.0/24", "gateway": f"{subnet}.1"}]],
                        },
                    },
                    {"type": "portmap", "capabilities": {"portMappings": True}},
                ],
            },
            indent=2,
        )
        + "\n"
    )
    conf = tmp_path / "containers.conf"
    conf.write_text(
        "[containers]\ndefault_ulimits = []\n\n"
        f'[network]\nnetwork_backend = "cni"\ncni_plugin_dirs = ["{bin_dir}", "/usr/lib/cni"]\n'
        f'network_config_dir = "{net_dir}"\n\n'
        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n'
    )
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    yield Net(name, bridge, net_dir, bin_dir, conflist, conflist.read_bytes(), env)
    # What the bridge and host-local plugins leave behind once every container is gone.
    run(["ip", "link", "del", bridge])
    shutil.rmtree(Path("/var/lib/cni/networks") / name, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def readyz(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


@pytest.fixture
def installer(
    net: Net, api: KubeAPIServer, tmp_path: Path, venv_bin: Path, plugin_template: Path
) -> Iterator[subprocess.Popen[str]]:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(TOKEN)
    (sa / "ca.crt").write_bytes(api.pki.ca_cert.read_bytes())
    port = free_port()
    env = {
        **os.environ,
        "CNI_NET_DIR": str(net.net_dir),
        "CNI_BIN_DIR": str(net.bin_dir),
        "SERVICE_ACCOUNT_DIR": str(sa),
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(api.port),
        "POD_NAMESPACE": "istio-system",
        "HEALTH_ADDRESS": "127.0.0.1",
        "HEALTH_PORT": str(port),
        "POLL_INTERVAL": "0.1",
        "LOG_LEVEL": "debug",
        "PLUGIN_TEMPLATE": str(plugin_template),
    }
    proc = subprocess.Popen(
        [str(venv_bin / "install-cni")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}/readyz"
    deadline = time.monotonic() + 120
    while readyz(url)[0] != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"install-cni did not become ready: {proc.communicate()[1]}")
        time.sleep(0.1)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def podman_run(net: Net, name: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**net.env, "CNI_ARGS": f"K8S_POD_NAMESPACE={NAMESPACE}"}
    return run(
        [
            "podman",
            "run",
            "--rm",
            "--name",
            name,
            "--network",
            net.name,
            "--cap-add",
            "NET_ADMIN",
            IMAGE,
            *argv,
        ],
        env=env,
    )


def test_installed_plugin_captures_a_meshed_container(
    image: str, net: Net, api: KubeAPIServer, installer: subprocess.Popen[str]
) -> None:
    doc = json.loads(net.original)
    installed = json.loads(net.conflist.read_bytes())
    assert [p["type"] for p in installed["plugins"]] == ["bridge", "portmap", "istio-cni"]
    assert installed["plugins"][:2] == doc["plugins"]
    exe = net.bin_dir / "istio-cni"
    # The self-contained plugin: a launcher for its own interpreter, under a versioned name.
    assert exe.read_bytes().startswith(f"#!{net.bin_dir}/istio-cni.d/".encode())
    assert (net.bin_dir / "istio-cni.d").is_dir()

    tag = secrets.token_hex(3)
    meshed, plain = f"productpage-{tag}", f"batch-{tag}"
    api.add_pod(meshed_pod(meshed, NAMESPACE))
    api.add_pod(pod_object(plain, NAMESPACE))

    p = podman_run(net, meshed, "iptables-save", "-t", "nat")
    assert p.returncode == 0, f"podman run failed ({p.returncode}): {p.stderr}"
    rules = p.stdout
    assert ":ISTIO_INBOUND" in rules and ":ISTIO_OUTPUT" in rules, rules
    assert "-j REDIRECT --to-ports 15001" in rules and "-j REDIRECT --to-ports 15006" in rules, rules
    assert any(path.endswith(f"/pods/{meshed}") for _, path, ok in api.requests if ok), api.requests

    p = podman_run(net, plain, "iptables-save", "-t", "nat")
    assert p.returncode == 0, p.stderr
    assert "ISTIO" not in p.stdout, "a pod without a sidecar passes through untouched"

    installer.send_signal(signal.SIGTERM)
    _, stderr = installer.communicate(timeout=60)
    assert installer.returncode == 0, stderr
    assert net.conflist.read_bytes() == net.original, "the network is back, byte for byte"

    # And it works without us: same meshed pod, no plugin in the chain, no rules.
    before = len(api.requests)
    p = podman_run(net, f"{meshed}-2", "iptables-save", "-t", "nat")
    assert p.returncode == 0, p.stderr
    assert "ISTIO" not in p.stdout
    assert len(api.requests) == before
