"""The plugin executable in every bin dir: the self-contained plugin installed from its template
(cni/selfcontained.py) with the versions no run can still use pruned, or the zipapp
(cni/bundle.py) written when the file there differs."""

from __future__ import annotations

import logging
import stat
import time
from pathlib import Path

from cni.install.files import atomic_write
from cni.install.settings import PLUGIN_FILENAME, NotReady, Settings

log = logging.getLogger("install-cni")

# Seconds a plugin run needs at most from the exec of the launcher to its version's lock.
SWITCH_GRACE = 30.0


class BinariesMixin:
    """The Installer's executables (``template``: the self-contained plugin's; None: the zipapp
    ``archive``). The state is set by Installer.__init__."""

    settings: Settings
    archive: bytes
    template: Path | None
    _switched: dict[Path, float]
    _bin_stats: dict[Path, tuple[int, int, int]]

    def _ensure_executables(self) -> None:
        if self.template is not None:
            self._ensure_self_contained(self.template)
            return
        for d in self.settings.bin_dirs:
            path = d / PLUGIN_FILENAME
            try:
                st = path.stat()
                sig = (st.st_ino, st.st_size, st.st_mtime_ns)
                if self._bin_stats.get(path) == sig:
                    continue
                if st.st_size == len(self.archive) and path.read_bytes() == self.archive:
                    if stat.S_IMODE(st.st_mode) != 0o755:
                        path.chmod(0o755)
                    self._bin_stats[path] = sig
                    continue
            except FileNotFoundError:
                pass
            except OSError as e:
                raise NotReady(f"cannot read {path}: {e.strerror}") from None
            try:
                atomic_write(path, self.archive, 0o755)
                st = path.stat()
            except OSError as e:
                raise NotReady(f"cannot write the plugin executable {path}: {e.strerror}") from None
            self._bin_stats[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
            log.info("wrote the plugin executable %s (%d bytes)", path, len(self.archive))

    def _ensure_self_contained(self, template: Path) -> None:
        from cni import selfcontained as sc

        host_dirs = self.settings.host_bin_dirs or (self.settings.host_bin_dir,) * len(self.settings.bin_dirs)
        for d, node_dir in zip(self.settings.bin_dirs, host_dirs, strict=True):
            try:
                version, wrote = sc.install(template, d, node_dir)
            except (OSError, sc.BuildError) as e:
                raise NotReady(f"cannot install the plugin into {d}: {e}") from None
            if wrote or d not in self._switched:
                self._switched[d] = time.monotonic()
            if wrote:
                log.info(
                    "installed the self-contained plugin %s into %s (for %s on the node)",
                    version,
                    d,
                    node_dir,
                )
            self._prune(d, version)

    def _prune(self, d: Path, current: str, grace: float = SWITCH_GRACE) -> None:
        """Remove the versions other than ``current`` that no run can still use: none holds its
        lock, and the launcher has pointed at ``current`` for longer than a run needs to start
        (a run that exec'd the old launcher just before the switch takes its lock within that)."""
        from cni import selfcontained as sc

        if time.monotonic() - self._switched.get(d, 0.0) < grace:
            return
        for version in sc.installed_versions(d):
            if version != current and sc.remove_version(d, version):
                log.info("removed the plugin version %s from %s (no run uses it)", version, d)
