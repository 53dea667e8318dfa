"""install-cni's loop: the Installer (one pass makes the node's files right; cleanup() undoes it),
the watch loop that runs a pass every poll interval until SIGTERM, ``--uninstall`` without the
running installer's state, and ``main``."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from cni.install.binaries import BinariesMixin
from cni.install.conflist import (
    ConfError,
    EntryMixin,
    Installation,
    conf_files,
    plugin_entry,
    remove_entry_from,
)
from cni.install.files import ChangedMeanwhile, remove_file
from cni.install.health import Status, check, serve_health
from cni.install.kubeconfig import ensure_kubeconfig
from cni.install.settings import (
    _LOG_LEVELS,
    PLUGIN_FILENAME,
    NotReady,
    Settings,
    SettingsError,
    build_parser,
    parse_settings,
)
from istio_iptables import logsink

log = logging.getLogger("install-cni")


class Installer(BinariesMixin, EntryMixin):
    """One pass of ``reconcile()`` makes the node's files right (executable, kubeconfig, entry, in
    that order: the entry only points at a plugin that is there); ``cleanup()`` undoes it."""

    def __init__(self, settings: Settings, archive: bytes, template: Path | None = None) -> None:
        self.settings = settings
        self.archive = archive
        # The self-contained plugin's template (None: the zipapp ``archive``).
        self.template = template
        self._switched: dict[Path, float] = {}
        self.entry = plugin_entry(settings)
        self.status = Status()
        self.installation: Installation | None = None
        self._bin_stats: dict[Path, tuple[int, int, int]] = {}
        self._last_error = ""
        self._preempted_by: Path | None = None
        # The node agent's count of passes (istio_cni_installs_total): SUCCESS or the stage
        # that failed, in Istio's words.
        self.stage = ""
        self.on_result: Callable[[str], None] | None = None

    def reconcile(self) -> None:
        """One pass; raises NotReady with the reason when the node is not set up."""
        s = self.settings
        self.stage = "COPY_BINARIES_FAILURE"
        self._ensure_executables()
        self.stage = "CREATE_KUBECONFIG_FAILURE"
        ensure_kubeconfig(s)
        self.stage = "CREATE_CNI_CONFIG_FAILURE"
        try:
            dest = self._ensure_chained() if s.chained else self._ensure_standalone()
        except ChangedMeanwhile as e:
            raise NotReady(str(e)) from None
        except OSError as e:
            raise NotReady(f"cannot update the CNI configuration: {e}") from None
        self.status.detail = (
            f"istio-cni entry in place in {dest}; executable in "
            f"{', '.join(str(d) for d in s.bin_dirs)}; kubeconfig {s.kubeconfig_path}"
        )

    def step(self) -> None:
        """reconcile() with the outcome recorded for the health endpoints and logged once."""
        try:
            self.reconcile()
        except NotReady as e:
            self.status.ready = False
            self.status.detail = f"not ready: {e}"
            if str(e) != self._last_error:
                log.error("%s", e)
                self._last_error = str(e)
            if self.on_result is not None:
                self.on_result(self.stage)
        else:
            if not self.status.ready:
                log.info("ready: %s", self.status.detail)
            self.status.ready = True
            self._last_error = ""
            if self.on_result is not None:
                self.on_result("SUCCESS")
        self.status.heartbeat = time.monotonic()

    def cleanup(self) -> None:
        """Takes the entry away (first, so no pod start calls a plugin being removed), then,
        when configured, the executable and the kubeconfig."""
        self.status.ready = False
        self.status.detail = "shutting down"
        inst, self.installation = self.installation, None
        if inst is not None:
            try:
                self._revert(inst)
            except (OSError, ConfError, ChangedMeanwhile) as e:
                log.error("could not remove the istio-cni entry from %s: %s", inst.dest, e)
        if self.settings.cleanup_files:
            remove_files(self.settings)


def remove_files(settings: Settings) -> None:
    from cni.selfcontained import SUPPORT_DIR, remove_all

    for path in (settings.kubeconfig_path, *(d / PLUGIN_FILENAME for d in settings.bin_dirs)):
        try:
            if remove_file(path):
                log.info("removed %s", path)
        except OSError as e:
            log.error("could not remove %s: %s", path, e.strerror)
    for d in settings.bin_dirs:
        if (d / SUPPORT_DIR).exists():
            remove_all(d)
            log.info("removed every version of the plugin from %s", d / SUPPORT_DIR)


def uninstall(settings: Settings) -> bool:
    """Without the state of the installer that inserted it: every istio-cni entry out of every
    network configuration in the net dir, then the kubeconfig and the executables. False when
    an entry could not be removed (logged)."""
    ok = True
    for path in conf_files(settings.net_dir):
        try:
            remove_entry_from(path)
        except (OSError, ChangedMeanwhile) as e:
            log.error("could not remove the istio-cni entry from %s: %s", path, e)
            ok = False
    remove_files(settings)
    return ok


# --- main -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        log.info("received %s; cleaning up", signal.Signals(signum).name)
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(settings: Settings, stop: threading.Event) -> int:
    """Installs, watches until ``stop`` is set, cleans up."""
    where = (
        f"net dir {settings.net_dir} (node: {settings.host_net_dir}), bin dirs "
        + ", ".join(
            f"{d} (node: {n})" for d, n in zip(settings.bin_dirs, settings.host_bin_dirs, strict=False)
        )
        + (", chained" if settings.chained else ", standalone (Multus)")
    )
    if settings.interpreter:
        from cni.bundle import build_archive

        archive = build_archive(settings.interpreter)
        log.info(
            "built the plugin executable (%d bytes, interpreter %r); %s",
            len(archive),
            settings.interpreter,
            where,
        )
        installer = Installer(settings, archive)
    else:
        from cni.selfcontained import BuildError, template_version

        try:
            version = template_version(settings.plugin_template)
        except BuildError as e:
            raise SettingsError(
                f"PLUGIN_TEMPLATE: {e} (build it with scripts/build-plugin --template-only DIR, or set "
                "PLUGIN_INTERPRETER to install a zipapp for the node's own Python)"
            ) from None
        log.info("the self-contained plugin %s from %s; %s", version, settings.plugin_template, where)
        installer = Installer(settings, b"", settings.plugin_template)
    server = serve_health(
        installer.status,
        settings.health_address,
        settings.health_port,
        stale_after=max(30.0, 10 * settings.poll_interval),
    )
    log.info("serving /readyz and /healthz on %s:%d", settings.health_address or "*", server.server_port)
    # The node agent in this process (docs/node-agent.md): metrics, pod repair, the startup taint.
    from cni.agent import Agent

    agent = Agent(settings, lambda: installer.status.ready, installer.entry)
    installer.on_result = agent.install_result
    try:
        agent.start(stop)
        while not stop.is_set():
            installer.step()
            stop.wait(settings.poll_interval)
    finally:
        stop.set()
        # The entry first: the pod's grace period may not leave time for both.
        installer.cleanup()
        agent.close()
        server.shutdown()
        server.server_close()
    log.info("done")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = (args.log_level or os.environ.get("LOG_LEVEL", "info")).strip().lower()
    # logging underneath (records come from the watch loop and the health server's threads),
    # with the lines of the other commands (istio_iptables.logsink).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logsink.formatter("install-cni"))
    logging.basicConfig(
        level=_LOG_LEVELS.get("warn" if level == "warning" else level, logging.INFO), handlers=[handler]
    )
    try:
        settings = parse_settings(args, os.environ)
    except SettingsError as e:
        log.error("%s", e)
        return 2
    if args.check:
        return check(settings)
    if args.uninstall:
        return 0 if uninstall(settings) else 1
    stop = threading.Event()
    with _stop_on_signals(stop):
        try:
            return run(settings, stop)
        except (SettingsError, RuntimeError, OSError) as e:
            log.error("%s", e)
            return 1
