"""The self-contained plugin (cni/selfcontained.py) as a node runs it: built by scripts/build-plugin,
installed into a bin dir, run from a root filesystem that holds nothing but busybox (chroot, as a
runtime would exec it: environment + stdin), traced to show it loads and runs nothing of the
node's, and upgraded while ADDs run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cni import selfcontained as sc
from tests.support.apiserver import KubeAPIServer
from tests.support.kubeconfig import write_kubeconfig
from tests.support.netns import NetNS, veth_pair
from tests.support.pki import Pki
from tests.support.plugin import cni_env, k8s_args, netconf, prev_result
from tests.support.pods import meshed_pod

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bundle-token"
NS = "shop"
BIN_DIRS = ["/opt/cni/bin", "/var/lib/cni/bin"]
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"


@pytest.fixture(scope="module")
def template(plugin_template: Path) -> Path:
    """One build, as the installer image makes it."""
    return plugin_template


@pytest.fixture(scope="module")
def api(api: KubeAPIServer) -> KubeAPIServer:
    api.add_pod(meshed_pod("web", NS, proxy_env={"ISTIO_DUAL_STACK": "true"}))
    api.add_pod(meshed_pod("web-nft", NS))
    return api


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


class Root:
    """A root filesystem, and what is mounted into it (unmounted when the test ends)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounts: list[Path] = []

    def listdir(self, rel: str) -> list[str]:
        return sorted(os.listdir(self.path / rel))


@contextlib.contextmanager
def rootfs(base: Path, template: Path, bin_dir: str, api: KubeAPIServer, pki: Pki) -> Iterator[Root]:
    """A root filesystem with only busybox, the plugin installed at ``bin_dir`` and a kubeconfig;
    the kernel's /proc and /dev as on any node; namespaces are bound in by ``bind_netns``."""
    root = base / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    sc.install(template, root / bin_dir.lstrip("/"), bin_dir)
    (root / "etc" / "cni" / "net.d").mkdir(parents=True)
    write_kubeconfig(root / "etc" / "cni" / "net.d" / "kc", api.url, ca_data=pki.ca_cert, token=TOKEN)
    r = Root(root)
    try:
        for d, how in (("proc", ["-t", "proc", "proc"]), ("dev", ["--bind", "/dev"])):
            (root / d).mkdir()
            _mount(*how, str(root / d))
            r.mounts.append(root / d)
        yield r
    finally:
        for m in reversed(r.mounts):
            subprocess.run(["umount", "-l", str(m)], check=False, capture_output=True)


def bind_netns(root: Root, ns: NetNS) -> None:
    target = root.path / ns.path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.touch()
    _mount("--bind", ns.path, str(target))
    root.mounts.append(target)


def plugin_env(command: str, netns: str, args: str = "", path: str = "/bin") -> dict[str, str]:
    return cni_env(command, container_id="0123456789abcdef0123456789abcdef", netns=netns, args=args, path=path)


def chrooted(root: Root, bin_dir: str, env: dict[str, str], conf: dict[str, Any] | None) -> subprocess.CompletedProcess[str]:
    data = json.dumps(conf) if conf is not None else ""
    return subprocess.run(
        [CHROOT, str(root.path), f"{bin_dir}/istio-cni"], input=data, env=env, capture_output=True, text=True, timeout=60
    )


def conf_for(name: str, **extra: Any) -> dict[str, Any]:
    return netconf("/etc/cni/net.d/kc", **extra)


def dual_stack_pod(netns: Callable[..., NetNS]) -> NetNS:
    ns, peer = netns("pod"), netns("peer")
    veth_pair(ns, peer, addrs_a=["10.9.0.2/24", "fd00:9::2/64"], addrs_b=["10.9.0.1/24", "fd00:9::1/64"])
    return ns


def saved(ns: NetNS, command: str) -> str:
    return ns.run([command]).stdout


# --- the bundle ------------------------------------------------------------------------------------


def test_the_bundle_is_complete_bounded_and_licensed(template: Path, tmp_path: Path) -> None:
    out = tmp_path / "bin"
    p = subprocess.run([str(ROOT / "scripts" / "build-plugin"), "--bin-dir", "/opt/cni/bin", str(out)],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["bytes"] <= 30 << 20
    version = report["version"]
    assert sorted(os.listdir(out)) == ["istio-cni", "istio-cni.d"]
    assert os.listdir(out / "istio-cni.d") == [version]
    launcher = (out / "istio-cni").read_text()
    assert launcher.startswith(f"#!/opt/cni/bin/istio-cni.d/{version}/bin/python3 -IS\n")
    assert len(launcher.splitlines()[0]) < 128, "a shebang must fit older kernels' limit"
    d = out / "istio-cni.d" / version
    manifest = (d / "share" / "MANIFEST").read_text()
    for pkg in ("libc6", "iptables", "nftables", "python3.11-minimal"):
        assert f"\n{pkg}\t" in manifest or f"\n{pkg}:" in manifest, manifest
        assert any(n.startswith(pkg) for n in os.listdir(d / "share" / "licenses")), pkg
    # The same sources give the same version; the template's content is what install copies.
    assert sc.template_version(template) == version


# --- in a root filesystem with only busybox ---------------------------------------------------------


@pytest.mark.parametrize("bin_dir", BIN_DIRS)
def test_add_check_del_in_a_root_with_only_busybox(
    bin_dir: str, template: Path, api: KubeAPIServer, pki: Pki, netns: Callable[..., NetNS], tmp_path: Path
) -> None:
    with rootfs(tmp_path, template, bin_dir, api, pki) as root:
        assert root.listdir("bin") == ["busybox"]
        version = chrooted(root, bin_dir, plugin_env("VERSION", ""), {"cniVersion": "1.0.0"})
        assert version.returncode == 0 and "1.1.0" in json.loads(version.stdout)["supportedVersions"]
        ns = dual_stack_pod(netns)
        bind_netns(root, ns)
        env = plugin_env("ADD", ns.path, k8s_args(NS, "web"))
        add = chrooted(root, bin_dir, env, conf_for("web"))
        assert add.returncode == 0, add.stdout + add.stderr
        assert "installed REDIRECT capture rules (IPv4+IPv6)" in add.stderr
        assert "-A OUTPUT -j ISTIO_OUTPUT" in saved(ns, "iptables-nft-save")
        assert "-A OUTPUT -j ISTIO_OUTPUT" in saved(ns, "ip6tables-nft-save")
        assert "Traceback" not in add.stderr and "lookups not limited" not in add.stderr
        for command in ("CHECK", "DEL"):
            r = chrooted(root, bin_dir, plugin_env(command, ns.path, k8s_args(NS, "web")),
                         conf_for("web", prev_result=prev_result("1.0.0")))  # fmt: skip
            assert (r.returncode, r.stdout) == (0, ""), r.stderr


def test_add_into_a_namespace_whose_legacy_tables_are_in_use(
    template: Path, api: KubeAPIServer, pki: Pki, netns: Callable[..., NetNS], tmp_path: Path
) -> None:
    with rootfs(tmp_path, template, BIN_DIRS[0], api, pki) as root:
        ns = dual_stack_pod(netns)
        for cmd in ("iptables-legacy", "ip6tables-legacy"):
            ns.run([cmd, "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "7777", "-j", "ACCEPT"])
        bind_netns(root, ns)
        add = chrooted(root, BIN_DIRS[0], plugin_env("ADD", ns.path, k8s_args(NS, "web")), conf_for("web"))
        assert add.returncode == 0, add.stderr
        assert "using iptables-legacy" in add.stderr
        assert "-A OUTPUT -j ISTIO_OUTPUT" in saved(ns, "iptables-legacy-save")
        assert "-A OUTPUT -j ISTIO_OUTPUT" in saved(ns, "ip6tables-legacy-save")
        assert "ISTIO" not in saved(ns, "iptables-nft-save")


def test_add_with_native_nftables(
    template: Path, api: KubeAPIServer, pki: Pki, netns: Callable[..., NetNS], tmp_path: Path
) -> None:
    with rootfs(tmp_path, template, BIN_DIRS[0], api, pki) as root:
        ns = netns("pod")
        bind_netns(root, ns)
        conf = conf_for("web-nft", native_nftables=True, prev_result=prev_result("1.0.0", netns=ns.path))
        add = chrooted(root, BIN_DIRS[0], plugin_env("ADD", ns.path, k8s_args(NS, "web-nft")), conf)
        assert add.returncode == 0, add.stderr
        listed = ns.run(["nft", "list", "ruleset"]).stdout
        assert "table inet istio-proxy-nat" in listed and "jump istio-output" in listed
        assert "ISTIO" not in saved(ns, "iptables-nft-save")


# --- nothing of the node's ----------------------------------------------------------------------------


def test_an_add_opens_and_runs_nothing_outside_the_bundle(
    template: Path, api: KubeAPIServer, pki: Pki, netns: Callable[..., NetNS], tmp_path: Path, short_dir: Path
) -> None:
    # On this machine, whose own libraries, Python, iptables and NSS modules are all there to be
    # picked up by mistake (its nsswitch.conf names systemd for passwd and group).
    bin_dir = short_dir
    sc.install(template, bin_dir, str(bin_dir))
    bundle = str(bin_dir / sc.SUPPORT_DIR)
    kc = write_kubeconfig(tmp_path / "kc", api.url, ca_data=pki.ca_cert, token=TOKEN)
    ns = dual_stack_pod(netns)
    trace = tmp_path / "trace"
    env = {**plugin_env("ADD", ns.path, k8s_args(NS, "web"), path="/usr/sbin:/usr/bin:/sbin:/bin"),
           "LD_LIBRARY_PATH": "/usr/lib/x86_64-linux-gnu", "PYTHONPATH": "/usr/lib/python3/dist-packages"}  # fmt: skip
    p = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=openat,execve", "-o", str(trace), str(bin_dir / "istio-cni")],
        input=json.dumps(netconf(str(kc))), env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "-A OUTPUT -j ISTIO_OUTPUT" in saved(ns, "iptables-nft-save")
    executed, libraries, nss = [], [], []
    for line in trace.read_text().splitlines():
        if " = -1 " in line or "resumed>" in line:
            continue  # failed calls, and the second half of an interrupted one
        path = line.split('"')[1] if '"' in line else ""
        if "execve(" in line:
            executed.append(path)
        elif "openat(" in line and (".so" in Path(path).name):
            libraries.append(path)
        if "libnss_" in path:
            nss.append(path)
    outside = [e for e in executed if not e.startswith((bundle, str(bin_dir / "istio-cni")))]
    assert not outside, f"executed from outside the bundle: {outside}"
    foreign = [lib for lib in libraries if not lib.startswith(bundle)]
    assert not foreign, f"libraries from outside the bundle: {sorted(set(foreign))}"
    assert not nss, f"NSS modules loaded: {nss}"
    assert any(e.endswith("iptables-nft-restore") for e in executed), "the restores ran"


# --- upgrades -----------------------------------------------------------------------------------


def _other_version(template: Path, tmp_path: Path) -> Path:
    """A second template that differs in content (so in version) from ``template``."""
    other = tmp_path / "template-b"
    shutil.copytree(template, other, symlinks=True)
    (other / "share" / "NOTE").write_text("another build\n")
    (other / sc.TEMPLATE_MARK).unlink()
    (other / sc.TEMPLATE_MARK).write_text(sc._content_hash(other) + "\n")
    return other


def test_adds_running_while_the_installer_replaces_the_plugin_all_succeed(
    template: Path, api: KubeAPIServer, pki: Pki, netns: Callable[..., NetNS], tmp_path: Path, short_dir: Path
) -> None:
    from cni.install.loop import Installer
    from cni.install.settings import build_parser, parse_settings

    other = _other_version(template, tmp_path)
    node = short_dir
    (node / "net").mkdir(parents=True)
    (node / "bin").mkdir()
    (node / "sa").mkdir()
    (node / "sa" / "token").write_text(TOKEN)
    (node / "sa" / "ca.crt").write_bytes(pki.ca_cert.read_bytes())
    shutil.copy(ROOT / "tests" / "data" / "conflists" / "10-flannel.conflist", node / "net")
    env = {"CNI_NET_DIR": str(node / "net"), "CNI_BIN_DIR": str(node / "bin"), "SERVICE_ACCOUNT_DIR": str(node / "sa"),
           "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port)}  # fmt: skip

    def installer(t: Path) -> Installer:
        return Installer(parse_settings(build_parser().parse_args([]), {**env, "PLUGIN_TEMPLATE": str(t)}), b"", t)

    first = installer(template)
    first.reconcile()
    kc = write_kubeconfig(tmp_path / "kc", api.url, ca_data=pki.ca_cert, token=TOKEN)
    failures: list[str] = []
    done = threading.Event()
    runs = 0

    def adds() -> None:
        nonlocal runs
        while not done.is_set():
            ns = netns("up")
            p = subprocess.run([str(node / "bin" / "istio-cni")], input=json.dumps(netconf(str(kc), prev_result=prev_result("1.0.0"))),
                               env=plugin_env("ADD", ns.path, k8s_args(NS, "web-nft")), capture_output=True, text=True, timeout=60)  # fmt: skip
            runs += 1
            if p.returncode != 0:
                failures.append(p.stdout + p.stderr)

    workers = [threading.Thread(target=adds) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        time.sleep(1.0)
        second = installer(other)
        second.reconcile()  # the new version beside the old, then the launcher
        versions = sc.installed_versions(node / "bin")
        assert len(versions) == 2
        time.sleep(1.0)
        second._prune(node / "bin", sc.template_version(other), grace=0.5)  # old one goes once unused
        time.sleep(0.5)
    finally:
        done.set()
        for w in workers:
            w.join(timeout=120)
    assert not failures, failures[:2]
    assert runs >= 4
    second._prune(node / "bin", sc.template_version(other), grace=0.0)
    assert sc.installed_versions(node / "bin") == [sc.template_version(other)]
    assert f"/{sc.template_version(other)}/" in (node / "bin" / "istio-cni").read_text()
