"""What each per-pod command may not import, checked on the real command lines, and the start-up
measures' fallbacks (istio_iptables/startup.py).

Every command runs as a node runs it, under ``python -X importtime``: istio-iptables with the
injector's arguments (deploy/examples/meshed-pod-init.yaml), as a dry run and applying in a fresh
namespace, istio-clean-iptables after that apply, and the self-contained istio-cni plugin
(scripts/build-plugin) for an ADD with a prevResult and a DEL. The report of ``-X importtime``
lists every module once, where it was first imported, so a failure names the module and the
chain of modules that imported it. What the interpreter's ``site`` imports is not the command's
and is left out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
PYTHON = str(BIN / "python") if (BIN / "python").exists() else sys.executable

# What importing each module would cost where the budget forbids it (measured with the command's
# other imports loaded; istio_iptables/startup.py has the wall-clock figures).
WHY = {
    "typing": "2.4-5 ms; records and TYPE_CHECKING come from istio_iptables.startup",
    "dataclasses": "7-9 ms (inspect, ast, dis, tokenize); records are startup.NamedTuple",
    "inspect": "5-8 ms; only startup's record signature loads it, on demand",
    "ast": "2-3 ms, with inspect",
    "tokenize": "with inspect or traceback",
    "logging": "5-8 ms; the commands log through istio_iptables.logsink",
    "traceback": "2.4-5 ms; the plugin formats one only on an internal error",
    "argparse": "1.3-4 ms; istio-iptables reads its arguments itself",
    "click": "19-20 ms; istio-iptables loads it only for --help and usage errors",
    "subprocess": "2.7-6 ms (signal, threading, selectors, locale); the executor uses posix_spawn",
    "threading": "0.6 ms, with subprocess or logging",
    "signal": "0.4-1.5 ms (with enum); signal numbers come from startup (_signal)",
    "ctypes": "0.7-1.7 ms; libc is bound through startup.libc_function (_ctypes)",
    "socket": "2.3-2.8 ms (enum, selectors); netlink uses startup.socket (_socket)",
    "selectors": "with socket",
    "re": "2.4 ms (with enum); the parsers are written by hand",
    "enum": "1-1.5 ms; enumerations are startup.Enum",
    "json": "3.6 ms (with re and enum); istio-iptables loads it only for --log_as_json",
    "shlex": "2.5-2.8 ms (with re); only read rules are split with it",
    "contextlib": "0.4 ms",
    "datetime": "0.8-1 ms; logsink.rfc3339 writes the time stamp",
    "http.client": "18 ms (email); the kube client sends its own GET",
    "email": "with http.client",
    "ssl": "a DEL makes no request",
    "ipaddress": "1 ms; read only where an address is parsed",
    "warnings": "with typing or ssl",
    "shutil": "compression modules; executor.which finds commands",
    "tempfile": "with shutil and random",
    "pathlib": "1-2 ms; paths are strings",
    "asyncio": "an event loop, never needed",
    "pyroute2": "a netlink library (about 100 ms); netlink.py sends the requests",
    "unittest": "test code",
    "yaml": "7-10 ms; the kube client loads PyYAML only for kubeconfigs that need it",
    "cni.kube": "a DEL reads no Pod",
    "cni.pod": "a DEL decides about no Pod",
    "istio_iptables.apply": "a DEL applies nothing",
    "istio_iptables.config": "a DEL plans nothing",
}

_ALWAYS = (
    "typing", "dataclasses", "inspect", "ast", "tokenize", "logging", "traceback", "argparse", "click",
    "subprocess", "threading", "signal", "ctypes", "contextlib", "datetime", "yaml", "http.client",
    "email", "shutil", "tempfile", "pathlib", "asyncio", "pyroute2", "unittest",
)  # fmt: skip
_NOT_ON_DEL = (
    "socket", "selectors", "ssl", "warnings", "ipaddress", "shlex",
    "cni.kube", "cni.pod", "istio_iptables.apply", "istio_iptables.config",
)  # fmt: skip
# Per command: what it must not import. ``re`` and ``enum`` are loaded on the CNI paths anyway
# (json imports them, and ssl on an ADD, which also brings socket), and on istio-clean-iptables
# (shlex splits the rules it reads); istio-iptables has neither.
BUDGETS: dict[str, tuple[str, ...]] = {
    "istio-iptables --dry-run": (*_ALWAYS, "re", "enum", "json", "shlex", "socket", "selectors", "warnings"),
    "istio-iptables": (*_ALWAYS, "re", "enum", "json", "shlex", "socket", "selectors", "warnings"),
    "istio-clean-iptables": (*_ALWAYS, "json", "socket", "selectors", "warnings"),
    "istio-cni ADD": (*_ALWAYS, "shlex"),
    "istio-cni DEL": (*_ALWAYS, *_NOT_ON_DEL),
    # The DaemonSet's long-running installer starts once per node: logging (its threads),
    # argparse, http.server and typing are its own; a CLI framework or a netlink library is not.
    "install-cni": ("click", "pyroute2", "asyncio", "unittest", "yaml"),
}


# --- reading -X importtime ------------------------------------------------------------------------


def import_chains(report: str) -> dict[str, list[str]]:
    """Every module in an ``-X importtime`` report -> the modules that imported it, the nearest
    first (empty: the program itself). The report lists a module after the ones it imported,
    indented by two spaces per level."""
    rows: list[tuple[int, str]] = []
    for line in report.splitlines():
        if not line.startswith("import time:") or line.endswith("imported package"):
            continue
        field = line.split("|", 2)[2]
        name = field.strip()
        rows.append(((len(field) - len(field.lstrip()) - 1) // 2, name))
    chains: dict[str, list[str]] = {}
    for i, (depth, name) in enumerate(rows):
        chain = []
        for later_depth, later in rows[i + 1 :]:
            if later_depth < depth:
                chain.append(later)
                depth = later_depth
                if depth == 0:
                    break
        chains.setdefault(name, chain)
    return chains


def over_budget(command: str, report: str) -> list[str]:
    """What ``command``'s report shows it imported against its budget, each with who imported it."""
    chains = import_chains(report)
    assert chains, f"no -X importtime report for {command}"
    found = []
    for name in BUDGETS[command]:
        chain = chains.get(name)
        if chain is None or "site" in chain or name == "site":
            continue
        via = " <- ".join(chain) if chain else "the program itself"
        found.append(f"{name} (imported by {via}): {WHY.get(name, '')}")
    return found


def check(command: str, p: subprocess.CompletedProcess[str]) -> None:
    bad = over_budget(command, p.stderr)
    assert not bad, f"{command} imported what its budget forbids:\n  " + "\n  ".join(bad)


def test_a_forbidden_import_is_named_with_its_importers() -> None:
    report = "\n".join(
        [
            "import time: self [us] | cumulative | imported package",
            "import time:       100 |        100 |       _typing",
            "import time:      2000 |       2100 |     typing",
            "import time:       300 |       2400 |   istio_iptables.config",
            "import time:        10 |         10 |   re",
            "import time:       500 |       2910 | istio_iptables.cli",
            "import time:        20 |         20 |   json",
            "import time:        30 |         50 | site",
        ]
    )
    assert import_chains(report)["typing"] == ["istio_iptables.config", "istio_iptables.cli"]
    bad = over_budget("istio-iptables --dry-run", report)
    assert [b.split(":")[0] for b in bad] == [
        "typing (imported by istio_iptables.config <- istio_iptables.cli)",
        "re (imported by istio_iptables.cli)",
    ]  # json came through site: not the command's


# --- istio-iptables and istio-clean-iptables ---------------------------------------------------


@pytest.fixture(scope="module")
def injector_args() -> list[str]:
    """istio-init's arguments exactly as deploy/examples/meshed-pod-init.yaml gives them."""
    import yaml

    pod = yaml.safe_load((REPO / "deploy" / "examples" / "meshed-pod-init.yaml").read_text())
    (init,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "istio-init"]
    return [str(a) for a in init["args"]]


def _command(script: str, args: list[str], netns: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [PYTHON, "-X", "importtime", str(BIN / script), *args]
    if netns is not None:  # inside the pod's namespace, as the init container runs
        argv = ["nsenter", f"--net={netns}", "--", *argv]
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    p = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_istio_iptables_dry_run(injector_args: list[str]) -> None:
    check("istio-iptables --dry-run", _command("istio-iptables", [*injector_args, "--dry-run"]))


@pytest.fixture
def pod_netns() -> Iterator[str]:
    """A fresh namespace with an IPv4 address on eth0, as a pod has when istio-init runs."""
    name = f"budget-{os.getpid()}-{os.urandom(3).hex()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for argv in (
            ["link", "set", "lo", "up"],
            ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
            ["addr", "add", "10.244.0.5/24", "dev", "eth0"],
            ["link", "set", "eth0", "up"],
        ):
            subprocess.run(["ip", "-n", name, *argv], check=True)
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.kernel
def test_istio_iptables_apply_and_istio_clean_iptables(injector_args: list[str], pod_netns: str) -> None:
    applied = _command("istio-iptables", injector_args, netns=pod_netns)
    assert "iptables rules are in place" in applied.stderr
    check("istio-iptables", applied)
    cleaned = _command("istio-clean-iptables", injector_args, netns=pod_netns)
    assert "cleanup done" in cleaned.stderr
    check("istio-clean-iptables", cleaned)


# --- istio-cni: the self-contained plugin --------------------------------------------------------


@pytest.fixture(scope="module")
def plugin(plugin_template: Path) -> Iterator[list[str]]:
    """The self-contained plugin installed as install-cni installs it, as the argv that runs its
    launcher with ``-X importtime`` added to the interpreter's options in its shebang."""
    from cni import selfcontained

    bin_dir = Path(tempfile.mkdtemp(prefix="cni-", dir="/tmp"))  # short enough for the shebang
    try:
        selfcontained.install(plugin_template, bin_dir, str(bin_dir))
        launcher = bin_dir / selfcontained.LAUNCHER
        interpreter, *options = launcher.read_text().splitlines()[0][2:].split()
        yield [interpreter, *options, "-X", "importtime", str(launcher)]
    finally:
        shutil.rmtree(bin_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The benchmark's API server (tests.support.apiserver, as its own process) with a meshed Pod
    per interception mode, and the kubeconfig install-cni writes for it."""
    from bench import fixtures
    from tests.support import apiserver
    from tests.support.pki import make_pki

    work = tmp_path_factory.mktemp("api")
    pki = make_pki(work / "pki")
    token = fixtures.new_token()
    pods = {
        "default": fixtures.meshed_pod("default"),
        "tproxy": fixtures.meshed_pod("tproxy", {"sidecar.istio.io/interceptionMode": "TPROXY"}),
    }
    server, port = apiserver.spawn(pki, token, pods, work, python=PYTHON)
    try:
        path = work / "kubeconfig"
        fixtures.write_kubeconfig(path, f"https://127.0.0.1:{port}", pki.ca_cert, token)
        yield path
    finally:
        server.terminate()
        server.wait(10)


def _cni(
    plugin: list[str], command: str, kubeconfig: Path, netns: str, pod: str
) -> subprocess.CompletedProcess[str]:
    from bench import fixtures

    conf = fixtures.cni_config(kubeconfig, netns)
    env = fixtures.cni_env(command, netns, pod, fixtures.container_id(), "/opt/cni/bin")
    p = subprocess.run(plugin, input=json.dumps(conf), capture_output=True, text=True, env=env, check=False)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    return p


@pytest.mark.kernel
@pytest.mark.parametrize("pod", ["default", "tproxy"], ids=["REDIRECT", "TPROXY"])
def test_istio_cni_add_and_del(plugin: list[str], kubeconfig: Path, pod_netns: str, pod: str) -> None:
    added = _cni(plugin, "ADD", kubeconfig, pod_netns, pod)
    assert "installed" in added.stderr and "capture rules" in added.stderr, added.stderr[-3000:]
    check("istio-cni ADD", added)
    check("istio-cni DEL", _cni(plugin, "DEL", kubeconfig, pod_netns, pod))


def test_install_cni() -> None:
    p = subprocess.run(
        [PYTHON, "-X", "importtime", "-c", "from cni.install import main; raise SystemExit(main(['--help']))"],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    assert p.returncode == 0 and "usage:" in p.stdout, p.stderr[-3000:]
    check("install-cni", p)


# --- the measures' fallbacks -----------------------------------------------------------------------


def _run_python(code: str) -> None:
    p = subprocess.run([PYTHON, "-I", "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
    assert p.returncode == 0, p.stderr


def test_libc_is_bound_without_the_ctypes_package() -> None:
    _run_python(
        "import errno, os, sys\n"
        "from istio_iptables import netns as nn, nsexec, startup\n"
        "setns = startup.libc_function('setns')\n"
        "assert setns(-1, nn.CLONE_NEWNET) == -1 and startup.get_errno() == errno.EBADF\n"
        "assert nsexec.libc_function is startup.libc_function\n"
        "fd = os.open('/proc/self/ns/net', os.O_RDONLY)\n"
        "nn.setns(fd)  # entering the namespace it is in already works (as root)\n"
        "assert 'ctypes' not in sys.modules, 'ctypes imported'\n"
        "try:\n"
        "    startup.libc_function('no_such_function_here')\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('bound a function libc lacks')\n"
    )


def test_libc_falls_back_to_ctypes() -> None:
    _run_python(
        "import ctypes, errno, sys\n"
        "sys.modules['_ctypes'] = None  # import _ctypes fails from here on\n"
        "from istio_iptables import startup\n"
        "assert startup.libc_function('setns')(-1, 0) == -1 and startup.get_errno() == errno.EBADF\n"
    )


def test_records_fall_back_to_typing() -> None:
    _run_python(
        "import _collections, sys, typing\n"
        "del _collections._tuplegetter\n"
        "from istio_iptables import startup\n"
        "assert startup.NamedTuple is typing.NamedTuple\n"
        "from istio_iptables.config import Config\n"
        "from istio_iptables.planner import plan\n"
        "assert plan(Config()).v4.rules and Config()._replace(proxy_port=1).proxy_port == 1\n"
    )


def test_socket_and_signal_fall_back_to_their_modules() -> None:
    _run_python(
        "import signal, socket, sys\n"
        "sys.modules['_socket'] = sys.modules['_signal'] = None\n"
        "from istio_iptables import netlink, startup\n"
        "from istio_iptables.executor import RealExecutor\n"
        "assert startup.socket is socket and startup.SIGKILL is signal.SIGKILL\n"
        "assert '127.0.0.1' in netlink.local_addresses()\n"
        "assert RealExecutor().run(['true']).ok\n"
    )


def test_exit_now_flushes_and_falls_back_to_sys_exit() -> None:
    for prelude in ("", "del os._exit\n"):
        p = subprocess.run(
            [PYTHON, "-I", "-c", f"import os, sys\n{prelude}from istio_iptables.startup import exit_now\n"
             "sys.stdout.write('out'); sys.stderr.write('err'); exit_now(3)\n"],
            capture_output=True, text=True, cwd=REPO, check=False,
        )  # fmt: skip
        assert (p.returncode, p.stdout, p.stderr) == (3, "out", "err")
