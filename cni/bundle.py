"""Builds the ``istio-cni`` executable that the container runtime runs on the node, where this
package's virtualenv does not exist: a zipapp of the ``cni`` and ``istio_iptables`` packages
behind a shebang naming the node's Python. ``python -m cni.bundle OUT`` writes one.

PyYAML's pure-Python package goes in too, when importable: the plugin reads most kubeconfigs
without it, but one outside the plain YAML its own reader handles (comments are fine; flow
collections, block scalars, anchors ... are not) needs it, and the node's Python, run with
``-S``, has no site-packages to find it in. The plugin imports it only for such a kubeconfig.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import logging
import py_compile
import shutil
import sys
import tempfile
import zipapp
import zipfile
from collections.abc import Iterable
from pathlib import Path

DEFAULT_INTERPRETER = "/usr/bin/python3 -S"
PACKAGES = ("cni", "istio_iptables")
VENDORED = ("yaml",)
ENTRY_POINT = "cni.plugin:main"

_FIXED_DATE = (2000, 1, 1, 0, 0, 0)

_MAIN = f"""\
# The istio-cni CNI plugin ({ENTRY_POINT}).
import sys

from cni.plugin import main

sys.exit(main())
"""

log = logging.getLogger("install-cni")


def package_dir(name: str) -> Path | None:
    """Where the importable package ``name`` lives, without importing it (None: not importable)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


# Compiled extension modules: zipimport cannot load them, and they are built for this machine's
# Python, not the node's. PyYAML's libyaml binding is one; without it PyYAML uses its pure-Python
# loader.
_EXTENSIONS = (".so", ".pyd")


def _ignore(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__" or n.endswith((".pyc", ".pyo", *_EXTENSIONS))]


def _stage(root: Path, packages: Iterable[str], vendored: Iterable[str]) -> list[str]:
    """Copies the packages into ``root``; returns the names of the vendored ones found."""
    for name in packages:
        src = package_dir(name)
        if src is None:
            raise RuntimeError(f"package {name!r} is not importable; cannot build the plugin executable")
        shutil.copytree(src, root / name, ignore=_ignore)
    found = []
    for name in vendored:
        src = package_dir(name)
        if src is None:
            continue
        shutil.copytree(src, root / name, ignore=_ignore)
        found.append(name)
    (root / "__main__.py").write_text(_MAIN, encoding="utf-8")
    return found


def _compile(root: Path) -> None:
    # zipimport cannot write __pycache__, so without these every plugin run would compile its
    # modules again. They sit beside their sources (the layout zipimport reads) and carry no
    # timestamp (unchecked hash). A node whose Python has another bytecode version ignores them
    # and compiles from source, which is slower but correct.
    for src in sorted(root.rglob("*.py")):
        rel = src.relative_to(root).as_posix()
        try:
            py_compile.compile(
                str(src),
                cfile=str(src.with_suffix(".pyc")),
                dfile=rel,
                doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
        except py_compile.PyCompileError as e:
            log.warning("not precompiling %s: %s", rel, e.msg)


def _zip(root: Path) -> bytes:
    """The staged tree as a zip: sorted names, fixed dates and modes, so the same sources always
    give the same bytes and the installer can tell a stale executable by comparing contents."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(path.relative_to(root).as_posix(), date_time=_FIXED_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes())
    return out.getvalue()


def build_archive(
    interpreter: str = DEFAULT_INTERPRETER,
    *,
    packages: Iterable[str] = PACKAGES,
    vendored: Iterable[str] = VENDORED,
    precompile: bool = True,
) -> bytes:
    """The executable's bytes: ``#!<interpreter>`` then a zip whose ``__main__`` runs the plugin."""
    if not interpreter.startswith("/") or "\n" in interpreter:
        raise ValueError(f"the plugin interpreter must be an absolute path (and options): {interpreter!r}")
    vendored = tuple(vendored)
    with tempfile.TemporaryDirectory(prefix="istio-cni-bundle-") as tmp:
        root = Path(tmp)
        found = _stage(root, packages, vendored)
        for name in vendored:
            if name not in found:
                log.warning("%s is not importable here: the plugin executable is built without it", name)
        if precompile:
            _compile(root)
        archive = _zip(root)
    # zipapp adds the shebang (and checks the archive has a __main__.py).
    out = io.BytesIO()
    zipapp.create_archive(io.BytesIO(archive), out, interpreter=interpreter)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cni.bundle", description="Write the istio-cni plugin executable (a zipapp)."
    )
    parser.add_argument("output", type=Path, help="file to write (made executable)")
    parser.add_argument(
        "--interpreter",
        default=DEFAULT_INTERPRETER,
        help=f"the node's Python, written into the shebang (default: {DEFAULT_INTERPRETER!r})",
    )
    parser.add_argument(
        "--no-vendor",
        action="store_true",
        help="leave PyYAML (kubeconfigs beyond plain YAML) out",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s\t%(message)s", stream=sys.stderr)
    data = build_archive(args.interpreter, vendored=() if args.no_vendor else VENDORED)
    args.output.write_bytes(data)
    args.output.chmod(0o755)
    log.info("wrote %s (%d bytes)", args.output, len(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
