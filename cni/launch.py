"""What the self-contained plugin's launcher runs (``<bin dir>/istio-cni``, written by install-cni):
make the process use its own bundle and nothing of the node's, then run the plugin.

- A shared lock on the version's ``.lock`` for the life of the process: install-cni removes an
  old version only when no run holds it.
- The bundle's ``sbin`` is where iptables and nft come from (istio_iptables.tools), and the
  environment the children inherit points at the bundle: ``XTABLES_LIBDIR`` (iptables' extension
  modules), ``OPENSSL_CONF`` (no node OpenSSL configuration); what the runtime's environment could
  use to load node code into them (``LD_PRELOAD``, ``LD_LIBRARY_PATH``, ``PYTHON*``) is removed.
- User and group lookups are answered from local files only: iptables and nft look up owner
  names (iptables even numeric ones), and the node's nsswitch.conf could name NSS modules
  (``libnss_sss``, ``libnss_systemd``...) that the bundled C library must not load. The process
  moves into a private mount namespace of its own, where a files-only nsswitch.conf is bound
  over the node's, before anything runs; its children inherit it. glibc answers "files" itself,
  without loading a module. Without the privilege for that (never the case for a runtime's
  plugin, which runs as root) it goes on, and the applier's own lookup limiting applies.
"""

from __future__ import annotations

import os

_REMOVED = ("LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "GCONV_PATH", "LOCPATH", "NLSPATH")


def _own_environment(base: str) -> None:
    env = os.environ
    for name in [n for n in env if n in _REMOVED or n.startswith("PYTHON")]:
        del env[name]
    env["XTABLES_LIBDIR"] = f"{base}/lib/xtables"
    env["OPENSSL_CONF"] = "/dev/null"


def _needs_files_only(path: str = "/etc/nsswitch.conf") -> bool:
    """Whether user or group lookups could load an NSS module: anything but glibc's own "files"
    for passwd or group. Without the file glibc uses its built-in defaults, files only."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    for line in text.splitlines():
        db, sep, sources = line.split("#", 1)[0].partition(":")
        named = [s for s in sources.split() if not s.startswith("[")]
        if sep and db.strip() in ("passwd", "group") and named != ["files"]:
            return True
    return False


def _files_only_lookups() -> str | None:
    """A private mount namespace with a files-only nsswitch.conf where needed; None, or why not."""
    if not _needs_files_only():
        return None
    from istio_iptables.nsexec import limit_lookups_to_files

    try:
        limit_lookups_to_files()
    except OSError as e:
        return e.strerror or str(e)
    return None


def main(base: str) -> None:
    import fcntl

    try:
        fd = os.open(f"{base}/.lock", os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        pass  # a version being removed right now: it still runs, as every file is open or mapped
    _own_environment(base)
    from istio_iptables import tools

    tools.use(f"{base}/sbin")
    why = _files_only_lookups()
    if why is not None:
        import sys

        sys.stderr.write(f"istio-cni: lookups not limited to local files ({why})\n")
    from cni.plugin import main as plugin_main

    plugin_main()
