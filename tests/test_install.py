"""``install-cni`` against temporary directories holding real-world CNI configurations: where the
entry goes, what else is kept, putting it back after another installer's rewrite, leaving a
malformed file alone, the kubeconfig and its refresh, the executable, the health endpoints,
settings from Istio's environment variables, and SIGTERM cleanup of a running process."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cni.install import conflist, files, health, loop
from cni.install.loop import Installer
from cni.install.settings import NotReady, Settings, SettingsError, build_parser, parse_settings

DATA = Path(__file__).parent / "data" / "conflists"
CONFLISTS = sorted(p.name for p in DATA.glob("*.conflist"))
CONFS = sorted(p.name for p in DATA.glob("*.conf"))
TOKEN = "token-one"
FAKE_ARCHIVE = b"#!/usr/bin/python3 -S\nnot a real archive\n"


# --- fixtures and shortcuts ---------------------------------------------------------------


@pytest.fixture
def node(tmp_path: Path) -> dict[str, Path]:
    """A node's directories: net dir, two bin dirs, and the mounted service account."""
    dirs = {k: tmp_path / k for k in ("net", "bin", "bin2", "sa")}
    for d in dirs.values():
        d.mkdir()
    (dirs["sa"] / "token").write_text(TOKEN + "\n")
    (dirs["sa"] / "ca.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    return dirs


def env_for(node: dict[str, Path], **extra: str) -> dict[str, str]:
    env = {
        "CNI_NET_DIR": str(node["net"]),
        "CNI_BIN_DIR": str(node["bin"]),
        "SERVICE_ACCOUNT_DIR": str(node["sa"]),
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "KUBERNETES_SERVICE_PORT": "443",
        "POD_NAMESPACE": "istio-system",
        # These tests install the zipapp (FAKE_ARCHIVE); the self-contained plugin has its own.
        "PLUGIN_INTERPRETER": "/usr/bin/python3 -S",
    }
    env.update(extra)
    return env


def settings_for(node: dict[str, Path], *flags: str, **extra: str) -> Settings:
    return parse_settings(build_parser().parse_args(list(flags)), env_for(node, **extra))


def installer_for(node: dict[str, Path], *flags: str, **extra: str) -> Installer:
    return Installer(settings_for(node, *flags, **extra), FAKE_ARCHIVE)


def put(node: dict[str, Path], name: str, content: bytes | None = None) -> Path:
    path = node["net"] / name
    path.write_bytes(DATA.joinpath(name).read_bytes() if content is None else content)
    return path


def load(path: Path) -> Any:
    return json.loads(path.read_bytes())


def ours(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in doc["plugins"] if p.get("type") == "istio-cni"]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def net_files(node: dict[str, Path]) -> list[str]:
    return sorted(p.name for p in node["net"].iterdir())


# --- where the entry goes and what it says ----------------------------------------------------


@pytest.mark.parametrize("name", CONFLISTS)
def test_entry_is_appended_and_everything_else_kept(node: dict[str, Path], name: str) -> None:
    path = put(node, name)
    before = load(path)
    inst = installer_for(node)
    inst.reconcile()

    after = load(path)
    assert list(after) == list(before), "top-level keys and their order are kept"
    assert {k: v for k, v in after.items() if k != "plugins"} == {
        k: v for k, v in before.items() if k != "plugins"
    }
    assert after["plugins"][:-1] == before["plugins"], "the other plugins are kept, in order"
    assert [list(p) for p in after["plugins"][:-1]] == [list(p) for p in before["plugins"]]
    entry = after["plugins"][-1]
    assert entry == inst.entry
    assert entry["type"] == "istio-cni"
    assert "cniVersion" not in entry and "name" not in entry, "the list's version and name apply"


@pytest.mark.parametrize("name", CONFLISTS + CONFS)
def test_cleanup_restores_the_original_bytes(node: dict[str, Path], name: str) -> None:
    put(node, name)
    original = snapshot(node["net"])
    inst = installer_for(node)
    inst.reconcile()
    assert snapshot(node["net"]) != original
    inst.cleanup()
    after = snapshot(node["net"])
    after.pop("ZZZ-istio-cni-kubeconfig")
    assert after == original


@pytest.mark.parametrize("name", CONFLISTS + CONFS)
def test_second_pass_changes_nothing(node: dict[str, Path], name: str) -> None:
    put(node, name)
    inst = installer_for(node)
    inst.reconcile()
    stats = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in node["net"].iterdir()}
    content = snapshot(node["net"])
    inst.reconcile()
    assert snapshot(node["net"]) == content
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in node["net"].iterdir()} == stats


def test_entry_content(node: dict[str, Path]) -> None:
    put(node, "10-calico.conflist")
    inst = installer_for(node, "--cni-net-dir", "/etc/cni/net.d", MOUNTED_CNI_NET_DIR=str(node["net"]))
    inst.reconcile()
    entry = ours(load(node["net"] / "10-calico.conflist"))[0]
    assert entry == {
        "type": "istio-cni",
        "log_level": "info",
        "pod_namespace": "istio-system",
        "kubernetes": {
            # Paths as the node sees them, not as the installer's container does.
            "kubeconfig": "/etc/cni/net.d/ZZZ-istio-cni-kubeconfig",
            "cni_bin_dir": str(node["bin"]),
            "exclude_namespaces": ["istio-system"],
        },
        # The node agent's socket for the plugin's ADD and DEL records (CNI_AGENT_RUN_DIR).
        "stats_socket": "/var/run/istio-cni/plugin-stats.sock",
    }


def test_plugin_accepts_the_entry(node: dict[str, Path]) -> None:
    from cni.plugin import PluginConf

    put(node, "10-flannel.conflist")
    inst = installer_for(node, PLUGIN_LOG_FILE="/var/log/istio-cni.log", LOG_LEVEL="debug")
    inst.reconcile()
    doc = load(node["net"] / "10-flannel.conflist")
    conf = PluginConf.parse({**ours(doc)[0], "cniVersion": doc["cniVersion"], "name": doc["name"]}, "0.3.1")
    assert conf.kubeconfig == str(node["net"] / "ZZZ-istio-cni-kubeconfig")
    assert conf.exclude_namespaces == frozenset({"istio-system"})
    assert conf.pod_namespace == "istio-system"
    assert conf.log_level == "debug"
    assert conf.log_file == "/var/log/istio-cni.log"


@pytest.mark.parametrize("how", ["env", "flag", "template"])
def test_native_nftables_is_written_into_the_entry(node: dict[str, Path], how: str) -> None:
    from cni.plugin import PluginConf

    put(node, "10-flannel.conflist")
    if how == "env":
        inst = installer_for(node, NATIVE_NFTABLES="true")
    elif how == "flag":
        inst = installer_for(node, "--native-nftables", "true")
    else:
        template = '{"type": "istio-cni", "kubernetes": {"kubeconfig": "__KUBECONFIG_FILEPATH__"}}'
        inst = installer_for(node, NATIVE_NFTABLES="true", CNI_NETWORK_CONFIG=template)
    inst.reconcile()
    doc = load(node["net"] / "10-flannel.conflist")
    entry = ours(doc)[0]
    assert entry["native_nftables"] is True
    conf = PluginConf.parse({**entry, "cniVersion": doc["cniVersion"], "name": doc["name"]}, "0.3.1")
    assert conf.native_nftables is True
    # Off (the default): the key is not written at all, so existing entries stay as they were.
    put(node, "10-flannel.conflist")
    installer_for(node, NATIVE_NFTABLES="false").reconcile()
    assert "native_nftables" not in ours(load(node["net"] / "10-flannel.conflist"))[0]


def test_conf_becomes_a_conflist(node: dict[str, Path]) -> None:
    original = put(node, "10-bridge.conf")
    conf = load(original)
    inst = installer_for(node)
    inst.reconcile()
    assert net_files(node) == ["10-bridge.conflist", "ZZZ-istio-cni-kubeconfig"], "the .conf is gone"
    doc = load(node["net"] / "10-bridge.conflist")
    assert doc["name"] == conf["name"] and doc["cniVersion"] == conf["cniVersion"]
    assert doc["plugins"] == [conf, inst.entry]
    assert list(doc["plugins"][0]) == list(conf), "the plugin keeps every key, in order"


def test_multus_conf_as_primary_is_converted(node: dict[str, Path]) -> None:
    put(node, "00-multus.conf")
    put(node, "10-flannel.conflist")
    installer_for(node).reconcile()
    doc = load(node["net"] / "00-multus.conflist")
    assert [p["type"] for p in doc["plugins"]] == ["multus-shim", "istio-cni"]
    assert "istio-cni" not in (node["net"] / "10-flannel.conflist").read_text()


def test_first_file_in_runtime_order_is_chosen(node: dict[str, Path]) -> None:
    for name in ("10-calico.conflist", "87-podman-bridge.conflist", "05-cilium.conflist"):
        put(node, name)
    put(node, "01-notes.txt", b"not a network")
    (node["net"] / "00-dir.conflist").mkdir()
    installer_for(node).reconcile()
    assert ours(load(node["net"] / "05-cilium.conflist"))
    assert not ours(load(node["net"] / "10-calico.conflist"))
    assert not ours(load(node["net"] / "87-podman-bridge.conflist"))


def test_named_configuration(node: dict[str, Path]) -> None:
    for name in ("05-cilium.conflist", "10-calico.conflist"):
        put(node, name)
    installer_for(node, CNI_CONF_NAME="10-calico.conflist").reconcile()
    assert ours(load(node["net"] / "10-calico.conflist"))
    assert not ours(load(node["net"] / "05-cilium.conflist"))


def test_named_conf_found_again_after_conversion(node: dict[str, Path]) -> None:
    put(node, "10-bridge.conf")
    inst = installer_for(node, "--cni-conf-name", "10-bridge.conf")
    inst.reconcile()
    inst.reconcile()
    assert net_files(node) == ["10-bridge.conflist", "ZZZ-istio-cni-kubeconfig"]
    inst.cleanup()
    assert (node["net"] / "10-bridge.conf").read_bytes() == DATA.joinpath("10-bridge.conf").read_bytes()


def test_waits_for_a_network_configuration(node: dict[str, Path]) -> None:
    inst = installer_for(node)
    with pytest.raises(NotReady, match="waiting for a CNI network configuration"):
        inst.reconcile()
    put(node, "10-flannel.conflist")
    inst.reconcile()
    assert ours(load(node["net"] / "10-flannel.conflist"))


def test_never_duplicates_the_entry(node: dict[str, Path]) -> None:
    doc = json.loads(DATA.joinpath("10-calico.conflist").read_bytes())
    stale = {"type": "istio-cni", "log_level": "debug", "kubernetes": {"kubeconfig": "/old"}}
    doc["plugins"] = [doc["plugins"][0], stale, doc["plugins"][1], dict(stale), doc["plugins"][2]]
    path = put(node, "10-calico.conflist", json.dumps(doc).encode())
    inst = installer_for(node)
    inst.reconcile()
    after = load(path)
    assert [p["type"] for p in after["plugins"]] == ["calico", "istio-cni", "portmap", "bandwidth"]
    assert ours(after) == [inst.entry], "a stale entry is replaced where it stands"
    inst.cleanup()
    # We cannot know what the file was before the stale entry: the entry goes, the rest stays.
    assert [p["type"] for p in load(path)["plugins"]] == ["calico", "portmap", "bandwidth"]


def test_entry_from_a_previous_run_is_kept_then_removed(node: dict[str, Path]) -> None:
    path = put(node, "10-flannel.conflist")
    first = installer_for(node)
    first.reconcile()
    installed = path.read_bytes()
    second = installer_for(node)  # a restarted installer: no memory of the original bytes
    second.reconcile()
    assert path.read_bytes() == installed
    second.cleanup()
    assert load(path) == load(DATA / "10-flannel.conflist")


# --- another installer, a malformed file ------------------------------------------------------


def test_rewrite_by_the_primary_installer_is_repaired(node: dict[str, Path]) -> None:
    path = put(node, "10-calico.conflist")
    inst = installer_for(node)
    inst.step()
    assert inst.status.ready
    # Calico's installer writes its file again, with a new MTU and without our entry.
    rewritten = DATA.joinpath("10-calico.conflist").read_bytes().replace(b'"mtu": 0', b'"mtu": 1440')
    path.write_bytes(rewritten)
    inst.step()
    assert inst.status.ready
    doc = load(path)
    assert len(ours(doc)) == 1 and doc["plugins"][0]["mtu"] == 1440
    inst.cleanup()
    assert path.read_bytes() == rewritten, "restored as the primary plugin last wrote it"


def test_rewrite_that_keeps_our_entry_is_respected(node: dict[str, Path]) -> None:
    path = put(node, "10-flannel.conflist")
    inst = installer_for(node)
    inst.reconcile()
    doc = load(path)
    doc["plugins"][1]["snat"] = True
    path.write_text(json.dumps(doc, indent=4))
    inst.reconcile()
    assert load(path) == doc
    inst.cleanup()
    after = load(path)
    assert not ours(after) and after["plugins"][1]["snat"] is True


def test_primary_rewrites_its_conf_after_conversion(node: dict[str, Path]) -> None:
    put(node, "10-bridge.conf")
    inst = installer_for(node)
    inst.reconcile()
    newer = DATA.joinpath("10-bridge.conf").read_bytes().replace(b"10.22.0.0/16", b"10.23.0.0/16")
    put(node, "10-bridge.conf", newer)  # sorts before our .conflist: it would win
    inst.reconcile()
    assert net_files(node) == ["10-bridge.conflist", "ZZZ-istio-cni-kubeconfig"]
    assert "10.23.0.0/16" in (node["net"] / "10-bridge.conflist").read_text()
    inst.cleanup()
    assert net_files(node) == ["10-bridge.conf", "ZZZ-istio-cni-kubeconfig"]
    assert (node["net"] / "10-bridge.conf").read_bytes() == newer


def test_entry_follows_a_new_first_file(node: dict[str, Path]) -> None:
    put(node, "87-podman-bridge.conflist")
    inst = installer_for(node)
    inst.reconcile()
    put(node, "10-flannel.conflist")  # a new primary network arrives and sorts first
    inst.reconcile()
    assert ours(load(node["net"] / "10-flannel.conflist"))
    podman = node["net"] / "87-podman-bridge.conflist"
    assert podman.read_bytes() == DATA.joinpath("87-podman-bridge.conflist").read_bytes()
    inst.cleanup()
    assert snapshot(node["net"]) == {
        **{n: DATA.joinpath(n).read_bytes() for n in ("10-flannel.conflist", "87-podman-bridge.conflist")},
        "ZZZ-istio-cni-kubeconfig": (node["net"] / "ZZZ-istio-cni-kubeconfig").read_bytes(),
    }


MALFORMED = [
    pytest.param(
        b'{"cniVersion": "0.3.1", "name": "k8s-pod-network", "plugins": [{"type": "cal', id="truncated"
    ),
    pytest.param(b'{"cniVersion": "0.3.1", "name": "x", "plugins": {}}', id="plugins-not-a-list"),
    pytest.param(b'{"cniVersion": "0.3.1", "name": "x", "plugins": [{"mtu": 1}]}', id="plugin-without-type"),
    pytest.param(b"[1, 2]", id="not-an-object"),
]


@pytest.mark.parametrize("content", MALFORMED)
def test_malformed_conflist_is_left_alone(
    node: dict[str, Path], content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = put(node, "10-calico.conflist", content)
    inst = installer_for(node)
    with caplog.at_level(logging.ERROR, logger="install-cni"):
        inst.step()
    assert path.read_bytes() == content
    assert not inst.status.ready
    assert str(path) in inst.status.detail and "left unchanged" in inst.status.detail
    assert [r.getMessage() for r in caplog.records] == [inst.status.detail.removeprefix("not ready: ")]
    with caplog.at_level(logging.ERROR, logger="install-cni"):
        inst.step()
    assert len(caplog.records) == 1, "the same error is logged once, not on every pass"
    # Fixed by its owner: the entry goes in.
    path.write_bytes(DATA.joinpath("10-calico.conflist").read_bytes())
    inst.step()
    assert inst.status.ready and ours(load(path))


def test_conf_holding_a_list_is_malformed(node: dict[str, Path]) -> None:
    content = DATA.joinpath("10-flannel.conflist").read_bytes()
    path = put(node, "10-flannel.conf", content)
    inst = installer_for(node)
    inst.step()
    assert not inst.status.ready and "needs a 'type'" in inst.status.detail
    assert path.read_bytes() == content


def test_file_changed_while_updating_is_not_overwritten(node: dict[str, Path]) -> None:
    path = put(node, "10-flannel.conflist")
    theirs = DATA.joinpath("10-flannel.conflist").read_bytes().replace(b"cbr0", b"cbr1")
    real_read = files.read_or_none

    def racing_read(p: Path) -> bytes | None:
        if p == path:  # the other installer writes between our read and our rename
            path.write_bytes(theirs)
        return real_read(p)

    inst = installer_for(node)
    files.read_or_none = racing_read
    try:
        inst.step()
    finally:
        files.read_or_none = real_read
    assert path.read_bytes() == theirs
    assert not inst.status.ready and "changed while" in inst.status.detail
    assert not list(node["net"].glob(".*.tmp")), "no temporary file is left behind"
    inst.step()
    assert inst.status.ready and load(path)["name"] == "cbr1" and ours(load(path))


# --- a symlinked configuration ----------------------------------------------------------------


LINKS = {
    # link name in the net dir -> (where the real file lives, what the link says)
    "relative-same-dir": ("net/flannel.real", "flannel.real"),
    "absolute-same-dir": ("net/flannel.real", "ABS"),
    "relative-other-dir": ("owner/10-flannel.conflist", "../owner/10-flannel.conflist"),
    "absolute-other-dir": ("owner/10-flannel.conflist", "ABS"),
}


def linked(node: dict[str, Path], how: str) -> tuple[Path, Path, str]:
    """10-flannel.conflist as a symlink to a file its owner keeps (and updates) elsewhere; the
    real file's name has no CNI extension, so the runtime loads it only through the link."""
    where, says = LINKS[how]
    real = node["net"].parent / where
    real.parent.mkdir(exist_ok=True)
    real.write_bytes(DATA.joinpath("10-flannel.conflist").read_bytes())
    link = node["net"] / "10-flannel.conflist"
    target = str(real) if says == "ABS" else says
    link.symlink_to(target)
    return link, real, target


def no_temporary_files(*dirs: Path) -> bool:
    return not any(list(d.glob(".*.tmp")) for d in dirs)


@pytest.mark.parametrize("how", LINKS)
def test_a_symlinked_conflist_is_written_through(
    node: dict[str, Path], how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    link, real, target = linked(node, how)
    original = real.read_bytes()
    renames: list[tuple[str, str]] = []
    real_rename = os.rename

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        renames.append((str(src), str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(files.os, "rename", rename)
    inst = installer_for(node)
    inst.reconcile()
    assert link.is_symlink() and os.readlink(link) == target, "the link stays"
    assert ours(load(real)) == [inst.entry], "the file it leads to has the entry"
    conf_renames = [(src, dst) for src, dst in renames if dst == str(real)]
    assert conf_renames and all(Path(src).parent == real.parent for src, _ in conf_renames), (
        "written beside the real file and renamed over it"
    )
    assert no_temporary_files(node["net"], real.parent)
    inst.reconcile()  # nothing to do: still a link
    assert link.is_symlink() and os.readlink(link) == target

    inst.cleanup()
    assert link.is_symlink() and os.readlink(link) == target, "the link stays"
    assert real.read_bytes() == original, "byte for byte as its owner wrote it"
    assert no_temporary_files(node["net"], real.parent)


@pytest.mark.parametrize("how", ["relative-same-dir", "relative-other-dir"])
def test_the_link_owners_update_is_left_alone_on_removal(node: dict[str, Path], how: str) -> None:
    link, real, target = linked(node, how)
    inst = installer_for(node)
    inst.reconcile()
    # Its owner writes the file again (in place, through its own path), without our entry.
    theirs = DATA.joinpath("10-flannel.conflist").read_bytes().replace(b"cbr0", b"cbr9")
    real.write_bytes(theirs)
    inst.cleanup()
    assert real.read_bytes() == theirs
    assert link.is_symlink() and os.readlink(link) == target


def test_the_link_owners_update_keeping_our_entry_loses_only_the_entry(node: dict[str, Path]) -> None:
    link, real, target = linked(node, "relative-other-dir")
    inst = installer_for(node)
    inst.reconcile()
    doc = load(real)
    doc["plugins"][0]["name"] = "cbr9"
    real.write_text(json.dumps(doc))
    inst.cleanup()
    after = load(real)
    assert not ours(after) and after["plugins"][0]["name"] == "cbr9"
    assert link.is_symlink() and os.readlink(link) == target


@pytest.mark.parametrize("how", [None, "relative-other-dir"])
def test_a_change_while_restoring_is_not_overwritten(
    node: dict[str, Path], how: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if how is None:
        real = link = put(node, "10-flannel.conflist")
    else:
        link, real, _ = linked(node, how)
    inst = installer_for(node)
    inst.reconcile()
    theirs = DATA.joinpath("10-flannel.conflist").read_bytes().replace(b"cbr0", b"cbr9")
    real_file_mode = conflist.file_mode

    def racing_file_mode(p: Path, default: int = 0o644) -> int:
        # The owner writes between our check of the file and our rename over it.
        if p == link and real.read_bytes() != theirs:
            real.write_bytes(theirs)
        return real_file_mode(p, default)

    monkeypatch.setattr(conflist, "file_mode", racing_file_mode)
    inst.cleanup()
    assert real.read_bytes() == theirs, "the owner's update is kept"
    assert link.is_symlink() == (how is not None)
    assert no_temporary_files(node["net"], real.parent)


# --- Multus mode ------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [("--multus",), ("--standalone",)])
def test_multus_mode_writes_a_standalone_network(node: dict[str, Path], flags: tuple[str, ...]) -> None:
    put(node, "10-flannel.conflist")
    inst = installer_for(node, *flags)
    inst.reconcile()
    assert not ours(load(node["net"] / "10-flannel.conflist")), "nothing is chained"
    doc = load(node["net"] / "YYY-istio-cni.conflist")
    assert doc == {"cniVersion": "0.3.1", "name": "istio-cni", "plugins": [inst.entry]}
    inst.cleanup()
    assert net_files(node) == ["10-flannel.conflist", "ZZZ-istio-cni-kubeconfig"]


def test_multus_mode_by_environment_with_a_conf_name(node: dict[str, Path]) -> None:
    inst = installer_for(node, CHAINED_CNI_PLUGIN="false", CNI_CONF_NAME="istio-cni.conf")
    inst.reconcile()
    doc = load(node["net"] / "istio-cni.conf")
    assert doc["type"] == "istio-cni" and doc["name"] == "istio-cni" and doc["cniVersion"] == "0.3.1"
    (node["net"] / "istio-cni.conf").unlink()  # removed behind our back: written again
    inst.reconcile()
    assert load(node["net"] / "istio-cni.conf") == doc


# --- kubeconfig and executable --------------------------------------------------------------


def test_kubeconfig_is_written_for_the_plugin_and_refreshed(node: dict[str, Path]) -> None:
    from cni.kube import load_kubeconfig

    put(node, "10-flannel.conflist")
    inst = installer_for(node, KUBERNETES_SERVICE_HOST="fd00:10:96::1", KUBERNETES_SERVICE_PORT="6443")
    inst.reconcile()
    path = node["net"] / "ZZZ-istio-cni-kubeconfig"
    assert path.stat().st_mode & 0o777 == 0o600
    kc = load_kubeconfig(str(path))  # as the plugin reads it (stdlib only: JSON)
    assert kc.server == "https://[fd00:10:96::1]:6443"
    assert kc.token == TOKEN
    assert kc.ca_data == (node["sa"] / "ca.crt").read_bytes()
    # The projected token rotates.
    (node["sa"] / "token").write_text("token-two")
    inst.reconcile()
    assert load_kubeconfig(str(path)).token == "token-two"
    path.chmod(0o644)
    inst.reconcile()
    assert path.stat().st_mode & 0o777 == 0o600


def test_no_token_means_not_ready_and_no_entry(node: dict[str, Path]) -> None:
    path = put(node, "10-flannel.conflist")
    (node["sa"] / "token").unlink()
    inst = installer_for(node)
    inst.step()
    assert not inst.status.ready and "service account token" in inst.status.detail
    assert path.read_bytes() == DATA.joinpath("10-flannel.conflist").read_bytes()


def test_executable_in_every_bin_dir_and_repaired(node: dict[str, Path]) -> None:
    put(node, "10-flannel.conflist")
    inst = installer_for(
        node, "--mounted-cni-bin-dir", str(node["bin"]), "--mounted-cni-bin-dir", str(node["bin2"])
    )
    inst.reconcile()
    for d in ("bin", "bin2"):
        exe = node[d] / "istio-cni"
        assert exe.read_bytes() == FAKE_ARCHIVE and exe.stat().st_mode & 0o777 == 0o755
    (node["bin2"] / "istio-cni").write_bytes(b"clobbered")
    inst.reconcile()
    assert (node["bin2"] / "istio-cni").read_bytes() == FAKE_ARCHIVE
    assert not list(node["bin"].glob(".*")) and not list(node["bin2"].glob(".*"))


def test_missing_bin_dir_means_no_entry(node: dict[str, Path]) -> None:
    path = put(node, "10-flannel.conflist")
    inst = installer_for(node, MOUNTED_CNI_BIN_DIRS=str(node["bin"] / "missing"))
    inst.step()
    assert not inst.status.ready and "cannot write the plugin executable" in inst.status.detail
    assert not ours(load(path)), "no entry may point at a plugin that is not there"


def test_cleanup_files(node: dict[str, Path]) -> None:
    put(node, "10-flannel.conflist")
    inst = installer_for(node, "--cleanup-files")
    inst.reconcile()
    inst.cleanup()
    assert net_files(node) == ["10-flannel.conflist"] and not (node["bin"] / "istio-cni").exists()


def test_uninstall_without_state(node: dict[str, Path]) -> None:
    put(node, "10-calico.conflist")
    put(node, "10-bridge.conf")
    installer_for(node).reconcile()
    installer_for(node, "--multus").reconcile()
    loop.uninstall(settings_for(node, "--uninstall"))
    assert net_files(node) == ["10-bridge.conflist", "10-calico.conflist"]
    assert not ours(load(node["net"] / "10-bridge.conflist"))
    assert load(node["net"] / "10-calico.conflist") == load(DATA / "10-calico.conflist")
    assert not (node["bin"] / "istio-cni").exists()


def test_real_executable_answers_version(node: dict[str, Path]) -> None:
    from cni.bundle import build_archive

    put(node, "10-flannel.conflist")
    archive = build_archive(f"{sys.executable} -S")
    inst = Installer(settings_for(node), archive)
    inst.reconcile()
    exe = node["bin"] / "istio-cni"
    assert exe.read_bytes().startswith(f"#!{sys.executable} -S\n".encode())
    p = subprocess.run(
        [str(exe)], env={"CNI_COMMAND": "VERSION"}, capture_output=True, timeout=60, check=False
    )
    assert p.returncode == 0, p.stderr
    assert "1.0.0" in json.loads(p.stdout)["supportedVersions"]


# --- settings -------------------------------------------------------------------------------


def test_istio_environment_variables(node: dict[str, Path], tmp_path: Path) -> None:
    s = settings_for(
        node,
        CNI_NET_DIR="/etc/cni/net.d",
        MOUNTED_CNI_NET_DIR="/host/etc/cni/net.d",
        CNI_BIN_DIR="/opt/cni/bin",
        MOUNTED_CNI_BIN_DIRS="/host/opt/cni/bin, /host/secondary-bin-dir",
        CNI_CONF_NAME="10-calico.conflist",
        CHAINED_CNI_PLUGIN="false",
        KUBECONFIG_FILENAME="istio-kc",
        KUBECONFIG_MODE="0640",
        KUBERNETES_SERVICE_PROTOCOL="https",
        KUBERNETES_NODE_NAME="worker-7",
        EXCLUDED_NAMESPACES="istio-system,kube-system",
        LOG_LEVEL="warning",
        HEALTH_PORT="9000",
        POLL_INTERVAL="0.5",
        PLUGIN_INTERPRETER="/usr/local/bin/python3.12 -S",
    )
    assert s.net_dir == Path("/host/etc/cni/net.d") and s.host_net_dir == "/etc/cni/net.d"
    assert s.bin_dirs == (Path("/host/opt/cni/bin"), Path("/host/secondary-bin-dir"))
    assert s.host_bin_dir == "/opt/cni/bin"
    # Each bin dir as the node sees it: CNI_BIN_DIR for the first, the rest without /host.
    assert s.host_bin_dirs == ("/opt/cni/bin", "/secondary-bin-dir")
    assert s.conf_name == "10-calico.conflist" and not s.chained
    assert s.kubeconfig_path == Path("/host/etc/cni/net.d/istio-kc")
    assert s.host_kubeconfig_path == "/etc/cni/net.d/istio-kc"
    assert s.kubeconfig_mode == 0o640
    assert s.server == "https://10.96.0.1:443" and s.node_name == "worker-7"
    assert s.exclude_namespaces == ("istio-system", "kube-system")
    assert s.log_level == "warn" and s.health_port == 9000 and s.poll_interval == 0.5
    assert s.interpreter == "/usr/local/bin/python3.12 -S"
    assert s.token_file == node["sa"] / "token" and s.ca_file == node["sa"] / "ca.crt"


def test_defaults(node: dict[str, Path]) -> None:
    s = parse_settings(
        build_parser().parse_args([]),
        {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"},
    )
    assert s.net_dir == Path("/etc/cni/net.d") and s.bin_dirs == (Path("/opt/cni/bin"),)
    assert s.chained and s.conf_name == ""
    # The self-contained plugin, from where the installer image has it.
    assert s.interpreter == "" and s.plugin_template == Path("/opt/istio-cni/plugin")
    assert s.host_bin_dirs == ("/opt/cni/bin",)
    assert s.exclude_namespaces == ("istio-system",) and s.kubeconfig_mode == 0o600
    assert s.token_file == Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    assert s.health_port == 8000 and not s.cleanup_files


def test_flags_win_over_environment(node: dict[str, Path]) -> None:
    s = settings_for(
        node, "--chained", "--log-level", "debug", "--pod-namespace", "mesh", CHAINED_CNI_PLUGIN="false"
    )
    assert s.chained and s.log_level == "debug"
    assert s.exclude_namespaces == ("mesh",), "the installer's own namespace by default"


def test_entry_template(node: dict[str, Path]) -> None:
    template = json.dumps(
        {
            "cniVersion": "0.3.1",
            "name": "istio-cni",
            "type": "istio-cni",
            "log_level": "__LOG_LEVEL__",
            "kubernetes": {"kubeconfig": "__KUBECONFIG_FILEPATH__", "node": "__KUBERNETES_NODE_NAME__"},
        }
    )
    put(node, "10-flannel.conflist")
    inst = installer_for(node, CNI_NETWORK_CONFIG=template, NODE_NAME="n1", LOG_LEVEL="error")
    inst.reconcile()
    assert ours(load(node["net"] / "10-flannel.conflist")) == [
        {
            "type": "istio-cni",
            "log_level": "error",
            "kubernetes": {"kubeconfig": str(node["net"] / "ZZZ-istio-cni-kubeconfig"), "node": "n1"},
            "stats_socket": "/var/run/istio-cni/plugin-stats.sock",
        }
    ]


BAD_SETTINGS = [
    ({"CHAINED_CNI_PLUGIN": "maybe"}, "CHAINED_CNI_PLUGIN"),
    ({"KUBECONFIG_MODE": "rw"}, "KUBECONFIG_MODE"),
    ({"KUBECONFIG_FILENAME": "kc.conf"}, "KUBECONFIG_FILENAME"),
    ({"CNI_CONF_NAME": "../x.conflist"}, "CNI_CONF_NAME"),
    ({"CNI_CONF_NAME": "calico"}, "CNI_CONF_NAME"),
    ({"HEALTH_PORT": "70000"}, "HEALTH_PORT"),
    ({"POLL_INTERVAL": "0"}, "POLL_INTERVAL"),
    ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
    ({"SKIP_TLS_VERIFY": "true"}, "SKIP_TLS_VERIFY"),
    ({"KUBERNETES_SERVICE_HOST": ""}, "KUBERNETES_SERVICE_HOST"),
    ({"KUBERNETES_SERVICE_PROTOCOL": "http"}, "KUBERNETES_SERVICE_PROTOCOL"),
    ({"KUBERNETES_SERVICE_PORT": "https"}, "KUBERNETES_SERVICE_PORT"),
    ({"CNI_NETWORK_CONFIG": "{"}, "CNI_NETWORK_CONFIG"),
    ({"CNI_NETWORK_CONFIG": '{"type": "bridge"}'}, "CNI_NETWORK_CONFIG"),
    ({"CNI_NET_DIR": "relative/dir"}, "CNI_NET_DIR"),
    ({"PLUGIN_INTERPRETER": "python3 -S"}, "PLUGIN_INTERPRETER"),
]


@pytest.mark.parametrize(("env", "named"), BAD_SETTINGS)
def test_bad_settings_name_the_variable(node: dict[str, Path], env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        settings_for(node, **env)


def test_bad_flag_names_the_flag(node: dict[str, Path]) -> None:
    with pytest.raises(SettingsError, match="--health-port"):
        settings_for(node, "--health-port", "x")


LONG = "1" * 5000  # more digits than int() converts


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HEALTH_PORT": LONG}, r"HEALTH_PORT: '1{60}'\.\.\. \(5000 characters\) is not a port number"),
        ({"KUBERNETES_SERVICE_PORT": LONG}, "KUBERNETES_SERVICE_PORT: '1111.* is not a port number"),
        ({"KUBECONFIG_MODE": LONG}, "KUBECONFIG_MODE: '1111.* is not an octal file mode"),
        ({"POLL_INTERVAL": LONG}, "POLL_INTERVAL: '1111.* is not a number of seconds"),
        # int() takes these; the kubeconfig's URL (and Go's) would not.
        (
            {"KUBERNETES_SERVICE_PORT": "\u0664\u0664\u0663"},
            "KUBERNETES_SERVICE_PORT: '٤٤٣' is not a port number",
        ),
        ({"KUBERNETES_SERVICE_PORT": "4_43"}, "KUBERNETES_SERVICE_PORT: '4_43' is not a port number"),
        ({"HEALTH_PORT": "+80"}, "HEALTH_PORT: '\\+80' is not a port number"),
        ({"KUBECONFIG_MODE": "6_00"}, "KUBECONFIG_MODE: '6_00' is not an octal file mode"),
    ],
)
def test_numbers_in_settings_are_plain_digits(
    node: dict[str, Path], env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message) as info:
        settings_for(node, **env)
    assert len(str(info.value)) < 200


def test_numbers_in_settings_may_have_leading_zeros_and_blanks(node: dict[str, Path]) -> None:
    s = settings_for(
        node, HEALTH_PORT="0" * 5000 + "8080", KUBECONFIG_MODE=" 0600 ", KUBERNETES_SERVICE_PORT=" 06443"
    )
    assert (s.health_port, s.kubeconfig_mode) == (8080, 0o600)
    assert s.server == "https://10.96.0.1:6443"


# --- health endpoints -----------------------------------------------------------------------


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_health_endpoints(node: dict[str, Path]) -> None:
    path = put(node, "10-flannel.conflist", b"{")
    inst = installer_for(node)
    server = health.serve_health(inst.status, "127.0.0.1", 0, stale_after=60)
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        inst.step()
        code, body = get(base + "/readyz")
        assert code == 503 and str(path) in body and "not valid JSON" in body
        code, body = get(base + "/healthz")
        assert code == 200 and body.startswith("alive; not ready:")
        path.write_bytes(DATA.joinpath("10-flannel.conflist").read_bytes())
        inst.step()
        code, body = get(base + "/readyz")
        assert code == 200 and f"istio-cni entry in place in {path}" in body
        assert get(base + "/healthz")[0] == 200
        inst.status.heartbeat -= 3600  # the watch loop stopped
        code, body = get(base + "/healthz")
        assert code == 503 and body.startswith("stuck")
        assert get(base + "/other")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


# --- the process: SIGTERM -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, cond: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(
                f"install-cni exited ({proc.returncode}) waiting for {what}: {proc.stderr.read()}"
            )  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def start(
    node: dict[str, Path], venv_bin: Path
) -> Iterator[Callable[..., tuple[subprocess.Popen[str], str]]]:
    procs: list[subprocess.Popen[str]] = []

    def run(*flags: str, **extra: str) -> tuple[subprocess.Popen[str], str]:
        port = free_port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            **env_for(node, HEALTH_ADDRESS="127.0.0.1", HEALTH_PORT=str(port), POLL_INTERVAL="0.05"),
            **extra,
        }
        proc = subprocess.Popen(
            [str(venv_bin / "install-cni"), *flags],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        return proc, f"http://127.0.0.1:{port}"

    yield run
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def ready(base: str) -> bool:
    try:
        return get(base + "/readyz")[0] == 200
    except OSError:
        return False


@pytest.mark.parametrize("name", ["10-calico.conflist", "10-bridge.conf", "05-cilium.conflist"])
def test_sigterm_restores_the_configuration(node: dict[str, Path], start: Any, name: str) -> None:
    put(node, name)
    put(node, "87-podman-bridge.conflist")
    original = snapshot(node["net"])
    proc, base = start()
    wait_for("readiness", lambda: ready(base), proc)
    assert snapshot(node["net"]) != original
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    after = snapshot(node["net"])
    assert after.pop("ZZZ-istio-cni-kubeconfig")
    assert after == original, "byte for byte as the primary plugin wrote it"
    assert (node["bin"] / "istio-cni").exists(), "the executable stays unless --cleanup-files"
    assert "received SIGTERM" in stderr


def test_running_installer_repairs_a_rewrite_then_cleans_up(node: dict[str, Path], start: Any) -> None:
    path = put(node, "10-flannel.conflist")
    proc, base = start("--cleanup-files")
    wait_for("the entry", lambda: ready(base), proc)
    # Flannel's installer rewrites its configuration (compact JSON, no istio-cni entry).
    rewritten = json.dumps(load(DATA / "10-flannel.conflist"), separators=(",", ":")).encode()
    path.write_bytes(rewritten)
    wait_for("the entry to come back", lambda: b"istio-cni" in path.read_bytes() and ready(base), proc)
    assert len(ours(load(path))) == 1
    # Then someone breaks it: left alone, not ready.
    path.write_bytes(b'{"name": "cbr0", "plugins": [')
    wait_for("not ready", lambda: not ready(base), proc)
    assert "not valid JSON" in get(base + "/readyz")[1]
    assert path.read_bytes() == b'{"name": "cbr0", "plugins": ['
    path.write_bytes(rewritten)
    wait_for("ready again", lambda: ready(base), proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert path.read_bytes() == rewritten
    assert net_files(node) == ["10-flannel.conflist"]
    assert not (node["bin"] / "istio-cni").exists()
    assert "not valid JSON" in stderr


def test_bad_setting_exits_2(node: dict[str, Path], venv_bin: Path) -> None:
    p = subprocess.run(
        [str(venv_bin / "install-cni")],
        env={**env_for(node), "CHAINED_CNI_PLUGIN": "perhaps"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 2 and "CHAINED_CNI_PLUGIN" in p.stderr


def test_check_command(node: dict[str, Path], start: Any) -> None:
    put(node, "10-flannel.conflist")
    proc, base = start()
    wait_for("readiness", lambda: ready(base), proc)
    port = base.rsplit(":", 1)[1]
    env = {**env_for(node), "HEALTH_ADDRESS": "127.0.0.1", "HEALTH_PORT": port}
    p = subprocess.run(
        [sys.executable, "-m", "cni.install", "--check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0 and "istio-cni entry in place" in p.stdout
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    p = subprocess.run(
        [sys.executable, "-m", "cni.install", "--check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 1 and "no answer" in p.stdout


def test_uninstall_from_the_plugin_file_on_the_node(node: dict[str, Path]) -> None:
    """The recovery one-liner of docs/installing.md: the installer inside the plugin file, on the node's Python."""
    from cni.bundle import build_archive

    put(node, "10-bridge.conf")
    Installer(settings_for(node), build_archive(f"{sys.executable} -S")).reconcile()
    exe = node["bin"] / "istio-cni"
    code = (
        f"import sys; sys.path.insert(0, {str(exe)!r}); from cni.install import main; "
        f"sys.exit(main(['--uninstall', '--cni-net-dir', {str(node['net'])!r}, '--cni-bin-dir', {str(node['bin'])!r}]))"
    )
    p = subprocess.run(
        [sys.executable, "-S", "-c", code], env={}, capture_output=True, text=True, timeout=60, check=False
    )
    assert p.returncode == 0, p.stderr
    assert net_files(node) == ["10-bridge.conflist"]
    assert not ours(load(node["net"] / "10-bridge.conflist"))
    assert not exe.exists()


def test_preempted_named_configuration_is_logged_once(
    node: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    put(node, "10-calico.conflist")
    put(node, "05-cilium.conflist")
    inst = installer_for(node, CNI_CONF_NAME="10-calico.conflist")
    with caplog.at_level(logging.WARNING, logger="install-cni"):
        inst.step()
        inst.step()
    assert inst.status.ready and ours(load(node["net"] / "10-calico.conflist"))
    assert [r.getMessage() for r in caplog.records] == [
        f"{node['net'] / '10-calico.conflist'} is preempted by {node['net'] / '05-cilium.conflist'}: "
        "the runtime loads that one first"
    ]


def test_health_server_answers_on_ipv4_and_ipv6() -> None:
    status = health.Status(ready=True, detail="in place")
    server = health.serve_health(status, "", 0, stale_after=60)
    try:
        port = server.server_port
        assert get(f"http://127.0.0.1:{port}/readyz") == (200, "in place\n")
        if socket.has_ipv6 and server.address_family == socket.AF_INET6:
            assert get(f"http://[::1]:{port}/readyz") == (200, "in place\n")
    finally:
        server.shutdown()
        server.server_close()
