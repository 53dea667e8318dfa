"""The node's CNI network configuration: the files the runtime loads and in which order, the
istio-cni entry (from the settings or the CNI_NETWORK_CONFIG template), inserting it into the
node's network (a .conf becomes a .conflist) or writing a standalone network for Multus, and
taking it away again: exactly what was there before when the file is as we left it, else only
our entry."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cni.install.files import ChangedMeanwhile, atomic_write, file_mode, read_or_none, remove_file
from cni.install.settings import CONF_EXTENSIONS, PLUGIN_TYPE, NotReady, Settings, SettingsError

log = logging.getLogger("install-cni")

STANDALONE_NAME = "YYY-istio-cni.conflist"
STANDALONE_NETWORK = "istio-cni"
STANDALONE_VERSION = "0.3.1"


class ConfError(Exception):
    """A network configuration file that cannot be used; the message says why."""


def conf_files(net_dir: Path) -> list[Path]:
    """The network configuration files in the runtime's order (libcni: sorted by name)."""
    try:
        names = sorted(os.listdir(net_dir))
    except FileNotFoundError:
        return []
    return [net_dir / n for n in names if n.endswith(CONF_EXTENSIONS) and not (net_dir / n).is_dir()]


def parse_conf(raw: bytes, path: Path) -> dict[str, Any]:
    """The file's JSON object: a list (``.conflist``) or a single plugin (``.conf``, ``.json``)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ConfError(f"{path}: not a JSON object")
    if path.suffix == ".conflist":
        plugins = doc.get("plugins")
        if not isinstance(plugins, list) or not plugins or not all(isinstance(p, dict) for p in plugins):
            raise ConfError(f"{path}: a .conflist needs a non-empty 'plugins' list of objects")
        for i, p in enumerate(plugins):
            if not isinstance(p.get("type"), str) or not p["type"]:
                raise ConfError(f"{path}: plugins[{i}] has no 'type'")
    elif not isinstance(doc.get("type"), str) or not doc["type"]:
        raise ConfError(f"{path}: a single-plugin configuration needs a 'type' (is it a conflist?)")
    return doc


def dump_conf(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def is_ours(plugin: Any) -> bool:
    return isinstance(plugin, dict) and plugin.get("type") == PLUGIN_TYPE


def with_entry(conflist: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """The conflist with exactly one istio-cni entry, equal to ``entry``: an existing one is
    replaced where it stands, otherwise the entry goes last. Everything else is kept as it was."""
    plugins = list(conflist["plugins"])
    positions = [i for i, p in enumerate(plugins) if is_ours(p)]
    if positions:
        plugins[positions[0]] = entry
        plugins = [p for i, p in enumerate(plugins) if i not in positions[1:]]
    else:
        plugins.append(entry)
    return {**conflist, "plugins": plugins}


def without_entry(conflist: dict[str, Any]) -> dict[str, Any]:
    return {**conflist, "plugins": [p for p in conflist["plugins"] if not is_ours(p)]}


def conflist_from_conf(conf: dict[str, Any]) -> dict[str, Any]:
    """A single-plugin configuration as a one-plugin list, as libcni's ConfListFromConf makes it:
    the network keeps its name and version, the plugin keeps every key."""
    out: dict[str, Any] = {}
    if "cniVersion" in conf:
        out["cniVersion"] = conf["cniVersion"]
    out["name"] = conf.get("name", "")
    out["plugins"] = [conf]
    return out


def _render_template(template: str, settings: Settings) -> dict[str, Any]:
    values = {
        "__LOG_LEVEL__": settings.log_level,
        "__KUBECONFIG_FILENAME__": settings.kubeconfig_filename,
        "__KUBECONFIG_FILEPATH__": settings.host_kubeconfig_path,
        "__CNI_BIN_DIR__": settings.host_bin_dir,
        "__KUBERNETES_NODE_NAME__": settings.node_name,
        "__POD_NAMESPACE__": settings.pod_namespace,
    }
    for key, value in values.items():
        template = template.replace(key, json.dumps(value)[1:-1])
    try:
        doc = json.loads(template)
    except ValueError as e:
        raise SettingsError(f"CNI_NETWORK_CONFIG: not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("type") != PLUGIN_TYPE:
        raise SettingsError(f'CNI_NETWORK_CONFIG: must be a JSON object with "type": "{PLUGIN_TYPE}"')
    return doc


def plugin_entry(settings: Settings) -> dict[str, Any]:
    """The istio-cni entry as it goes into a conflist (no name or cniVersion: the list's apply)."""
    if settings.network_config:
        doc = _render_template(settings.network_config, settings)
        if settings.native_nftables:
            doc["native_nftables"] = True
        if settings.stats_socket:
            doc.setdefault("stats_socket", settings.stats_socket)
        return {k: v for k, v in doc.items() if k not in ("cniVersion", "name")}
    entry: dict[str, Any] = {"type": PLUGIN_TYPE, "log_level": settings.log_level}
    if settings.native_nftables:
        entry["native_nftables"] = True
    if settings.plugin_log_file:
        entry["log_file"] = settings.plugin_log_file
    entry["pod_namespace"] = settings.pod_namespace
    if settings.stats_socket:
        # Where the plugin sends its ADD and DEL records for the node agent's metrics.
        entry["stats_socket"] = settings.stats_socket
    entry["kubernetes"] = {
        "kubeconfig": settings.host_kubeconfig_path,
        "cni_bin_dir": settings.host_bin_dir,
        "exclude_namespaces": list(settings.exclude_namespaces),
    }
    return entry


def standalone_conf(settings: Settings, name: str) -> bytes:
    """The plugin as a network of its own, for Multus to call by name."""
    entry = plugin_entry(settings)
    network, version = STANDALONE_NETWORK, STANDALONE_VERSION
    if settings.network_config:
        doc = _render_template(settings.network_config, settings)
        network, version = str(doc.get("name", network)), str(doc.get("cniVersion", version))
    if name.endswith(".conflist"):
        return dump_conf({"cniVersion": version, "name": network, "plugins": [entry]})
    return dump_conf({"cniVersion": version, "name": network, **entry})


@dataclass
class Installation:
    """What we changed in the net dir, to undo it exactly."""

    dest: Path  # the file holding our entry
    written: bytes | None  # what we last wrote there (None: the entry was there before us)
    before: bytes | None  # dest as it was before we first wrote it (None: it did not exist)
    source: Path | None = None  # a single-plugin file we turned into ``dest`` and removed
    source_before: bytes = b""


class EntryMixin:
    """The Installer's passes over the net dir: the entry in place (chained or standalone) and
    what was changed to put it there (``installation``), to undo it exactly. The state is set
    by Installer.__init__."""

    settings: Settings
    entry: dict[str, Any]
    installation: Installation | None
    _preempted_by: Path | None

    def _target(self) -> Path:
        """The file to chain into: the named one, or the first the runtime would load."""
        s = self.settings
        files = conf_files(s.net_dir)
        if s.conf_name:
            path = s.net_dir / s.conf_name
            if not path.exists():
                # As Istio: a .conf we converted earlier is now its .conflist, and vice versa.
                other = path.with_suffix(".conflist" if path.suffix != ".conflist" else ".conf")
                if other.exists():
                    path = other
                else:
                    raise NotReady(f"waiting for the CNI configuration {path} to be written")
            first = files[0] if files else path
            if first != path and first != self._preempted_by:
                log.warning("%s is preempted by %s: the runtime loads that one first", path, first)
            self._preempted_by = first
            return path
        if not files:
            raise NotReady(f"waiting for a CNI network configuration in {s.net_dir}")
        return files[0]

    def _ensure_chained(self) -> Path:
        target = self._target()
        try:
            raw = target.read_bytes()
        except FileNotFoundError:
            raise NotReady(f"{target} disappeared; looking again") from None
        try:
            doc = parse_conf(raw, target)
        except ConfError as e:
            raise NotReady(f"{e}; left unchanged, waiting for it to be fixed") from None

        inst = self.installation
        if inst is not None and target not in (inst.dest, inst.source):
            log.info("the node's network configuration is now %s (was %s)", target, inst.dest)
            self._revert(inst)
            inst = self.installation = None

        if target.suffix == ".conflist":
            new = with_entry(doc, self.entry)
            if new == doc:
                if inst is None:  # already in place from an earlier run: we cannot know the original
                    self.installation = Installation(dest=target, written=None, before=None)
                return target
            data = dump_conf(new)
            atomic_write(target, data, file_mode(target), if_unchanged=raw, through_links=True)
            if inst is not None and raw == inst.written:
                inst.written = data
            else:
                restorable = not any(is_ours(p) for p in doc["plugins"])
                self.installation = Installation(target, data if restorable else None, raw)
                if inst is not None:
                    log.warning("%s was rewritten without the istio-cni entry; putting it back", target)
            log.info("inserted the istio-cni entry into %s", target)
            return target

        if doc["type"] == PLUGIN_TYPE:
            raise NotReady(f"{target} is istio-cni's own network, not a primary network to chain into")
        dest = target.with_suffix(".conflist")
        data = dump_conf(with_entry(conflist_from_conf(doc), self.entry))
        dest_now = read_or_none(dest)
        if inst is None or dest_now != inst.written:
            inst = self.installation = Installation(dest, None, dest_now)
        inst.source, inst.source_before = target, raw
        atomic_write(dest, data, file_mode(target), through_links=True)
        inst.written = data
        # The .conf sorts first and would shadow the list: the runtime must see the list alone.
        if read_or_none(target) != raw:
            raise ChangedMeanwhile(f"{target} changed while it was being converted; starting again")
        remove_file(target)
        log.info("converted %s into %s with the istio-cni entry", target, dest)
        return dest

    def _ensure_standalone(self) -> Path:
        s = self.settings
        dest = s.net_dir / (s.conf_name or STANDALONE_NAME)
        data = standalone_conf(s, dest.name)
        current = read_or_none(dest)
        if current == data:
            if self.installation is None:
                self.installation = Installation(dest, data, None)
            return dest
        atomic_write(dest, data, 0o644)
        if self.installation is None or current != self.installation.written:
            self.installation = Installation(dest, data, None if current is None else current)
        else:
            self.installation.written = data
        log.info("wrote the standalone istio-cni network %s", dest)
        return dest

    def _revert(self, inst: Installation) -> None:
        """Undo one installation: the original bytes when the file is still as we left it (checked
        again just before the rename, as on insertion), else just our entry out of whatever is
        there now. A symlinked file keeps its link; the file it leads to gets the bytes."""
        current = read_or_none(inst.dest)
        if current is None:
            return
        if inst.written is not None and current == inst.written:
            if inst.source is not None and not inst.source.exists():
                atomic_write(inst.source, inst.source_before, file_mode(inst.dest))
                log.info("restored %s", inst.source)
            try:
                if inst.before is None:
                    if read_or_none(inst.dest) != inst.written:
                        raise ChangedMeanwhile(str(inst.dest))
                    remove_file(inst.dest)
                    log.info("removed %s", inst.dest)
                else:
                    atomic_write(
                        inst.dest,
                        inst.before,
                        file_mode(inst.dest),
                        if_unchanged=inst.written,
                        through_links=True,
                    )
                    log.info("restored %s as it was before the istio-cni entry was inserted", inst.dest)
                return
            except ChangedMeanwhile:
                log.info(
                    "%s changed while it was being restored; only the istio-cni entry is taken out", inst.dest
                )
        remove_entry_from(inst.dest)


def remove_entry_from(path: Path) -> bool:
    """Removes every istio-cni entry from the conflist at ``path`` (and the file, when nothing
    else is left in it). True when the file changed. A file that keeps changing under us is
    read again a few times, then left as it is (ChangedMeanwhile)."""
    for _ in range(3):
        try:
            return _remove_entry_once(path)
        except ChangedMeanwhile:
            continue
    raise ChangedMeanwhile(f"{path} kept changing while the istio-cni entry was being removed")


def _remove_entry_once(path: Path) -> bool:
    raw = read_or_none(path)
    if raw is None:
        return False
    try:
        doc = parse_conf(raw, path)
    except ConfError as e:
        log.error("%s; left unchanged", e)
        return False
    if path.suffix != ".conflist":
        if doc["type"] == PLUGIN_TYPE:
            remove_file(path)
            log.info("removed %s", path)
            return True
        return False
    if not any(is_ours(p) for p in doc["plugins"]):
        return False
    rest = without_entry(doc)
    if rest["plugins"]:
        atomic_write(path, dump_conf(rest), file_mode(path), if_unchanged=raw, through_links=True)
        log.info("removed the istio-cni entry from %s", path)
    else:
        remove_file(path)
        log.info("removed %s (it held only the istio-cni entry)", path)
    return True
