"""The startup taint: nodes can be created with ``cni.istio.io/not-ready:NoSchedule`` so that no
pod is scheduled before the plugin is in place; the agent removes it from its own node once the
plugin is installed and its first list of the node's pods succeeded (what Istio's istiod does
from afar with PILOT_ENABLE_NODE_UNTAINT_CONTROLLERS, done here by the process that knows).

Only that taint is removed and no other taint is ever added or removed: a JSON patch whose
``test`` operation holds the taints as read, then ``replace`` with the same list minus ours (as
Istio's node untainter). A concurrent change of the taints fails the test (HTTP 422; a conflict
is 409): the node is read again and the patch retried.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from cni.kube import ApiError, Client, KubeError, quote_segment

log = logging.getLogger("install-cni")

ATTEMPTS = 10


def remove_taint(client: Client, node: str, key: str) -> bool:
    """Removes the taint ``key`` from ``node``; True when it is gone (or was never there)."""
    path = f"/api/v1/nodes/{quote_segment(node)}"
    for attempt in range(1, ATTEMPTS + 1):
        obj = client.request("GET", path)
        taints: list[Any] = list((obj.get("spec") or {}).get("taints") or [])
        keep = [t for t in taints if not (isinstance(t, dict) and t.get("key") == key)]
        if len(keep) == len(taints):
            log.info("node %s has no %s taint", node, key)
            return True
        patch = [
            {"op": "test", "path": "/spec/taints", "value": taints},
            {"op": "replace", "path": "/spec/taints", "value": keep},
        ]
        try:
            client.request("PATCH", path, body=patch, content_type="application/json-patch+json")
        except ApiError as e:
            if e.status in (409, 422):
                log.info(
                    "the taints of node %s changed meanwhile (attempt %d): reading it again", node, attempt
                )
                continue
            raise
        log.info("removed the %s taint from node %s", key, node)
        return True
    return False


def untaint_when_ready(
    client: Client,
    node: str,
    key: str,
    ready: Callable[[], bool],
    stop: threading.Event,
    *,
    interval: float = 0.2,
    max_backoff: float = 10.0,
) -> threading.Thread:
    """A thread that waits for ``ready()`` (the plugin installed, the first pod list done),
    then removes the taint, retrying failures with a backoff until it is done or ``stop``."""

    def run() -> None:
        while not stop.is_set() and not ready():
            stop.wait(interval)
        backoff = 0.5
        while not stop.is_set():
            try:
                if remove_taint(client, node, key):
                    return
                why = "the taints kept changing"
            except KubeError as e:
                why = str(e)
            log.error("could not remove the %s taint from node %s: %s", key, node, why)
            stop.wait(backoff)
            backoff = min(backoff * 2, max_backoff)

    t = threading.Thread(target=run, name="untaint", daemon=True)
    t.start()
    return t
