"""``install-cni``: puts the ``istio-cni`` plugin on a node and keeps it there. Writes the plugin
executable and its kubeconfig, inserts the plugin's entry into the node's CNI configuration,
puts the entry back whenever another installer rewrites the file, reports readiness over HTTP,
and on SIGTERM takes the entry away, leaving the file as the primary plugin wrote it.

Settings come from flags or from the environment variables Istio's installer reads (docs/installing.md
has the table). Only the standard library is used.

The parts, by job:

- ``settings``: the settings, from flags and environment variables, validated once.
- ``files``: atomic writes and removals in the net and bin dirs.
- ``conflist``: the network configuration files and the istio-cni entry in them.
- ``kubeconfig``: the plugin's kubeconfig.
- ``binaries``: the plugin executable in the bin dirs, and pruning of old versions.
- ``health``: the /readyz and /healthz server and ``--check``.
- ``loop``: the installer, its watch loop, signals, ``--uninstall`` and ``main``.
"""

from cni.install.loop import main

__all__ = ["main"]
