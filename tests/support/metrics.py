"""Scraping a Prometheus text endpoint, as the tests of the node agent's metrics do."""

from __future__ import annotations

import urllib.request


def scrape(url: str) -> dict[str, float]:
    """Every sample at ``url``: ``{'name{labels}': value}``."""
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
