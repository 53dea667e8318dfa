"""``istio-cni`` fed what a hostile or broken runtime, pod or configuration could hand it: every
input gets its CNI error code (never 999, "internal error", nor a traceback), stdout holds
nothing but one JSON document, and no value can forge a line of the plugin's log."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cni.plugin import run
from cni.protocol import COMMANDS, SUPPORTED_VERSIONS
from istio_iptables import logsink
from tests.support.apiserver import KubeAPIServer
from tests.support.plugin import PluginRun, k8s_args, netconf, prev_result, run_plugin
from tests.support.pods import meshed_pod

TOKEN = "t0k3n-for-hostile-input"
NS = "shop"
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"
# One record of the plugin's log: time, level, "istio-cni", maybe a scope, then the message; no
# field holds a tab and no line anything a terminal would act on.
LOG_LINE = re.compile(rf"{STAMP}\t(debug|info|warn|error)\tistio-cni(\t[^\t]*)?\t[^\t]*")
# What a pod could put in its name to forge a record, and to colour the terminal.
FORGED = "\n2026-01-01T00:00:00Z\tinfo\tforged"
ANSI = "\x1b[31m"
# The codes a runtime may get back (SPEC.md, "Error codes"), 999 not among them.
CODES = {1, 2, 3, 4, 5, 6, 7, 8, 11, 50, 51}


def one_json(stdout: str) -> Any:
    """stdout holds exactly one JSON document and nothing else."""
    doc = json.loads(stdout)
    assert stdout == json.dumps(doc, separators=(",", ":")) + "\n", stdout
    return doc


def err(run: PluginRun, code: int) -> dict[str, Any]:
    assert run.code == 1, run.stderr
    doc = one_json(run.stdout)
    assert doc["code"] == code, doc
    assert "Traceback" not in run.stderr
    return doc


def assert_log_lines(text: str) -> list[str]:
    """Every line is one record of the plugin's log; returns the messages."""
    lines = text.splitlines()
    for line in lines:
        assert LOG_LINE.fullmatch(line), f"not one log record: {line!r}"
    return [line.rsplit("\t", 1)[1] for line in lines]


# --- decoding ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stdin",
    [
        b"[" * 100_000,
        b'{"cniVersion":"1.0.0","name":"n","x":' + b"[" * 500 + b"]" * 500 + b"}",
        b'{"cniVersion":"1.0.0","name":"n","mtu":' + b"9" * 5000 + b"}",
        b'{"cniVersion":"1.0.0","name":"n","log_file":"/tmp/\\udc80"}',
        b'{"cniVersion":"1.0.0","name":"\xff"}',
    ],
    ids=["brackets", "nested", "digits", "surrogate", "not-utf8"],
)
def test_undecodable_configuration_is_error_6(exe: Path, sandbox: str, stdin: bytes) -> None:
    err(run_plugin(exe, "ADD", stdin, netns=sandbox), 6)


@pytest.mark.parametrize("command", ["CHECK", "GC", "STATUS"])
def test_versions_of_thousands_of_digits_are_error_1(exe: Path, sandbox: str, command: str) -> None:
    conf = {"cniVersion": "1." + "9" * 5000 + ".0", "name": "n"}
    doc = err(run_plugin(exe, command, conf, netns=sandbox), 1)
    assert len(doc["details"]) < 300


# --- paths and names the OS or the API could not take ---------------------------------------


def test_kubeconfig_path_with_a_nul_is_error_7(exe: Path, sandbox: str) -> None:
    conf = netconf(None, kubernetes={"kubeconfig": "/etc/cni/net.d/kc\0x"})
    doc = err(run_plugin(exe, "ADD", conf, netns=sandbox, args=k8s_args(NS, "web-0")), 7)
    assert "kubernetes.kubeconfig" in doc["msg"]
    # STATUS cannot use it either; DEL does not need it.
    err(run_plugin(exe, "STATUS", {**conf, "cniVersion": "1.1.0"}), 50)
    assert run_plugin(exe, "DEL", conf, netns=sandbox).code == 0


def test_log_file_path_with_a_nul_is_a_warning(exe: Path, kubeconfig: Path, sandbox: str) -> None:
    conf = netconf(kubeconfig, log_file="/var/log/istio-cni\0.log", exclude_namespaces=[NS])
    run = run_plugin(exe, "ADD", conf, netns=sandbox, args=k8s_args(NS, "web-0"))
    assert (run.code, one_json(run.stdout)) == (0, {"cniVersion": "1.0.0", "dns": {}})
    assert "cannot open log file" in assert_log_lines(run.stderr)[0]


def test_pod_name_that_is_not_utf8_is_error_4(
    exe: Path, kubeconfig: Path, sandbox: str, api: KubeAPIServer
) -> None:
    # The byte 0xff reaches os.environ as "\udcff"; the API request could not carry it.
    run = run_plugin(exe, "ADD", netconf(kubeconfig), netns=sandbox, args=k8s_args(NS, "web-\udcff"))
    assert "K8S_POD_NAME" in err(run, 4)["details"]


def test_annotation_of_thousands_of_digits_is_named(
    exe: Path, kubeconfig: Path, sandbox: str, api: KubeAPIServer
) -> None:
    annotation = "traffic.sidecar.istio.io/excludeOutboundPorts"
    api.add_pod(meshed_pod("huge-ports", NS, annotations={annotation: "9" * 5000}))
    run = run_plugin(exe, "ADD", netconf(kubeconfig), netns=sandbox, args=k8s_args(NS, "huge-ports"))
    assert run.code == 1 and "Traceback" not in run.stderr
    doc = one_json(run.stdout)
    assert annotation in doc["msg"] and "internal error" not in doc["msg"], doc
    assert "port out of range" in doc["details"]


# --- standard streams ----------------------------------------------------------------------


def run_with_closed(exe: Path, fd: int, command: str) -> subprocess.CompletedProcess[bytes]:
    """The plugin started with ``fd`` closed, as a careless runtime could start it."""
    closer = f"import os, sys; os.close({fd}); os.execv(sys.argv[1], sys.argv[1:])"
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "a",
        "CNI_NETNS": "/x",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/",
    }
    return subprocess.run([sys.executable, "-c", closer, str(exe)], env=env, capture_output=True, check=False)


def test_closed_stdin_is_an_io_failure(exe: Path) -> None:
    p = run_with_closed(exe, 0, "ADD")
    assert p.returncode == 1
    assert one_json(p.stdout.decode())["code"] == 5
    assert "Traceback" not in p.stderr.decode()
    # VERSION does not read stdin.
    assert run_with_closed(exe, 0, "VERSION").returncode == 0


def test_closed_stdout_fails_without_a_traceback(exe: Path) -> None:
    p = run_with_closed(exe, 1, "VERSION")
    assert p.returncode == 1
    assert assert_log_lines(p.stderr.decode()) == ["cannot write the result to stdout: stdout is closed"]


def test_closed_stderr_changes_nothing(exe: Path) -> None:
    p = run_with_closed(exe, 2, "VERSION")
    assert p.returncode == 0
    assert one_json(p.stdout.decode())["supportedVersions"] == list(SUPPORTED_VERSIONS)


def test_full_stdout_fails_without_a_traceback(exe: Path) -> None:
    with open("/dev/full", "w") as full:
        p = subprocess.run(
            [str(exe)], env={"CNI_COMMAND": "VERSION"}, stdout=full, stderr=subprocess.PIPE, check=False
        )
    assert p.returncode == 1
    (message,) = assert_log_lines(p.stderr.decode())
    assert message.startswith("cannot write the result to stdout: ")


# --- log forging ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("namespace", "name"),
    [(NS, f"web{FORGED}{ANSI}"), (f"{NS}{FORGED}{ANSI}\u2028\x85\x7f", "web")],
    ids=["name", "namespace"],
)
def test_pod_names_cannot_forge_log_lines(
    exe: Path, kubeconfig: Path, sandbox: str, tmp_path: Path, namespace: str, name: str
) -> None:
    log = tmp_path / "istio-cni.log"
    conf = netconf(kubeconfig, log_file=str(log), exclude_namespaces=[namespace])
    run = run_plugin(exe, "ADD", conf, netns=sandbox, args=k8s_args(namespace, name))
    assert run.code == 0, run.stdout
    for text in (run.stderr, log.read_text()):
        (line,) = text.splitlines()
        assert LOG_LINE.fullmatch(line), line
        scope = line.split("\t")[3]
        assert scope == "pod=" + logsink.escape_controls(f"{namespace}/{name}")
        assert "\\n2026-01-01T00:00:00Z\\tinfo\\tforged\\x1b[31m" in scope
        assert line.endswith("\tpod namespace excluded, passing through")


# --- everything at once, in-process --------------------------------------------------------


# Each example is a plausible call with a fault or two, or with none: hostile values everywhere
# at once would all be stopped by the first check, and the paths behind it never reached.
_faults = st.lists(st.booleans(), max_size=2).map(sum)

# Environment values as the kernel hands them over: bytes without NUL, which os.environ decodes
# with surrogateescape (so a byte that is not UTF-8 arrives as a lone surrogate).
_env_bytes = st.binary(max_size=24).map(lambda b: os.fsdecode(b.replace(b"\0", b"")))
_nasty = st.sampled_from(
    [FORGED, ANSI, "9" * 5000, "a" * 300, "\u2028", "\x85", "\udcff", "..", "/", "-", "=", ";", " ", ""]
)
_env_text = st.one_of(_env_bytes, _nasty, st.text(max_size=12).map(lambda s: s.replace("\0", "")))
# Names CNI_ARGS can carry (no ';' or '='), the forging ones among them.
_namespace = st.sampled_from([NS, "istio-system", "kube-system", f"{NS}{FORGED}", "\x1b[2J\x07", "é"])
_pod_name = st.sampled_from(["web-0", "istio-cni-node-x1", f"web{FORGED}{ANSI}", "\u2028\u2029\x85\x7f", ""])


@st.composite
def _environ(draw: st.DrawFn, command: str, sandbox: str) -> dict[str, str]:
    """The environment a runtime passes, with a variable or two missing or hostile."""
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "5d6a1f0e8c7b",
        "CNI_NETNS": sandbox,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": k8s_args(draw(_namespace), draw(_pod_name)),
        "CNI_PATH": "/opt/cni/bin",
    }
    for _ in range(draw(_faults)):
        name = draw(st.sampled_from(sorted(env)))
        value = draw(
            st.one_of(
                st.none(),
                _env_text,
                st.just("/proc/self/ns/net"),
                st.lists(st.tuples(_env_text, _env_text).map("=".join), max_size=3).map(";".join),
            )
        )
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


# Any JSON value, strings included that are not text (lone surrogates) or are huge.
_json_text = st.one_of(st.text(max_size=10), _nasty)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _json_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_json_text, inner, max_size=3),
    max_leaves=12,
)
_hostile_version = st.one_of(
    st.sampled_from(["0.1.0", "0.2.0", "1.2.0", "", "1.1", "9" * 5000 + ".0.0"]), _json
)


@st.composite
def _prev_result(draw: st.DrawFn, version: str) -> Any:
    """The previous plugin's result, in the configuration's version or not, with one field (at
    any level) replaced by anything, or anything at all."""
    if draw(st.integers(0, 4)) == 0:
        return draw(_json)
    versions = [version] if version in SUPPORTED_VERSIONS else list(SUPPORTED_VERSIONS)
    prev = prev_result(draw(st.sampled_from(versions)), draw(st.sampled_from(["10.0.0.5/24", "fd00::5/64"])))
    target: Any = prev
    for _ in range(draw(st.integers(0, 4))):
        if isinstance(target, dict) and target:
            key = draw(st.sampled_from(sorted(target)))
        elif isinstance(target, list) and target:
            key = draw(st.integers(0, len(target) - 1))
        else:
            break
        if not isinstance(target[key], dict | list) or draw(st.booleans()):
            target[key] = draw(_json)
            break
        target = target[key]
    return prev


@st.composite
def _config(draw: st.DrawFn, log_dir: Path) -> dict[str, Any]:
    """A plausible configuration with a key or two missing or replaced by anything. There is
    never a kubeconfig that works; when one is named, the deadline gives up at once."""
    version = draw(st.sampled_from(SUPPORTED_VERSIONS))
    kube: dict[str, Any] = {"api_deadline_seconds": draw(st.sampled_from([0.001, 0.01]))}
    kube["api_request_timeout_seconds"] = 0.01
    if draw(st.booleans()):
        kube["kubeconfig"] = draw(st.sampled_from(["/nonexistent/kubeconfig", "/", "kc\0x", ""]))
    if draw(st.booleans()):
        kube["exclude_namespaces"] = draw(st.lists(_namespace, max_size=2))
    conf: dict[str, Any] = {
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "istio-cni",
        "kubernetes": kube,
    }
    optional: dict[str, st.SearchStrategy[Any]] = {
        "prevResult": _prev_result(version),
        "log_file": st.just(str(log_dir / "istio-cni.log")),
        "plugin_log_level": st.sampled_from(["debug", "info", "error", "none"]),
        "exclude_namespaces": st.lists(_namespace, max_size=2),
        "pod_namespace": st.just("istio-system"),
        "native_nftables": st.booleans(),
        "runtimeConfig": _json,
        "args": _json,
        "cni.dev/valid-attachments": st.lists(_json, max_size=2),
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), unique=True, max_size=4)):
        conf[key] = draw(optional[key])
    hostile: dict[str, st.SearchStrategy[Any]] = {
        "cniVersion": _hostile_version,
        "name": _json,
        # Any name, but inside log_dir: the plugin creates the file.
        "log_file": st.one_of(
            st.sampled_from([str(log_dir), "/nonexistent/dir/x.log", f"{log_dir}/a\0b", "/dev/full"]),
            _json.map(lambda v: f"{log_dir}/{v.replace('/', '_')}" if isinstance(v, str) else v),
        ),
        "kubeconfig": _json,
        "kubernetes": _json,
    }
    for _ in range(draw(_faults)):
        key = draw(st.sampled_from(sorted({*conf, *hostile, "log_level"})))
        where = kube if key == "kubeconfig" else conf
        if draw(st.integers(0, 3)) == 0:
            where.pop(key, None)
        else:
            where[key] = draw(hostile.get(key, _json))
    return conf


def _stdin(log_dir: Path) -> st.SearchStrategy[bytes]:
    def encode(conf: dict[str, Any], ascii_only: bool) -> bytes:
        # Lone surrogates stay escapes (ensure_ascii) or become bytes that are not UTF-8.
        return json.dumps(conf, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")

    hostile = st.sampled_from(
        [
            b"",
            b"[" * 100_000,
            b"{" * 50_000,
            b'{"name":"n","cniVersion":"1.0.0","x":' + b"9" * 5000 + b"}",
            b'{"name":"n","cniVersion":"1.0.0","x":1e999999}',
            b'{"name":"n","cniVersion":"1.0.0","x":NaN}',
            b"\xff\xfe\xff",
            b"\xef\xbb\xbf{}",
            b"null",
        ]
    )
    configs = st.builds(encode, _config(log_dir), st.booleans())
    return st.one_of(configs, configs, configs, hostile, st.binary(max_size=40))


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_no_input_is_an_internal_error(data: st.DataObject, sandbox: str, log_dir: Path) -> None:
    command = data.draw(st.sampled_from(COMMANDS), label="command")
    environ = data.draw(_environ(command, sandbox), label="environ")
    stdin = data.draw(_stdin(log_dir), label="stdin")
    log_file = log_dir / "istio-cni.log"
    log_file.unlink(missing_ok=True)
    sink = logsink.get_sink()
    out, errs = io.StringIO(), io.StringIO()

    code = run(environ, io.BytesIO(stdin), out, errs)

    assert code in (0, 1)
    stdout, stderr = out.getvalue(), errs.getvalue()
    assert "Traceback" not in stderr
    if code == 1:
        doc = one_json(stdout)
        event(f"{command}: error {doc['code']}")
        assert set(doc) <= {"cniVersion", "code", "msg", "details"}, doc
        assert doc["code"] in CODES, (doc, stderr)
        assert doc["cniVersion"] in SUPPORTED_VERSIONS
    else:
        event(f"{command}: success")
        if environ.get("CNI_COMMAND") in ("ADD", "VERSION"):
            one_json(stdout)  # the result
        else:
            assert stdout == ""
    if not environ.get("CNI_COMMAND"):
        assert code == 0 and stdout == "" and "CNI protocol versions supported" in stderr
    else:
        assert_log_lines(stderr)
    if log_file.exists():
        assert_log_lines(log_file.read_text())
    # In-process callers find the applier's records going where they went before.
    assert logsink.get_sink() is sink
