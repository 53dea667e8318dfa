"""Loads an nft script from stdin into the current network namespace one of two ways, as a
pod-start process would: ``python3 -S nftload.py binary`` spawns ``nft -f -`` and writes the
script to its stdin; ``python3 -S nftload.py library SITE_DIR`` imports Debian's libnftables
binding (python3-nftables, found in SITE_DIR) and runs the script with ``Nftables().cmd()``.
Both are one transaction. Run with the system interpreter (the binding is installed for it).

Imports nothing beyond what the interpreter starts with (and, for the library, the binding), and
ends like the project's commands, without the interpreter's shutdown. Its step times and its own
peak RSS (VmHWM, which a spawn does not inflate) go to stderr as one line:
``nftload-timings import_ms=... context_ms=... load_ms=... total_ms=... hwm_kib=...``: the
binding's import, its ``Nftables()`` (which loads libnftables and makes the context), and the
load itself (``cmd()``, or nft's spawn to exit)."""

from time import perf_counter

T0 = perf_counter()

import os  # noqa: E402 - after the start time
import sys  # noqa: E402


def _read_stdin() -> bytes:
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _hwm_kib() -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1])
    return 0


def _binary(doc: bytes) -> tuple[int, str]:
    r, w = os.pipe()
    pid = os.posix_spawnp("nft", ["nft", "-f", "-"], os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, r, 0)])
    os.close(r)
    view = memoryview(doc)
    while view:
        view = view[os.write(w, view) :]
    os.close(w)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return code, "" if code == 0 else f"nft -f - exited {code}"


def main() -> int:
    mode = sys.argv[1]
    doc = _read_stdin()
    t1 = perf_counter()
    if mode == "binary":
        t2 = t3 = t1
        code, err = _binary(doc)
    elif mode == "library":
        sys.path.append(sys.argv[2])
        import nftables  # type: ignore[import-not-found]  # python3-nftables, system interpreter only

        t2 = perf_counter()
        nft = nftables.Nftables()
        t3 = perf_counter()
        rc, _out, err = nft.cmd(doc.decode())
        code = 0 if rc == 0 else 1
    else:
        sys.stderr.write(f"nftload: unknown mode {mode!r}\n")
        return 2
    t4 = perf_counter()
    if err:
        sys.stderr.write(f"nftload: {err.strip()}\n")
    sys.stderr.write(
        f"nftload-timings import_ms={(t2 - t1) * 1e3:.3f} context_ms={(t3 - t2) * 1e3:.3f} "
        f"load_ms={(t4 - t3) * 1e3:.3f} total_ms={(t4 - T0) * 1e3:.3f} hwm_kib={_hwm_kib()}\n"
    )
    return code


if __name__ == "__main__":
    rc = main()
    sys.stderr.flush()
    os._exit(rc)
