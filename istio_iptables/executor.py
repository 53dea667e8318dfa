"""The one seam through which every external command runs: a real executor and a recording one.

Commands are argv lists, never shell strings. Entering a network namespace is done by prefixing
util-linux ``nsenter --net=PATH --`` so only the child changes namespace.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class CommandNotFound(Exception):
    def __init__(self, program: str) -> None:
        super().__init__(f"{program}: command not found")
        self.program = program


class Executor(Protocol):
    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Completed: ...


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """Prefix ``argv`` so it runs inside the network namespace at ``netns`` (no-op for None)."""
    if not netns:
        return list(argv)
    return ["nsenter", f"--net={netns}", "--", *argv]


class RealExecutor:
    """Runs commands with subprocess, no shell, capturing text output."""

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Completed:
        import subprocess  # deferred: a --dry-run usually runs no command

        full_env = None
        if env:
            full_env = dict(os.environ)
            full_env.update(env)
        try:
            p = subprocess.run(
                list(argv),
                input=stdin,
                capture_output=True,
                text=True,
                env=full_env,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError as e:
            raise CommandNotFound(argv[0]) from e
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            return Completed(tuple(argv), 124, out, err + f"\ntimed out after {timeout}s")
        return Completed(tuple(argv), p.returncode, p.stdout, p.stderr)


@dataclass
class RecordingExecutor:
    """Records every call; answers from ``responder`` (default: success with no output)."""

    responder: Callable[[tuple[str, ...], str | None], Completed] | None = None
    calls: list[tuple[tuple[str, ...], str | None, dict[str, str]]] = field(default_factory=list)

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Completed:
        key = tuple(argv)
        self.calls.append((key, stdin, dict(env or {})))
        if self.responder is not None:
            return self.responder(key, stdin)
        return Completed(key, 0)
