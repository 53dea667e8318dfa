"""From Pod to capture Config, the way the plugin does it (``cni.pod``): Istio's sidecar-mode
decision, the Config built from annotations and the istio-proxy container, the CNI conformance
cases as a dry run, and a fuzzed annotation path (no value reaches a rule unvalidated)."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni.pod import (
    ANN_EXCLUDE_INBOUND_PORTS,
    ANN_EXCLUDE_INTERFACES,
    ANN_EXCLUDE_OUTBOUND_IP_RANGES,
    ANN_EXCLUDE_OUTBOUND_PORTS,
    ANN_INCLUDE_INBOUND_PORTS,
    ANN_INCLUDE_OUTBOUND_IP_RANGES,
    ANN_INCLUDE_OUTBOUND_PORTS,
    ANN_INTERCEPTION_MODE,
    ANN_KUBEVIRT_INTERFACES,
    ANN_REROUTE_VIRTUAL_INTERFACES,
    ANN_STATUS_PORT,
    PodError,
    PodInfo,
    build_config,
    ipv6_enabled,
    pod_info,
    skip_reason,
)
from istio_iptables.config import CidrSpec, ConfigError, InterceptionMode, PortSpec
from istio_iptables.planner import plan
from istio_iptables.render import render_dry_run
from tests.support.conformance import CONFORMANCE
from tests.support.pods import meshed_pod, pod_from_case, pod_object

ROOT = Path(__file__).resolve().parent.parent
CNI_CASES = json.loads((CONFORMANCE / "cni_cases.json").read_text())
V4 = [ipaddress.ip_address("10.244.1.5")]


def info(**kw: Any) -> PodInfo:
    return pod_info(meshed_pod("web-0", "shop", **kw))


# --- decision ------------------------------------------------------------------------------


def test_meshed_pod_is_captured() -> None:
    assert skip_reason(info()) is None


def test_native_sidecar_in_init_containers_counts() -> None:
    pod = meshed_pod(
        "web-0", "shop", containers=("app",), init_containers=("istio-validation", "istio-proxy")
    )
    pi = pod_info(pod)
    assert "istio-proxy" in pi.containers
    assert pi.proxy_uid == 1337
    assert skip_reason(pi) is None


def test_istio_init_wins_over_everything() -> None:
    pi = info(init_containers=("istio-init",), proxy_env={"DISABLE_ENVOY": "true"})
    assert skip_reason(pi) == "excluded due to being already injected with istio-init container"


@pytest.mark.parametrize(
    ("value", "skipped"), [("true", True), ("1", True), ("T", True), ("yes", False), (" true", False)]
)
def test_disable_envoy_parses_like_go(value: str, skipped: bool) -> None:
    reason = skip_reason(info(proxy_env={"DISABLE_ENVOY": value}))
    assert (reason == "excluded due to DISABLE_ENVOY on istio-proxy") is skipped


@pytest.mark.parametrize(
    ("args", "skipped"),
    [
        (("proxy", "sidecar"), False),
        (("proxy", "router"), True),
        ((), False),
        (("proxy",), False),
        (("run", "router"), False),
    ],
)
def test_proxy_type(args: tuple[str, ...], skipped: bool) -> None:
    assert (skip_reason(info(proxy_args=args)) is not None) is skipped


def test_value_from_env_reads_as_empty() -> None:
    pi = info()
    assert pi.proxy_env["POD_NAME"] == ""


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p.update(spec=[]),
        lambda p: p["spec"].update(containers={"name": "x"}),
        lambda p: p["spec"]["containers"].append({"image": "no-name"}),
        lambda p: p["metadata"].update(annotations={"a": 1}),
        lambda p: p["spec"]["containers"][1]["securityContext"].update(runAsUser="1337"),
    ],
)
def test_malformed_pod_objects_are_refused(mutate: Any) -> None:
    pod = meshed_pod("web-0", "shop")
    mutate(pod)
    with pytest.raises(PodError):
        pod_info(pod)


# --- Config --------------------------------------------------------------------------------


def test_defaults_are_istios() -> None:
    cfg = build_config(info(), V4).config
    assert cfg.interception_mode is InterceptionMode.REDIRECT
    assert cfg.proxy_uids == ("1337",) and cfg.proxy_gids == ("1337",)
    assert cfg.inbound_ports == PortSpec(wildcard=True)
    assert cfg.inbound_ports_exclude == (15020, 15021, 15090)
    assert cfg.outbound_ip_ranges_include == CidrSpec(wildcard=True)
    assert cfg.outbound_ip_ranges_exclude == ()
    assert cfg.outbound_ports_exclude == (15020,)
    assert cfg.outbound_ports_include == ()
    assert cfg.exclude_interfaces == () and cfg.kube_virt_interfaces == ()
    assert not (cfg.redirect_dns or cfg.capture_all_dns or cfg.drop_invalid or cfg.enable_ipv6)


def test_annotations_map_to_config() -> None:
    ann = {
        ANN_INTERCEPTION_MODE: "TPROXY",
        ANN_INCLUDE_OUTBOUND_IP_RANGES: "10.0.0.0/8,fd00::/8",
        ANN_EXCLUDE_OUTBOUND_IP_RANGES: "10.96.0.1/32",
        ANN_INCLUDE_INBOUND_PORTS: "8080, 9090",
        ANN_EXCLUDE_INBOUND_PORTS: "8081,15021",
        ANN_INCLUDE_OUTBOUND_PORTS: "443",
        ANN_EXCLUDE_OUTBOUND_PORTS: "3306,",
        ANN_EXCLUDE_INTERFACES: "eth1,net+",
        ANN_KUBEVIRT_INTERFACES: "k6t-eth0",
    }
    cfg = build_config(
        info(annotations=ann, proxy_security_context={"runAsUser": 1000, "runAsGroup": 2000}), V4
    ).config
    assert cfg.interception_mode is InterceptionMode.TPROXY
    assert cfg.outbound_ip_ranges_include.cidrs == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert cfg.outbound_ip_ranges_exclude == (ipaddress.ip_network("10.96.0.1/32"),)
    assert cfg.inbound_ports == PortSpec(ports=(8080, 9090))
    assert cfg.inbound_ports_exclude == (8081, 15021, 15020, 15090)
    assert cfg.outbound_ports_include == (443,)
    assert cfg.outbound_ports_exclude == (3306,)
    assert cfg.exclude_interfaces == ("eth1", "net+")
    assert cfg.kube_virt_interfaces == ("k6t-eth0",)
    assert (cfg.proxy_uids, cfg.proxy_gids) == (("1000",), ("2000",))


def test_reroute_virtual_interfaces_wins_over_kubevirt() -> None:
    ann = {ANN_KUBEVIRT_INTERFACES: "old0", ANN_REROUTE_VIRTUAL_INTERFACES: "new0,new1"}
    assert build_config(info(annotations=ann), V4).config.kube_virt_interfaces == ("new0", "new1")
    # The deprecated one is still validated when it is the one used.
    with pytest.raises(ConfigError) as e:
        build_config(info(annotations={ANN_KUBEVIRT_INTERFACES: "bad name"}), V4)
    assert e.value.source == ANN_KUBEVIRT_INTERFACES


def test_empty_annotations_mean_none() -> None:
    ann = {ANN_INCLUDE_INBOUND_PORTS: "", ANN_INCLUDE_OUTBOUND_IP_RANGES: "", ANN_EXCLUDE_OUTBOUND_PORTS: ""}
    cfg = build_config(info(annotations=ann), V4).config
    assert cfg.inbound_ports.empty
    assert cfg.outbound_ip_ranges_include == CidrSpec()
    assert cfg.outbound_ports_exclude == ()


@pytest.mark.parametrize(
    ("value", "excluded"),
    [("15021", (15020, 15021, 15090)), ("8500", (15020, 8500, 15021, 15090)), ("0", (15020, 15021, 15090))],
)
def test_status_port_annotation_is_excluded_inbound(value: str, excluded: tuple[int, ...]) -> None:
    assert (
        build_config(info(annotations={ANN_STATUS_PORT: value}), V4).config.inbound_ports_exclude == excluded
    )


@pytest.mark.parametrize(
    ("sc", "uid", "gid"),
    [
        ({}, "1337", "1337"),
        ({"runAsUser": 0}, "1337", "1337"),
        ({"runAsUser": 5, "runAsGroup": 0}, "5", "1337"),
        (None, "1337", "1337"),
    ],
)
def test_proxy_ids(sc: dict[str, int] | None, uid: str, gid: str) -> None:
    pod = meshed_pod("web-0", "shop")
    if sc is None:
        del pod["spec"]["containers"][1]["securityContext"]
    else:
        pod["spec"]["containers"][1]["securityContext"] = sc
    cfg = build_config(pod_info(pod), V4).config
    assert (cfg.proxy_uids, cfg.proxy_gids) == ((uid,), (gid,))


def test_out_of_range_uid_is_refused() -> None:
    with pytest.raises(ConfigError):
        build_config(info(proxy_security_context={"runAsUser": 2**32}), V4)


NINES = "9" * 5000  # more digits than int() converts


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        (ANN_INCLUDE_INBOUND_PORTS, NINES),
        (ANN_EXCLUDE_INBOUND_PORTS, f"8080,{NINES}"),
        (ANN_INCLUDE_OUTBOUND_PORTS, NINES),
        (ANN_EXCLUDE_OUTBOUND_PORTS, NINES),
        (ANN_STATUS_PORT, NINES),
        (ANN_INCLUDE_OUTBOUND_IP_RANGES, f"10.0.0.0/{NINES}"),
        (ANN_EXCLUDE_OUTBOUND_IP_RANGES, f"10.0.0.0/{NINES}"),
    ],
)
def test_huge_numbers_in_annotations_are_refused_naming_them(annotation: str, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_config(info(annotations={annotation: value}), V4)
    assert (e.value.source, e.value.value) == (annotation, value)
    assert f"({len(value)} characters)" in str(e.value) and len(str(e.value)) < 300


def test_huge_proxy_ids_are_refused_naming_them() -> None:
    # The largest integer a JSON Pod can carry (the decoder has int()'s digit limit too).
    with pytest.raises(ConfigError) as e:
        build_config(info(proxy_security_context={"runAsGroup": 10**4299}), V4)
    assert e.value.source == "istio-proxy securityContext.runAsGroup"
    assert len(str(e.value)) < 300


def test_leading_zeros_in_annotations_do_not_count() -> None:
    zeros = "0" * 5000
    cfg = build_config(info(annotations={ANN_INCLUDE_INBOUND_PORTS: f"{zeros}8080"}), V4).config
    assert cfg.inbound_ports == PortSpec(ports=(8080,))


def test_dns_capture_captures_all_dns() -> None:
    cfg = build_config(info(proxy_env={"ISTIO_META_DNS_CAPTURE": "true"}), V4).config
    assert cfg.redirect_dns and cfg.capture_all_dns


def test_unparsable_env_is_false_with_a_note() -> None:
    cap = build_config(info(proxy_env={"INVALID_DROP": "yes", "ISTIO_META_DNS_CAPTURE": "on"}), V4)
    assert not cap.config.drop_invalid and not cap.config.redirect_dns
    assert len(cap.notes) == 2
    assert build_config(info(proxy_env={"INVALID_DROP": "1"}), V4).config.drop_invalid


A4, A6 = ipaddress.ip_address("10.1.0.5"), ipaddress.ip_address("fd00::5")
LL6, LO = ipaddress.ip_address("fe80::1"), ipaddress.ip_address("127.0.0.1")


@pytest.mark.parametrize(
    ("addrs", "dual", "v6"),
    [
        ([A4], False, False),
        ([A6], False, True),
        ([A6, A4], False, False),  # the kernel lists IPv4 first: an IPv4 address decides
        ([A4, A6], True, True),
        ([A4], True, False),
        ([LL6, LO, A4], True, False),
        ([LL6], False, False),
        ([ipaddress.ip_address("::ffff:10.1.0.5")], False, False),
        ([], False, False),
    ],
)
def test_ipv6_from_pod_addresses(addrs: list[Any], dual: bool, v6: bool) -> None:
    assert ipv6_enabled(addrs, dual) is v6


def test_dual_stack_env_enables_ipv6() -> None:
    pi = info(proxy_env={"ISTIO_DUAL_STACK": "true"})
    assert build_config(pi, [A4, A6]).config.enable_ipv6
    assert not build_config(info(), [A4, A6]).config.enable_ipv6


# --- the conformance cases as a dry run ----------------------------------------------------


def case_dry_run(case: dict[str, Any]) -> str:
    """What the plugin would install for the case's pod: served Pod JSON -> Config -> rules."""
    pod = json.loads(json.dumps(pod_from_case(case["pod"])))  # exactly what the API would send
    pi = pod_info(pod)
    assert skip_reason(pi) is None
    addrs = [ipaddress.ip_address("fd00:10:244::5" if case["ipv6"] else "10.244.1.5")]
    return render_dry_run(plan(build_config(pi, addrs).config))


def compare(expected: Path, actual_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    actual = tmp_path / "actual.rules"
    actual.write_text(actual_text)
    return subprocess.run(
        [sys.executable, str(CONFORMANCE / "compare.py"), str(expected), "--actual-file", str(actual)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.kernel
@pytest.mark.parametrize("case", CNI_CASES, ids=[c["name"] for c in CNI_CASES])
def test_cni_case_dry_run_matches_istio(case: dict[str, Any], tmp_path: Path) -> None:
    r = compare(CONFORMANCE / case["expected"]["v4"], case_dry_run(case), tmp_path)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert r.stdout.startswith("MATCH")


# --- fuzzing the annotation path -----------------------------------------------------------

CAPTURE_ANNOTATIONS = [
    ANN_INTERCEPTION_MODE,
    ANN_INCLUDE_OUTBOUND_IP_RANGES,
    ANN_EXCLUDE_OUTBOUND_IP_RANGES,
    ANN_INCLUDE_INBOUND_PORTS,
    ANN_EXCLUDE_INBOUND_PORTS,
    ANN_INCLUDE_OUTBOUND_PORTS,
    ANN_EXCLUDE_OUTBOUND_PORTS,
    ANN_EXCLUDE_INTERFACES,
    ANN_KUBEVIRT_INTERFACES,
    ANN_REROUTE_VIRTUAL_INTERFACES,
    ANN_STATUS_PORT,
]

# Pieces an attacker would combine: separators, option-looking words, rule fragments, newlines.
_NASTY = ["-j", "ACCEPT", "-A", "OUTPUT", "!", "--dport", "\n", " ", "\t", "#", ";", "'", '"', "\\", "*", ":", "/", "+", "-", ",", "0", "65536", "lo", "eth0", "10.0.0.0/8", "::/0", "TPROXY", "REDIRECT", "\x00", "é"]  # fmt: skip
_piece = st.one_of(
    st.sampled_from(_NASTY),
    st.integers(min_value=-1, max_value=70000).map(str),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=6),
    st.from_regex(r"[a-z][a-z0-9+.-]{0,16}", fullmatch=True),
    st.ip_addresses().map(str).flatmap(lambda a: st.integers(0, 130).map(lambda n: f"{a}/{n}")),
)
_cidr = st.one_of(
    st.ip_addresses(v=4).map(lambda a: (a, 32)), st.ip_addresses(v=6).map(lambda a: (a, 128))
).flatmap(lambda am: st.integers(0, am[1]).map(lambda n: f"{am[0]}/{n}"))
_valid = st.one_of(
    st.lists(st.integers(1, 65535).map(str), max_size=4).map(",".join),
    st.lists(_cidr, max_size=3).map(",".join),
    st.lists(st.from_regex(r"[a-z][a-z0-9]{0,13}\+?", fullmatch=True), max_size=3).map(",".join),
    st.sampled_from(["*", "REDIRECT", "TPROXY", "", "15021"]),
)
_value = st.one_of(
    _valid, st.lists(_piece, max_size=6).map("".join), st.lists(_piece, max_size=5).map(",".join)
)
annotation_sets = st.dictionaries(st.sampled_from(CAPTURE_ANNOTATIONS), _value, max_size=5)

_TOKEN = re.compile(r"[A-Za-z0-9_.:/,+!-]+")
_IFNAME = re.compile(r"[!-~]{1,15}")


def _check_rules_are_made_of_validated_values(annotations: dict[str, str], addrs: list[Any]) -> str | None:
    """None when build_config refused the annotations (naming one of them), else the dry run."""
    pi = info(annotations=annotations)
    try:
        cfg = build_config(pi, addrs).config
    except ConfigError as e:
        assert e.source in annotations, e.source
        assert e.value == annotations[e.source]
        return None
    for p in (
        *cfg.inbound_ports.ports,
        *cfg.inbound_ports_exclude,
        *cfg.outbound_ports_include,
        *cfg.outbound_ports_exclude,
    ):
        assert isinstance(p, int) and 1 <= p <= 65535
    for c in (*cfg.outbound_ip_ranges_include.cidrs, *cfg.outbound_ip_ranges_exclude):
        assert isinstance(c, ipaddress.IPv4Network | ipaddress.IPv6Network)
    for name in (*cfg.exclude_interfaces, *cfg.kube_virt_interfaces):
        assert _IFNAME.fullmatch(name) and name not in (".", "..")
        assert not set(name) & set("/:\"'\\# ") and name[0] not in "-!"
    assert isinstance(cfg.interception_mode, InterceptionMode)
    doc = render_dry_run(plan(cfg))
    interfaces = {*cfg.exclude_interfaces, *cfg.kube_virt_interfaces, "lo"}
    for line in doc.splitlines():
        if line.startswith("#") or line in ("COMMIT",) or line.startswith("* "):
            continue
        tokens = line.split(" ")
        assert tokens[0] in ("-N", "-A", "-I"), line
        for i, t in enumerate(tokens):
            if i and tokens[i - 1] in ("-i", "-o"):
                assert t in interfaces, line  # a validated interface name, nothing else
            else:
                assert _TOKEN.fullmatch(t), line
    return doc


@given(annotation_sets, st.booleans())
@settings(max_examples=400)
def test_fuzzed_annotations_are_refused_or_validated(annotations: dict[str, str], v6: bool) -> None:
    _check_rules_are_made_of_validated_values(annotations, [A6] if v6 else [A4])


@pytest.mark.kernel
def test_fuzzed_annotations_give_documents_the_kernel_accepts(netns: Any) -> None:
    ns = netns("fuzz")

    @given(annotation_sets, st.booleans())
    @settings(max_examples=40)
    def check(annotations: dict[str, str], v6: bool) -> None:
        doc = _check_rules_are_made_of_validated_values(annotations, [A6, A4] if v6 else [A4])
        if doc is None:
            return
        sections = re.split(r"^# (ip6?tables-restore)\n", doc, flags=re.M)[1:]
        for tool, body in zip(sections[::2], sections[1::2], strict=True):
            r = ns.run([tool, "--test", "--noflush"], input=body, check=False)
            assert r.returncode == 0, f"{tool}: {r.stderr}\n{body}"

    check()


def test_pod_object_shape() -> None:
    pod = pod_object("a", "b")
    assert (pod["apiVersion"], pod["kind"]) == ("v1", "Pod")
    assert set(pod) == {"apiVersion", "kind", "metadata", "spec", "status"}
