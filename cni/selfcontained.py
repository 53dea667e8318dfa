"""The self-contained istio-cni plugin: its own CPython, libraries, dynamic loader, iptables and nft,
so that a node needs nothing but the kernel.

``build(out)`` stages a *template* of one version: Debian's python3.11 with the standard-library
modules the plugin can import (compiled bytecode in directories: no zip to read at every start),
this project's packages and the vendored PyYAML, ``xtables-nft-multi``,
``xtables-legacy-multi`` with their extension modules, and ``nft``, each with the shared libraries
it links and the loader. ``patchelf`` makes them use only each other: every library path is
relative (``$ORIGIN``), and the executables' ``PT_INTERP`` holds a placeholder of fixed length.

``install(template, bin_dir, host_bin_dir)`` writes a version into a node's CNI bin dir: the support
files under ``istio-cni.d/<version>/`` (the version is the template's content hash), with the
placeholder rewritten in place to the loader's path as the node sees it, then the launcher
``istio-cni`` last and atomically. The launcher is a script whose shebang starts the bundled
interpreter isolated from the environment (``-IS``). ``old_versions`` and ``remove_version`` let
the installer drop a version only when no running ADD can still use it: every run holds a shared
lock on its version's ``.lock`` from its first instruction.

``scripts/build-plugin --bin-dir DIR OUT`` writes into OUT exactly what install-cni would write into
DIR.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import modulefinder
import os
import py_compile
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("install-cni")

SUPPORT_DIR = "istio-cni.d"
LAUNCHER = "istio-cni"
LOCK = ".lock"
TEMPLATE_MARK = "TEMPLATE"  # a file at the root of an unrewritten template
# PT_INTERP of the bundled executables until install() rewrites it (in place, NUL-padded): long
# enough for any CNI bin dir a node uses. A shebang line must fit in 127 bytes on older kernels,
# so bin dirs longer than MAX_BIN_DIR are refused.
PLACEHOLDER = b"/istio-cni-self-contained-plugin-loader/" + b"x" * 215
MAX_BIN_DIR = 64
LOADER = "lib/ld-linux-x86-64.so.2"
PYTHON = "bin/python3"
SITE = "lib/site"
STDLIB = "lib/python3.11"

SYSTEM_PYTHON = "/usr/bin/python3.11"
SYSTEM_STDLIB = Path("/usr/lib/python3.11")
XTABLES_MODULES = Path("/usr/lib/x86_64-linux-gnu/xtables")
TOOLS = {
    "xtables-nft-multi": "/usr/sbin/xtables-nft-multi",
    "xtables-legacy-multi": "/usr/sbin/xtables-legacy-multi",
    "nft": "/usr/sbin/nft",
}
# The names the multi-call binaries answer to (argv[0]); the applier runs these.
TOOL_LINKS = {
    f"{fam}-{variant}-{kind}": f"xtables-{variant}-multi"
    for fam in ("iptables", "ip6tables")
    for variant in ("nft", "legacy")
    for kind in ("restore", "save")
}
PACKAGES = ("cni", "istio_iptables")
VENDORED = ("yaml",)
# Never imported by the plugin, whatever static analysis of its dependencies finds.
_NOT_NEEDED = (
    "tkinter", "idlelib", "test", "unittest", "lib2to3", "distutils", "ensurepip", "pydoc", "pydoc_data",
    "sqlite3", "_sqlite3", "readline", "curses", "_curses", "turtle", "turtledemo", "doctest", "pdb",
    "setuptools", "pip", "pytest", "_pytest", "hypothesis", "multiprocessing.popen_spawn_win32",
    "asyncio.windows_events", "asyncio.windows_utils",
    # PyYAML's libyaml binding (and libyaml): its pure-Python loader reads every kubeconfig.
    "yaml._yaml", "_yaml",
)  # fmt: skip
# Loaded by the interpreter before any import it could be found through, and the codecs that
# are looked up by name (open(..., encoding="utf-8-sig"), the idna codec of socket and ssl...),
# which no import statement names.
_ALWAYS = (
    "os", "encodings", "encodings.aliases", "encodings.utf_8", "encodings.utf_8_sig", "encodings.latin_1",
    "encodings.ascii", "encodings.idna", "encodings.punycode", "encodings.raw_unicode_escape",
    "encodings.unicode_escape", "encodings.utf_16", "encodings.utf_16_le", "encodings.utf_16_be",
    "encodings.utf_32", "encodings.charmap", "encodings.cp1252", "encodings.hex_codec",
    "encodings.base64_codec",
)  # fmt: skip
MAX_SIZE = 30 << 20


class BuildError(Exception):
    pass


# --- building --------------------------------------------------------------------------------


def _run(argv: list[str]) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise BuildError(f"{' '.join(argv)} failed: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


def _libraries(binary: str) -> dict[str, Path]:
    """The shared libraries ``binary`` needs (soname -> path), as the loader resolves them."""
    out: dict[str, Path] = {}
    for line in _run(["ldd", binary]).splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            out[parts[0]] = Path(parts[2])
    return out


# Where the plugin's imports start: its entry point and what it imports inside functions.
_ENTRY_MODULES = (
    "cni.launch", "cni.plugin", "cni.kube", "cni.pod", "istio_iptables.apply", "istio_iptables.nft_apply",
    "istio_iptables.routes", "istio_iptables.validation", "istio_iptables.nsexec", "istio_iptables.planner",
    "istio_iptables.render", "istio_iptables.nftables", "istio_iptables.state", "istio_iptables.netlink",
    "istio_iptables.config", "yaml", "ssl", "json", "encodings.idna",
)  # fmt: skip


def _modules(paths: list[Path]) -> dict[str, Path]:
    """Every module the plugin can import (a static superset of what any run imports: each
    import statement counts, also inside functions), by name -> file, found by modulefinder from
    its entry points, in the standard library and in ``paths``."""
    search = [*map(str, paths), str(SYSTEM_STDLIB), str(SYSTEM_STDLIB / "lib-dynload")]
    finder = modulefinder.ModuleFinder(path=search, excludes=list(_NOT_NEEDED))
    for name in (*_ALWAYS, *_ENTRY_MODULES):
        try:
            finder.import_hook(name)
        except ImportError as e:
            raise BuildError(f"cannot trace the imports of {name}: {e}") from None
    return {
        name: Path(file)
        for name, module in finder.modules.items()
        if (file := getattr(module, "__file__", None))
    }


def _copy_file(src: Path, dst: Path, mode: int = 0o644) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    dst.chmod(mode)


def _compile(src: Path, dst: Path, display: str) -> None:
    """Sourceless bytecode (``dst``), the layout Python imports from a directory without sources."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    py_compile.compile(
        str(src), cfile=str(dst), dfile=display, doraise=True,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )  # fmt: skip


def _package_dir(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise BuildError(f"package {name!r} is not importable here; cannot build the plugin")
    return Path(next(iter(spec.submodule_search_locations)))


def _stage_python(root: Path, libs: dict[str, Path]) -> None:
    _copy_file(Path(SYSTEM_PYTHON), root / PYTHON, 0o755)
    libs.update(_libraries(SYSTEM_PYTHON))
    # Our packages whole (they are small and every module may be run); of the vendored ones and
    # the standard library, what the plugin's imports reach.
    ours = [_package_dir(name) for name in PACKAGES]
    vendored = [_package_dir(name) for name in VENDORED]
    for src in ours:
        for py in sorted(src.rglob("*.py")):
            rel = py.relative_to(src.parent)
            _compile(py, (root / SITE / rel).with_suffix(".pyc"), rel.as_posix())
    for file in sorted(set(_modules([p.parent for p in (*ours, *vendored)]).values())):
        if file.is_relative_to(SYSTEM_STDLIB):
            rel, dest = file.relative_to(SYSTEM_STDLIB), root / STDLIB
        elif any(file.is_relative_to(v) for v in vendored):
            top = next(v for v in vendored if file.is_relative_to(v))
            rel, dest = file.relative_to(top.parent), root / SITE
        else:
            continue
        if file.suffix == ".so":
            _copy_file(file, dest / rel, 0o755)
            libs.update(_libraries(str(file)))
        elif file.suffix == ".py":
            _compile(file, (dest / rel).with_suffix(".pyc"), rel.as_posix())
    # getpath's landmarks: the standard library (os) and the extension-module directory.
    (root / STDLIB / "lib-dynload").mkdir(parents=True, exist_ok=True)
    if not (root / STDLIB / "os.pyc").exists():
        raise BuildError("the standard library's os module was not staged")


def _stage_tools(root: Path, libs: dict[str, Path]) -> None:
    sbin = root / "sbin"
    for name, src in TOOLS.items():
        if not Path(src).exists():
            raise BuildError(f"{src} is missing: install iptables and nftables to build the plugin")
        _copy_file(Path(src), sbin / name, 0o755)
        libs.update(_libraries(src))
    for link, target in TOOL_LINKS.items():
        (sbin / link).symlink_to(target)
    for module in sorted(XTABLES_MODULES.glob("*.so")):
        _copy_file(module, root / "lib" / "xtables" / module.name, 0o644)
        libs.update(_libraries(str(module)))


def _patch(root: Path) -> None:
    """Make every ELF file use only the bundle: relative library paths and the placeholder loader.

    The paths are DT_RPATH, not DT_RUNPATH: the loader searches DT_RPATH before LD_LIBRARY_PATH,
    so a runtime's environment that names the node's library directories cannot reach in."""
    patchelf = shutil.which("patchelf")
    if patchelf is None:
        raise BuildError("patchelf is not installed (apt-get install patchelf)")
    placeholder = PLACEHOLDER.decode()
    for exe in [root / PYTHON, *(root / "sbin" / n for n in TOOLS)]:
        _run(
            [
                patchelf,
                "--set-interpreter",
                placeholder,
                "--force-rpath",
                "--set-rpath",
                "$ORIGIN/../lib",
                str(exe),
            ]
        )
    for lib in sorted((root / "lib").glob("*.so*")):
        if lib.name != Path(LOADER).name:
            _run([patchelf, "--force-rpath", "--set-rpath", "$ORIGIN", str(lib)])
    for ext in sorted((root / STDLIB / "lib-dynload").glob("*.so")):
        _run([patchelf, "--force-rpath", "--set-rpath", "$ORIGIN/../..", str(ext)])
    for module in sorted((root / "lib" / "xtables").glob("*.so")):
        _run([patchelf, "--force-rpath", "--set-rpath", "$ORIGIN/..", str(module)])


def _packages_of(paths: Iterable[Path]) -> dict[str, str]:
    """Debian package -> version for the files the bundle was built from."""
    owners: set[str] = set()
    for path in paths:
        for candidate in {str(path), str(path).replace("/usr/lib/", "/lib/", 1), os.path.realpath(path)}:
            p = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True, check=False)
            if p.returncode == 0:
                owners.update(line.split(":", 1)[0].split(",")[0].strip() for line in p.stdout.splitlines())
                break
    versions: dict[str, str] = {}
    for pkg in sorted(owners):
        out = _run(["dpkg-query", "-W", "-f=${Version}", pkg])
        versions[pkg] = out.strip()
    return versions


def _stage_licences(root: Path, sources: list[Path]) -> dict[str, str]:
    versions = _packages_of(sources)
    for pkg in versions:
        copyright_file = Path("/usr/share/doc") / pkg.split(":")[0] / "copyright"
        if copyright_file.exists():
            _copy_file(copyright_file, root / "share" / "licenses" / pkg.split(":")[0] / "copyright")
    own = Path(__file__).resolve().parent.parent
    for name in ("LICENSE", "COPYING"):
        if (own / name).exists():
            _copy_file(own / name, root / "share" / "licenses" / "istio-iptables-py" / name)
    lines = [
        "The istio-cni self-contained plugin, built from these Debian packages (their corresponding",
        "source is Debian's source package of the same version: apt-get source PACKAGE=VERSION).",
        "",
        *(f"{pkg}\t{version}" for pkg, version in versions.items()),
    ]
    (root / "share" / "MANIFEST").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return versions


def _content_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            h.update(f"L {rel} {os.readlink(path)}\n".encode())
        elif path.is_file():
            h.update(f"F {rel} {stat.S_IMODE(path.stat().st_mode):o}\n".encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def build(out: Path) -> str:
    """Stage a template into the new directory ``out``; returns its version (content hash)."""
    if out.exists():
        raise BuildError(f"{out} exists")
    with tempfile.TemporaryDirectory(prefix="istio-cni-build-") as tmp:
        root = Path(tmp) / "template"
        libs: dict[str, Path] = {}
        _stage_python(root, libs)
        _stage_tools(root, libs)
        loader = Path("/lib64/ld-linux-x86-64.so.2").resolve()
        _copy_file(loader, root / LOADER, 0o755)
        for soname, path in sorted(libs.items()):
            if soname != Path(LOADER).name:
                _copy_file(path.resolve(), root / "lib" / soname, 0o644)
        _patch(root)
        _stage_licences(root, [Path(SYSTEM_PYTHON), *map(Path, TOOLS.values()), loader, *libs.values()])
        version = _content_hash(root)
        (root / TEMPLATE_MARK).write_text(version + "\n", encoding="utf-8")
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        if size > MAX_SIZE:
            raise BuildError(f"the plugin is {size} bytes, more than {MAX_SIZE}")
        shutil.copytree(root, out, symlinks=True)
    log.info("built the self-contained plugin %s in %s (%d bytes)", version, out, size)
    return version


# --- installing --------------------------------------------------------------------------------


def template_version(template: Path) -> str:
    try:
        return (template / TEMPLATE_MARK).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise BuildError(f"{template} is not a built plugin template: {e.strerror}") from None


def launcher_text(host_bin_dir: str, version: str) -> bytes:
    base = f"{host_bin_dir.rstrip('/')}/{SUPPORT_DIR}/{version}"
    return (
        f"#!{base}/{PYTHON} -IS\n"
        "# istio-cni, the chained CNI plugin: its own interpreter, libraries and tools, version "
        f"{version}.\n"
        "import sys\n"
        f"sys.path.insert(0, {base + '/' + SITE!r})\n"
        "from cni.launch import main\n"
        f"main({base!r})\n"
    ).encode()


def check_bin_dir(host_bin_dir: str) -> None:
    if (
        not host_bin_dir.startswith("/")
        or len(host_bin_dir.rstrip("/")) > MAX_BIN_DIR
        or "\n" in host_bin_dir
    ):
        raise BuildError(
            f"CNI bin dir {host_bin_dir!r}: must be an absolute path of at most {MAX_BIN_DIR} characters"
            " (the plugin's shebang line must fit the kernel's limit)"
        )


def _rewrite(path: Path, loader: bytes) -> None:
    data = path.read_bytes()
    if data.count(PLACEHOLDER) != 1:
        raise BuildError(f"{path}: the loader placeholder is not there exactly once")
    path.write_bytes(data.replace(PLACEHOLDER, loader + b"\0" * (len(PLACEHOLDER) - len(loader))))


def install(template: Path, bin_dir: Path, host_bin_dir: str) -> tuple[str, bool]:
    """Put the template's version into ``bin_dir`` (``host_bin_dir`` as the node sees it) and the
    launcher last, atomically. Returns (version, whether anything was written)."""
    check_bin_dir(host_bin_dir)
    version = template_version(template)
    final = bin_dir / SUPPORT_DIR / version
    launcher = launcher_text(host_bin_dir, version)
    wrote = False
    if not (final / PYTHON).exists() or not (final / LOCK).exists():
        staging = bin_dir / SUPPORT_DIR / f".{version}.{os.getpid()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(template, staging, symlinks=True)
        (staging / TEMPLATE_MARK).unlink()
        loader = f"{host_bin_dir.rstrip('/')}/{SUPPORT_DIR}/{version}/{LOADER}".encode()
        for exe in [staging / PYTHON, *(staging / "sbin" / n for n in TOOLS)]:
            _rewrite(exe, loader)
        (staging / LOCK).write_bytes(b"")
        shutil.rmtree(final, ignore_errors=True)
        os.rename(staging, final)
        wrote = True
    path = bin_dir / LAUNCHER
    try:
        current = path.read_bytes()
    except OSError:
        current = None
    if current != launcher:
        from cni.install.files import atomic_write

        atomic_write(path, launcher, 0o755)
        wrote = True
    return version, wrote


def installed_versions(bin_dir: Path) -> list[str]:
    try:
        return sorted(
            p.name for p in (bin_dir / SUPPORT_DIR).iterdir() if p.is_dir() and not p.name.startswith(".")
        )
    except FileNotFoundError:
        return []


def in_use(bin_dir: Path, version: str) -> bool:
    """Whether a plugin run holds ``version`` (its shared lock on the version's .lock)."""
    import fcntl

    try:
        fd = os.open(bin_dir / SUPPORT_DIR / version / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def remove_version(bin_dir: Path, version: str) -> bool:
    """Remove ``version`` unless a run still holds it; True when removed (or gone)."""
    if in_use(bin_dir, version):
        return False
    target = bin_dir / SUPPORT_DIR / version
    doomed = bin_dir / SUPPORT_DIR / f".{version}.{os.getpid()}.old"
    try:
        os.rename(target, doomed)
    except FileNotFoundError:
        return True
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def remove_all(bin_dir: Path) -> None:
    """Every version and the support directory (uninstall); the launcher is the caller's."""
    shutil.rmtree(bin_dir / SUPPORT_DIR, ignore_errors=True)


# --- scripts/build-plugin ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/build-plugin",
        description="Build the self-contained istio-cni plugin and write into OUT exactly what "
        "install-cni writes into a node's CNI bin dir DIR (OUT/istio-cni and OUT/istio-cni.d/); "
        "or, with --template-only, the template install-cni installs from (PLUGIN_TEMPLATE).",
    )
    parser.add_argument("--bin-dir", help="the node's CNI bin dir the files are for")
    parser.add_argument("--template-only", type=Path, metavar="DIR", help="write only the template, to DIR")
    parser.add_argument("out", type=Path, nargs="?", help="directory to write (created if needed)")
    args = parser.parse_args(argv)
    if (args.template_only is None) == (args.out is None) or (args.out is not None and not args.bin_dir):
        parser.error("give --bin-dir DIR OUT, or --template-only DIR")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s\t%(message)s", stream=sys.stderr)
    try:
        if args.template_only is not None:
            version = build(args.template_only)
            out, bin_dir = args.template_only, None
        else:
            check_bin_dir(args.bin_dir)
            with tempfile.TemporaryDirectory(prefix="istio-cni-template-") as tmp:
                template = Path(tmp) / "template"
                version = build(template)
                args.out.mkdir(parents=True, exist_ok=True)
                install(template, args.out, args.bin_dir)
            out, bin_dir = args.out, args.bin_dir
    except BuildError as e:
        log.error("%s", e)
        return 1
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and not p.is_symlink())
    print(json.dumps({"version": version, "bin_dir": bin_dir, "bytes": total}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
