"""Writes and removals in the net and bin dirs: atomic (a reader sees the old file or the new
one), durable (fsync of the file and its directory), through a symlinked configuration to the
file it leads to, and with the mode asked for whatever the umask."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path


def read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ChangedMeanwhile(Exception):
    """The file changed between our read and our write; the next pass starts again."""


def atomic_write(
    path: Path, data: bytes, mode: int, *, if_unchanged: bytes | None = None, through_links: bool = False
) -> None:
    """Writes beside ``path`` then renames over it: a reader sees the old file or the new one,
    never a part. The temporary name has no CNI extension, so no runtime ever loads it.
    With ``if_unchanged``, gives up (ChangedMeanwhile) when ``path`` no longer holds those bytes,
    so an update another installer made since we read the file is not overwritten.
    With ``through_links``, a symlink at ``path`` stays and the file it leads to is replaced
    (written beside that file, so the rename stays within one directory)."""
    if through_links:
        path = link_target(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)  # the umask must not narrow or the old file's mode leak
            os.fsync(fd)
        finally:
            os.close(fd)
        if if_unchanged is not None and read_or_none(path) != if_unchanged:
            raise ChangedMeanwhile(f"{path} changed while it was being updated; starting again")
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def link_target(path: Path) -> Path:
    """The file ``path`` leads to through any symlinks (``path`` itself when it is none). A
    network configuration may be a link to a file its owner keeps elsewhere and keeps updating;
    renaming over the link would turn it into a file of our own that those updates miss."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def remove_file(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    _fsync_dir(path.parent)
    return True


def file_mode(path: Path, default: int = 0o644) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return default
