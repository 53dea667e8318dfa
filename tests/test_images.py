"""The two container images, built from this tree by deploy/build-images and run as Kubernetes
runs them: the init image with the classic command line inside a pod's network namespace, and the
installer image as the DaemonSet runs it (host network, the node's CNI directories mounted,
read-only root, all capabilities dropped but DAC_OVERRIDE) putting the plugin in place for a
podman network, whose meshed container then gets the rules; on SIGTERM the network is as it was.

No registry is needed: the Debian 12 base is made by deploy/local-base-image (debootstrap from the
Debian mirror) and passed to the build as BASE."""

# The podman fixtures are imported from test_install_podman and used by name.
# ruff: noqa: F811

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kubeapi import KubeAPIServer, meshed_pod
from nsutil import NetNS, run_in, veth_pair
from test_install_podman import (  # noqa: F401 - fixtures used by name
    NAMESPACE,
    TOKEN,
    Net,
    api,
    free_port,
    image,
    net,
    podman_run,
    readyz,
    run,
)

pytestmark = [pytest.mark.podman, pytest.mark.kernel, pytest.mark.slow]

# The classic command line, as the sidecar injector passes it.
CLASSIC_ARGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
                "-b", "*", "-d", "15090,15021,15020"]  # fmt: skip
BASE = "localhost/debian:bookworm-debootstrap"
REGISTRY = "localhost/istio-iptables-py-test"
TAG = "test"
INIT_IMAGE = f"{REGISTRY}/istio-iptables:{TAG}"
INSTALL_IMAGE = f"{REGISTRY}/install-cni:{TAG}"


@pytest.fixture(scope="module")
def images(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Both images, built from this working tree (on a local Debian 12 base)."""
    p = run(["bash", str(repo_root / "deploy" / "local-base-image"), BASE], timeout=900)
    assert p.returncode == 0, p.stderr
    env = {**_podman_env(tmp_path_factory.mktemp("podman")), "BASE": BASE, "REGISTRY": REGISTRY, "TAG": TAG}
    p = run(["bash", str(repo_root / "deploy" / "build-images")], env=env, timeout=1800)
    assert p.returncode == 0, p.stderr[-4000:]
    return {"init": INIT_IMAGE, "install": INSTALL_IMAGE}


def _podman_env(d: Path) -> dict[str, str]:
    """podman settings for this machine (see the podman tests): no raised rlimits, runc, cgroupfs."""
    import os

    conf = d / "containers.conf"
    conf.write_text(
        '[containers]\ndefault_ulimits = []\n\n[network]\nnetwork_backend = "cni"\n\n'
        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n'
    )
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def test_init_image_runs_the_classic_command_line_in_a_pod_namespace(
    images: dict[str, str], netns: Callable[..., NetNS], tmp_path: Path, venv_bin: Path
) -> None:
    pod, peer = netns("pod"), netns("peer")
    veth_pair(pod, peer, addrs_a=["10.7.0.2/24"], addrs_b=["10.7.0.1/24"])
    env = _podman_env(tmp_path)
    base = ["podman", "run", "--rm", "--network", f"ns:{pod.path}"]

    # Dry run: exactly what this tree prints (IPv4 only: the pod has no IPv6 address).
    p = run([*base, images["init"], *CLASSIC_ARGS, "--dry-run"], env=env)
    assert p.returncode == 0, p.stderr
    local = subprocess.run(
        [str(venv_bin / "istio-iptables"), *CLASSIC_ARGS, "--dry-run"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.stdout == local.stdout and "# ip6tables-restore" not in p.stdout

    # Applied as an init container: NET_ADMIN and NET_RAW, in the pod's namespace.
    p = run([*base, "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW", images["init"], *CLASSIC_ARGS], env=env)
    assert p.returncode == 0, p.stderr
    assert "iptables rules are in place" in p.stderr
    saved = run_in(pod, ["iptables-nft-save", "-t", "nat"]).stdout
    assert "-A OUTPUT -j ISTIO_OUTPUT" in saved and "--to-ports 15001" in saved
    assert saved.count("\n-A ") == 18

    # Without NET_ADMIN: a clear error, exit 1, nothing applied elsewhere.
    p = run([*base, "--cap-drop", "ALL", images["init"], *CLASSIC_ARGS], env=env)
    assert p.returncode == 1 and ("Permission denied" in p.stderr or "not permitted" in p.stderr), p.stderr


def test_install_cni_image_as_the_daemonset_runs_it(
    images: dict[str, str], image: str, net: Net, api: KubeAPIServer, tmp_path: Path
) -> None:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(TOKEN)
    (sa / "ca.crt").write_bytes(api.pki.ca_cert.read_bytes())
    port = free_port()
    name = f"install-cni-{secrets.token_hex(3)}"
    # The ConfigMap's settings, with the node's directories where this test keeps them.
    env = {
        "CNI_NET_DIR": str(net.net_dir),
        "MOUNTED_CNI_NET_DIR": "/host/etc/cni/net.d",
        "CNI_BIN_DIR": str(net.bin_dir),
        "MOUNTED_CNI_BIN_DIRS": "/host/opt/cni/bin",
        "CHAINED_CNI_PLUGIN": "true",
        "PLUGIN_INTERPRETER": "/usr/bin/python3 -S",
        "KUBECONFIG_FILENAME": "ZZZ-istio-cni-kubeconfig",
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(api.port),
        "POD_NAMESPACE": "istio-system",
        "HEALTH_ADDRESS": "127.0.0.1",
        "HEALTH_PORT": str(port),
        "POLL_INTERVAL": "0.2",
    }
    argv = ["podman", "run", "--detach", "--name", name, "--network", "host",
            "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--cap-add", "DAC_OVERRIDE",
            "-v", f"{net.bin_dir}:/host/opt/cni/bin", "-v", f"{net.net_dir}:/host/etc/cni/net.d",
            "-v", f"{sa}:/var/run/secrets/kubernetes.io/serviceaccount:ro"]  # fmt: skip
    for k, v in env.items():
        argv += ["--env", f"{k}={v}"]
    p = run([*argv, images["install"]], env=net.env)
    assert p.returncode == 0, p.stderr
    try:
        deadline = time.monotonic() + 120
        while readyz(f"http://127.0.0.1:{port}/readyz")[0] != 200:
            assert time.monotonic() < deadline, run(["podman", "logs", name], env=net.env).stderr
            time.sleep(0.2)
        installed = json.loads(net.conflist.read_bytes())
        assert [p["type"] for p in installed["plugins"]] == ["bridge", "portmap", "istio-cni"]
        entry = installed["plugins"][2]
        assert entry["kubernetes"]["kubeconfig"] == str(net.net_dir / "ZZZ-istio-cni-kubeconfig")
        assert (net.bin_dir / "istio-cni").read_bytes().startswith(b"#!/usr/bin/python3 -S\n")

        meshed = f"reviews-{secrets.token_hex(3)}"
        api.add_pod(meshed_pod(meshed, NAMESPACE))
        p = podman_run(net, meshed, "iptables-save", "-t", "nat")
        assert p.returncode == 0, p.stderr
        assert "-j REDIRECT --to-ports 15001" in p.stdout and ":ISTIO_INBOUND" in p.stdout, p.stdout

        # SIGTERM (podman stop): the entry goes, the rest of the configuration as it was.
        p = run(["podman", "stop", "--time", "30", name], env=net.env)
        assert p.returncode == 0, p.stderr
        state = run(["podman", "inspect", "--format", "{{.State.ExitCode}}", name], env=net.env)
        assert state.stdout.strip() == "0", run(["podman", "logs", name], env=net.env).stderr
        assert net.conflist.read_bytes() == net.original
    finally:
        run(["podman", "rm", "--force", name], env=net.env)
