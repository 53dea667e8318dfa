"""The plugin's kubeconfig: the API server, its CA and the service account's token, rendered as
JSON (which the plugin reads with the standard library) and kept up to date in the net dir."""

from __future__ import annotations

import base64
import json
import logging

from cni.install.files import atomic_write, file_mode, read_or_none
from cni.install.settings import PLUGIN_TYPE, NotReady, Settings

log = logging.getLogger("install-cni")


def render_kubeconfig(server: str, ca: bytes, token: str) -> bytes:
    """The plugin's kubeconfig. JSON (a YAML subset) so the plugin reads it with the stdlib."""
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "local",
                "cluster": {"server": server, "certificate-authority-data": base64.b64encode(ca).decode()},
            }
        ],
        "users": [{"name": PLUGIN_TYPE, "user": {"token": token}}],
        "contexts": [{"name": "istio-cni-context", "context": {"cluster": "local", "user": PLUGIN_TYPE}}],
        "current-context": "istio-cni-context",
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def ensure_kubeconfig(s: Settings) -> None:
    """The plugin's kubeconfig in the net dir, from the service account's token and CA: written
    when it is missing, differs or has another mode (the token is rotated, the server moved)."""
    try:
        token = s.token_file.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise NotReady(
            f"cannot read the service account token {s.token_file}: {e.strerror} (is this running in a pod?)"
        ) from None
    try:
        ca = s.ca_file.read_bytes()
    except OSError as e:
        raise NotReady(f"cannot read the API server CA {s.ca_file}: {e.strerror}") from None
    if not token:
        raise NotReady(f"the service account token {s.token_file} is empty")
    want = render_kubeconfig(s.server, ca, token)
    path = s.kubeconfig_path
    try:
        current = read_or_none(path)
        if current == want and file_mode(path) == s.kubeconfig_mode:
            return
        atomic_write(path, want, s.kubeconfig_mode)
    except OSError as e:
        raise NotReady(f"cannot write the kubeconfig {path}: {e.strerror}") from None
    verb = "wrote" if current is None else "refreshed"
    log.info("%s the kubeconfig %s (server %s)", verb, path, s.server)
