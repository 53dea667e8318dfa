"""The pods of this node as the API reports them: a list, then a watch from the list's
resourceVersion with bookmarks, as client-go's reflector does it.

- list ``/api/v1/pods?fieldSelector=spec.nodeName=NODE`` (in pages), every pod handed on;
  pods gone since the previous list are handed on as deleted;
- watch from the last resourceVersion seen (``allowWatchBookmarks=true``; BOOKMARK events
  move the resourceVersion on without a pod), until the server ends the stream
  (``timeoutSeconds``), then watch again from there;
- a broken connection or an error: watch again from the last resourceVersion after a backoff
  (doubling, capped), so no event after it is missed;
- 410 Gone (as the watch's HTTP status or as an ERROR event in its stream): that
  resourceVersion is no longer served, so list again.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from cni.kube import ApiError, Client, HTTPError, KubeError, WatchStream

log = logging.getLogger("install-cni")

ADDED, MODIFIED, DELETED, SYNCED = "ADDED", "MODIFIED", "DELETED", "SYNCED"


# A watch that ends sooner than this with no event is treated as a failure (backoff), as
# client-go's reflector does: a proxy that closes every watch at once must not cause a hot loop.
QUICK_WATCH = 1.0


class Gone(Exception):
    """The resourceVersion is too old: list again."""


def pod_key(pod: dict[str, Any]) -> tuple[str, str]:
    meta = pod.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


class PodWatcher:
    """Calls ``handler(kind, pod)`` (ADDED, MODIFIED, DELETED) for every change to the pods of
    ``node`` and ``on_synced()`` after every successful list, until ``stop`` is set."""

    def __init__(
        self,
        client: Client,
        node: str,
        handler: Callable[[str, dict[str, Any]], None],
        stop: threading.Event,
        *,
        field_selector: str = "",
        label_selector: str = "",
        on_synced: Callable[[], None] | None = None,
        watch_seconds: int = 300,
        initial_backoff: float = 0.2,
        max_backoff: float = 10.0,
        page_size: int = 100,  # pages well under MAX_BODY, even with large managedFields
    ) -> None:
        self.client = client
        self.node = node
        self.handler = handler
        self.stop = stop
        selectors = [f"spec.nodeName={node}"]
        if field_selector:
            selectors.insert(0, field_selector)
        self.field_selector = ",".join(selectors)
        self.label_selector = label_selector
        self.on_synced = on_synced
        self.watch_seconds = watch_seconds
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.page_size = page_size
        self.resource_version = ""
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.lists = 0  # successful lists, for the log and tests
        self.synced = threading.Event()
        self._stream: WatchStream | None = None

    def _query(self, **extra: str) -> dict[str, str]:
        q = {"fieldSelector": self.field_selector}
        if self.label_selector:
            q["labelSelector"] = self.label_selector
        q.update(extra)
        return q

    def list(self) -> None:
        """Lists every page; hands on each pod, and the deletions since the last list."""
        pods: dict[tuple[str, str], dict[str, Any]] = {}
        token = ""
        rv = ""
        while True:
            extra = {"limit": str(self.page_size)}
            if token:
                extra["continue"] = token
            try:
                doc = self.client.request("GET", "/api/v1/pods", query=self._query(**extra))
            except ApiError as e:
                if e.status == 410:  # the continue token expired: from the start
                    raise Gone(str(e)) from None
                raise
            items = doc.get("items")
            meta = doc.get("metadata") or {}
            if not isinstance(items, list) or not isinstance(meta, dict):
                raise KubeError("the pod list has no items", transient=True)
            for pod in items:
                if isinstance(pod, dict):
                    pods[pod_key(pod)] = pod
            rv = str(meta.get("resourceVersion") or rv)
            token = str(meta.get("continue") or "")
            if not token:
                break
        gone = [self.pods[k] for k in self.pods.keys() - pods.keys()]
        self.pods = pods
        self.resource_version = rv
        self.lists += 1
        log.info("listed %d pods on node %s (resourceVersion %s)", len(pods), self.node, rv or "unset")
        for pod in gone:
            self.handler(DELETED, pod)
        for pod in pods.values():
            self.handler(SYNCED, pod)
        self.synced.set()
        if self.on_synced is not None:
            self.on_synced()

    def watch_once(self) -> int:
        """One watch from the current resourceVersion until the server ends it; the number of
        events. Raises Gone, KubeError, HTTPError or OSError."""
        query = self._query(
            watch="1",
            resourceVersion=self.resource_version,
            allowWatchBookmarks="true",
            timeoutSeconds=str(self.watch_seconds),
        )
        seen = 0
        with self.client.watch("/api/v1/pods", query, idle=self.watch_seconds + 30) as stream:
            self._stream = stream
            try:
                if self.stop.is_set():
                    return seen
                for event in stream.events():
                    if self.stop.is_set():
                        break
                    seen += 1
                    self._event(event)
            finally:
                self._stream = None
        return seen

    def close(self) -> None:
        """Ends the watch in progress (``stop`` set first, so run() returns)."""
        stream = self._stream
        if stream is not None:
            stream.abort()

    def _event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        obj = event.get("object")
        if not isinstance(obj, dict):
            raise KubeError(f"a {kind} watch event without an object", transient=True)
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise Gone(str(obj.get("message", "410 Gone")))
            raise KubeError(f"the watch reported an error: {obj.get('message', obj)}", transient=True)
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            if rv:
                self.resource_version = str(rv)
            return
        if kind not in (ADDED, MODIFIED, DELETED):
            log.debug("ignoring a watch event of type %r", kind)
            return
        node = (obj.get("spec") or {}).get("nodeName")
        if node != self.node and kind != DELETED:
            # Only a server that ignored the field selector sends this: never act on it.
            log.warning("ignoring pod %s/%s of node %r", *pod_key(obj), node)
            return
        key = pod_key(obj)
        if kind == DELETED:
            self.pods.pop(key, None)
        else:
            self.pods[key] = obj
        if rv:
            self.resource_version = str(rv)
        self.handler(kind, obj)

    def run(self) -> None:
        """Lists and watches until ``stop`` is set."""
        backoff = self.initial_backoff
        need_list = True
        gone_again = False  # a 410 right after the list that answered the last one
        while not self.stop.is_set():
            try:
                if need_list:
                    self.list()
                    need_list = False
                    backoff = self.initial_backoff
                started = time.monotonic()
                if self.watch_once():
                    backoff = self.initial_backoff
                    gone_again = False
                    continue  # the server ended the watch: again from the last resourceVersion
                if time.monotonic() - started >= QUICK_WATCH:
                    continue  # a quiet watch the server timed out
                # Ended at once with no event (a proxy closing it?): not again in a tight loop.
                log.warning("the pod watch of node %s ended at once with no event", self.node)
            except (Gone, ApiError) as e:
                if isinstance(e, ApiError) and e.status != 410:
                    log.error("watching the pods of node %s: %s", self.node, e)
                else:
                    log.info("resourceVersion %s is gone (%s): listing again", self.resource_version, e)
                    need_list = True
                    if not gone_again:
                        gone_again = True
                        continue
                log.error("watching the pods of node %s: %s", self.node, e)
            except (KubeError, HTTPError, OSError) as e:
                log.warning(
                    "the pod watch of node %s broke (%s); resuming", self.node, str(e) or type(e).__name__
                )
            except Exception:  # noqa: BLE001 - a handler's bug must not end the watch
                log.exception("the pod watch of node %s failed", self.node)
            # Jitter: a DaemonSet's agents must not come back in step after the API restarts.
            self.stop.wait(backoff * (0.5 + random.random() / 2))  # noqa: S311 - not cryptography
            backoff = min(backoff * 2, self.max_backoff)
