"""Where the programs the appliers run come from: the self-contained plugin's own directory first
(explicitly: a node's PATH may hold other iptables or nft builds, or none), then PATH.

The one place that knows about the bundle: its launcher (cni/launch.py) calls ``use`` before
anything runs; everywhere else asks ``find``.
"""

from __future__ import annotations

import os

from .executor import which

_own: str | None = None


def use(directory: str) -> None:
    """Look for programs in ``directory`` before PATH (the bundle's ``sbin``)."""
    global _own
    _own = directory


def own() -> str | None:
    """The directory given to ``use``, if any."""
    return _own


def find(name: str) -> str | None:
    """The program ``name``: the bundle's when it has one, else the first on PATH (None: none)."""
    if _own is not None:
        candidate = os.path.join(_own, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return which(name)
