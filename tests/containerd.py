"""A private containerd (Debian 12's 1.6, with its CRI plugin) for tests and the benchmark, set
up as ../shared/notes/containerd-cri.md describes: its own root, state, sockets, runc root,
cgroup parent and CNI bin and conf directories under one work directory, network namespaces
under its state directory, started with an almost empty environment (as systemd starts it, so
CNI plugins see what they see on a node), images imported from local OCI archives only.

``Containerd.stop()`` removes everything the daemon started, also after a failure: the sandboxes
(through the CRI, so every CNI DEL runs), then the daemon by its PID, then any shim serving its
socket and any runc container left in its runc root, the mounts under the work directory, its
cgroups, the bridges its networks created and libcni's cache entries for them."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cri import CRIClient, CRIError

ENV_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CNI_PLUGINS_DIR = Path("/usr/lib/cni")
# The CNI plugins a bridge network needs: loopback is always run by containerd itself.
CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap")
LIBCNI_RESULTS = Path("/var/lib/cni/results")
NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin uses
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


def unavailable_reason() -> str | None:
    """None when containerd's CRI can run here; otherwise what is missing."""
    for prog in ("containerd", "ctr", "containerd-shim-runc-v2", "runc"):
        if shutil.which(prog, path=ENV_PATH) is None:
            return f"{prog} is not installed (run scripts/setup: package containerd)"
    missing = [p for p in CNI_PLUGINS if not (CNI_PLUGINS_DIR / p).exists()]
    if missing:
        return f"CNI plugins {missing} missing from {CNI_PLUGINS_DIR} (package containernetworking-plugins)"
    if busybox() is None:
        return "no statically linked busybox (package busybox-static)"
    return None


def busybox() -> Path | None:
    for c in BUSYBOX_CANDIDATES:
        p = Path(c)
        if p.is_file():
            out = subprocess.run(["ldd", str(p)], capture_output=True, text=True, check=False)
            if out.returncode != 0 or "not a dynamic executable" in out.stdout + out.stderr:
                return p
    return None


# --- local images ----------------------------------------------------------------------------

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "istio-proxy:x:1337:1337::/tmp:/bin/sh\n"
    "app:x:1000:1000::/tmp:/bin/sh\n"
    "nobody:x:65534:65534::/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\nistio-proxy:x:1337:\napp:x:1000:\nnogroup:x:65534:\n"


def _busybox_layer() -> bytes:
    """One uncompressed layer: busybox-static with every applet linked, and the users the tests
    run as (root, app 1000, istio-proxy 1337)."""
    bb = busybox()
    if bb is None:
        raise RuntimeError("no statically linked busybox (package busybox-static)")
    applets = subprocess.run([str(bb), "--list"], capture_output=True, text=True, check=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, *, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644,
                link: str = "") -> None:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime, info.linkname = kind, mode, 0, link
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for d in ("bin", "etc", "proc", "sys", "dev", "run", "root", "usr", "usr/bin", "usr/sbin", "var"):
            add(d, kind=tarfile.DIRTYPE, mode=0o755)
        add("tmp", kind=tarfile.DIRTYPE, mode=0o1777)
        add("bin/busybox", data=bb.read_bytes(), mode=0o755)
        for a in sorted(set(applets) - {"busybox"}):
            add(f"bin/{a}", kind=tarfile.SYMTYPE, link="busybox")
        add("etc/passwd", data=PASSWD.encode())
        add("etc/group", data=GROUP.encode())
        add("etc/nsswitch.conf", data=b"hosts: files\n")
    return buf.getvalue()


def _arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


def write_busybox_archive(path: Path, images: Mapping[str, Mapping[str, Any]]) -> Path:
    """An OCI image archive (oci-layout, index.json, blobs) with one image per entry of
    ``images`` (name -> OCI config section: Entrypoint, Cmd, Env ...), all on one busybox layer;
    each manifest carries the ``io.containerd.image.name`` annotation that ``ctr images import``
    names it by."""
    layer = _busybox_layer()
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    blobs: dict[str, bytes] = {layer_digest: layer}
    manifests = []

    def blob(data: bytes) -> tuple[str, int]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return digest, len(data)

    for name, conf in images.items():
        config = {
            "architecture": _arch(),
            "os": "linux",
            "config": {"Env": [f"PATH={ENV_PATH}"], **conf},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            "history": [{"created_by": "tests/containerd.py: busybox-static"}],
        }
        cdigest, csize = blob(json.dumps(config, sort_keys=True).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest, "size": csize},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest,
                        "size": len(layer)}],
        }  # fmt: skip
        mdigest, msize = blob(json.dumps(manifest, sort_keys=True).encode())
        manifests.append({
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": msize,
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]},
            "platform": {"architecture": _arch(), "os": "linux"},
        })  # fmt: skip
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }
    with tarfile.open(path, "w") as tar:
        for name, data in [
            ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
            ("index.json", json.dumps(index).encode()),
        ] + [(f"blobs/sha256/{d.split(':', 1)[1]}", b) for d, b in blobs.items()]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return path


# --- the daemon ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Network:
    """A bridge network (bridge -> host-local, no masquerade: the tests talk pod to pod) in one
    of the daemon's CNI conf dirs; ``handler`` is the runtime handler that selects it ("" for the
    default)."""

    name: str
    bridge: str
    subnet: str  # e.g. 10.61.23
    conf_dir: Path
    handler: str = ""

    @property
    def conflist(self) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": self.name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(self.conf_dir.parent / "ipam"),
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "ranges": [[{"subnet": f"{self.subnet}.0/24", "gateway": f"{self.subnet}.1"}]],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    @property
    def conflist_path(self) -> Path:
        return self.conf_dir / f"10-{self.name}.conflist"

    def leases(self) -> list[str]:
        """The addresses host-local holds for this network."""
        d = self.conf_dir.parent / "ipam" / self.name
        return sorted(p.name for p in d.iterdir() if p.name[:1].isdigit()) if d.is_dir() else []

    def host_veths(self) -> list[str]:
        """The host ends of the veths attached to the bridge."""
        p = subprocess.run(["ip", "-o", "link", "show", "master", self.bridge], capture_output=True,
                           text=True, check=False)  # fmt: skip
        return [line.split(":")[1].strip().split("@")[0] for line in p.stdout.splitlines() if ":" in line]

    def cache_entries(self) -> list[Path]:
        """libcni's cached results of this network (/var/lib/cni/results/NET-ID-IFNAME)."""
        return sorted(LIBCNI_RESULTS.glob(f"{self.name}-*")) if LIBCNI_RESULTS.is_dir() else []


@dataclass
class Containerd:
    """One private containerd; ``start()`` then use ``cri``; ``stop()`` always."""

    work: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    handlers: Sequence[str] = ("nomesh",)
    proc: subprocess.Popen[bytes] | None = None
    cri: CRIClient | None = None
    networks: dict[str, Network] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)

    SANDBOX_IMAGE = "localhost/cri-test/pause:1"
    BUSYBOX_IMAGE = "localhost/cri-test/busybox:1"

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.root = self.work / "root"
        self.state = self.work / "state"
        self.socket = self.work / "containerd.sock"
        self.runc_root = self.work / "runc"
        self.bin_dir = self.work / "cni" / "bin"
        self.conf_dir = self.work / "cni" / "net.d"
        self.log = self.work / "containerd.log"
        self.cgroup_parent = f"/cri-test-{self.tag}"
        # Two free /24s for this run, chosen at random in 10.60-79.x, bridges named by the tag.
        self._subnets = iter(
            f"10.{60 + secrets.randbelow(20)}.{n}" for n in secrets.SystemRandom().sample(range(1, 255), 8)
        )

    # -- set-up --

    def _add_network(self, handler: str, conf_dir: Path) -> Network:
        suffix = handler or "pods"
        net = Network(
            f"cri-{self.tag}-{suffix}",
            f"cb{self.tag}{len(self.networks)}",
            next(self._subnets),
            conf_dir,
            handler,
        )
        conf_dir.mkdir(parents=True, exist_ok=True)
        net.conflist_path.write_text(json.dumps(net.conflist, indent=2) + "\n")
        self.networks[handler] = net
        return net

    @property
    def network(self) -> Network:
        """The default handler's network: the node's pod network, where install-cni chains."""
        return self.networks[""]

    def _config(self) -> str:
        cri = 'plugins."io.containerd.grpc.v1.cri"'

        def runtime(name: str, conf_dir: Path | None) -> str:
            cni = f'  cni_conf_dir = "{conf_dir}"\n  cni_max_conf_num = 1\n' if conf_dir else ""
            return (
                f"[{cri}.containerd.runtimes.{name}]\n"
                f'  runtime_type = "io.containerd.runc.v2"\n{cni}'
                f"[{cri}.containerd.runtimes.{name}.options]\n"
                f'  SystemdCgroup = false\n  Root = "{self.runc_root}"\n'
            )

        handlers = "".join(runtime(h, self.networks[h].conf_dir) for h in self.handlers)
        return f"""version = 2
root = "{self.root}"
state = "{self.state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{self.work / "opt"}"

[{cri}]
  sandbox_image = "{self.SANDBOX_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[{cri}.cni]
  bin_dir = "{self.bin_dir}"
  conf_dir = "{self.conf_dir}"
  max_conf_num = 1
[{cri}.containerd]
  default_runtime_name = "runc"
  snapshotter = "overlayfs"
{runtime("runc", None)}{handlers}"""

    def start(self, *, timeout: float = 60.0) -> Containerd:
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        for p in CNI_PLUGINS:
            (self.bin_dir / p).symlink_to(CNI_PLUGINS_DIR / p)
        self._add_network("", self.conf_dir)
        for h in self.handlers:
            self._add_network(h, self.work / "cni" / f"net.d-{h}")
        conf = self.work / "config.toml"
        conf.write_text(self._config())
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(conf)],
                env={"PATH": ENV_PATH},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.cri = CRIClient(self.socket)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.socket.exists():
                    self.cri.version()
                    conditions = {c.type: c.status for c in self.cri.status().status.conditions}
                    if conditions.get("RuntimeReady"):
                        return self
            except CRIError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd's CRI not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def ctr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(["ctr", "--address", str(self.socket), "--namespace", NAMESPACE, *args],
                           capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
        if p.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} exited {p.returncode}: {p.stderr.strip()}")
        return p

    def import_busybox_images(self) -> None:
        """The sandbox ("pause": sleeps until killed) and the busybox image the tests' containers
        run, built here from busybox-static."""
        archive = write_busybox_archive(
            self.work / "busybox-images.tar",
            {
                self.SANDBOX_IMAGE: {"Entrypoint": ["/bin/sleep"], "Cmd": ["2147483647"]},
                self.BUSYBOX_IMAGE: {"Cmd": ["/bin/sh"]},
            },
        )
        self.ctr("images", "import", str(archive))
        self.images += [self.SANDBOX_IMAGE, self.BUSYBOX_IMAGE]

    def import_podman_images(self, images: Sequence[str]) -> None:
        """Podman images (the project's own), saved together as one uncompressed docker-archive
        (their shared layers once, no gzip: faster than an OCI archive each) and imported with
        ``ctr images import``, which names them by the archive's tags."""
        archive = self.work / "podman-images.tar"
        p = subprocess.run(["podman", "save", "--multi-image-archive", "--format", "docker-archive",
                            "-o", str(archive), *images],
                           capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
        if p.returncode != 0:
            raise RuntimeError(f"podman save {' '.join(images)} failed: {p.stderr.strip()}")
        try:
            self.ctr("images", "import", str(archive))
        finally:
            archive.unlink(missing_ok=True)
        for image in images:
            if self.client.image_status(image).id == "":
                raise RuntimeError(f"{image} is not known to the CRI after the import")
        self.images.extend(images)

    @property
    def client(self) -> CRIClient:
        assert self.cri is not None, "containerd is not started"
        return self.cri

    def wait_cni_config(self, predicate: Any, *, timeout: float = 30.0) -> dict[str, Any]:
        """Waits until the CNI configuration containerd has loaded (it watches its conf dir)
        satisfies ``predicate(plugin_types)``, e.g. ``lambda t: "istio-cni" in t``."""
        deadline = time.monotonic() + timeout
        while True:
            conf = self.client.cni_config()
            types = plugin_types(conf)
            if predicate(types):
                return conf
            if time.monotonic() > deadline:
                raise TimeoutError(f"containerd's CNI configuration is still {types} after {timeout}s")
            time.sleep(0.05)

    # -- tear-down --

    def remove_all_sandboxes(self) -> list[str]:
        """Stops and removes every sandbox (each CNI DEL runs); the errors, if any."""
        errors: list[str] = []
        if self.cri is None or self.proc is None or self.proc.poll() is not None:
            return errors
        try:
            sandboxes = self.cri.list_pod_sandbox()
        except CRIError as e:
            return [str(e)]
        for sb in sandboxes:
            for step in (self.cri.stop_pod_sandbox, self.cri.remove_pod_sandbox):
                try:
                    step(sb.id)
                except CRIError as e:
                    errors.append(str(e))
        return errors

    def stop(self) -> list[str]:
        """Removes everything this daemon started; returns what could not be cleaned (never raises)."""
        problems = self.remove_all_sandboxes()
        if self.cri is not None:
            self.cri.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self._shims():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                problems.append(f"killed shim {pid}")
        if self.runc_root.is_dir():
            for ns_root in self.runc_root.iterdir():
                for cid in ns_root.iterdir() if ns_root.is_dir() else ():
                    subprocess.run(["runc", "--root", str(ns_root), "delete", "--force", cid.name],
                                   capture_output=True, check=False)  # fmt: skip
                    problems.append(f"deleted runc container {cid.name}")
        for mnt in self._mounts():
            subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
        self._remove_cgroups()
        for net in self.networks.values():
            subprocess.run(["ip", "link", "del", net.bridge], capture_output=True, check=False)
            for cached in net.cache_entries():
                cached.unlink(missing_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)
        return problems

    def _shims(self) -> list[int]:
        """PIDs of containerd shims serving this daemon's socket."""
        pids = []
        needle = str(self.socket).encode()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and needle in argv:
                pids.append(int(d.name))
        return pids

    def _mounts(self) -> list[str]:
        prefix = str(self.work) + "/"
        points = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                points.append(point)
        return sorted(points, key=len, reverse=True)

    def _remove_cgroups(self) -> None:
        base = Path("/sys/fs/cgroup")
        roots = [base / c / self.cgroup_parent.lstrip("/") for c in os.listdir(base)] if base.is_dir() else []
        roots.append(base / self.cgroup_parent.lstrip("/"))
        for root in roots:
            if not root.is_dir():
                continue
            for d in sorted(
                (p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
            ):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                root.rmdir()


def plugin_types(cniconfig: Mapping[str, Any]) -> list[str]:
    """The plugin types of the networks in containerd's loaded CNI configuration (verbose
    Status ``cniconfig``), in order, loopback first."""
    types: list[str] = []
    for net in cniconfig.get("Networks") or []:
        for plugin in (net.get("Config") or {}).get("Plugins") or []:
            types.append(str((plugin.get("Network") or {}).get("type", "")))
    return types


def run_argv(argv: Iterable[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
