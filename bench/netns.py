"""Throw-away network namespaces with unique random names, all deleted at the end of a run (also
when it is interrupted)."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

NETNS_DIR = Path("/var/run/netns")


class Namespaces:
    """Creates ``bench-<run id>-<n>`` namespaces in batches and remembers them until deleted."""

    def __init__(self) -> None:
        self.prefix = f"bench-{secrets.token_hex(3)}-"
        self._count = 0
        self.live: set[str] = set()

    @staticmethod
    def path(name: str) -> str:
        return str(NETNS_DIR / name)

    def _batch(self, verb: str, names: list[str]) -> None:
        if not names:
            return
        script = "".join(f"netns {verb} {n}\n" for n in names)
        p = subprocess.run(
            ["ip", "-force", "-batch", "-"], input=script, capture_output=True, text=True, check=False
        )
        if p.returncode != 0 and verb == "add":
            raise RuntimeError(f"ip netns add failed: {p.stderr.strip()}")

    def create(self, count: int = 1) -> list[str]:
        names = []
        for _ in range(count):
            self._count += 1
            names.append(f"{self.prefix}{self._count}")
        self.live.update(names)
        self._batch("add", names)
        return names

    def create_one(self) -> str:
        return self.create(1)[0]

    def delete(self, names: list[str]) -> None:
        self._batch("del", names)
        self.live.difference_update(names)

    def delete_all(self) -> None:
        """Deletes every namespace of this run, including any the registry missed."""
        names = set(self.live)
        if NETNS_DIR.is_dir():
            names.update(n for n in os.listdir(NETNS_DIR) if n.startswith(self.prefix))
        self.delete(sorted(names))
