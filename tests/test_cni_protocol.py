"""The CNI protocol layer on its own: environment checks, version negotiation, CNI_ARGS, result
conversion between spec versions and the error object."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cni import protocol as p

PREV_040 = {
    "cniVersion": "0.4.0",
    "interfaces": [
        {"name": "cni0", "mac": "ae:4f:ff:0e:4a:f4"},
        {"name": "veth1a2b", "mac": "2a:9e:10:33:ab:01"},
        {"name": "eth0", "mac": "5e:d6:72:3a:f4:1c", "sandbox": "/var/run/netns/cni-1"},
    ],
    "ips": [
        {"version": "4", "interface": 2, "address": "10.244.1.5/24", "gateway": "10.244.1.1"},
        {"version": "6", "interface": 2, "address": "fd00:10:244:1::5/64", "gateway": "fd00:10:244:1::1"},
    ],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "::/0"}],
    "dns": {"nameservers": ["10.96.0.10"], "search": ["default.svc.cluster.local"]},
}

PREV_110 = {
    "cniVersion": "1.1.0",
    "interfaces": [
        {
            "name": "eth0",
            "mac": "5e:d6:72:3a:f4:1c",
            "mtu": 1450,
            "sandbox": "/var/run/netns/cni-1",
            "pciID": "0000:00:1f.6",
        }
    ],
    "ips": [{"interface": 0, "address": "10.244.1.5/24", "gateway": "10.244.1.1"}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1", "mtu": 1400, "table": 100, "scope": 0}],
    "dns": {},
}


def env(command: str, **extra: str) -> dict[str, str]:
    base = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "0123abcd",
        "CNI_NETNS": "/var/run/netns/x",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
    }
    base.update(extra)
    return {k: v for k, v in base.items() if v != "-"}


# --- environment ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"])
def test_complete_environment_is_accepted(command: str) -> None:
    inv = p.read_environment(env(command, CNI_ARGS="K8S_POD_NAME=a"))
    assert inv.command == command
    assert inv.args == "K8S_POD_NAME=a"


@pytest.mark.parametrize(
    ("command", "missing", "names"),
    [
        ("ADD", "CNI_NETNS", "CNI_NETNS"),
        ("CHECK", "CNI_NETNS", "CNI_NETNS"),
        ("ADD", "CNI_CONTAINERID", "CNI_CONTAINERID"),
        ("ADD", "CNI_IFNAME", "CNI_IFNAME"),
        ("DEL", "CNI_PATH", "CNI_PATH"),
        ("GC", "CNI_PATH", "CNI_PATH"),
        ("STATUS", "CNI_PATH", "CNI_PATH"),
    ],
)
def test_missing_variable_is_error_4(command: str, missing: str, names: str) -> None:
    with pytest.raises(p.CniError) as e:
        p.read_environment(env(command, **{missing: "-"}))
    assert e.value.code == p.ERR_INVALID_ENVIRONMENT
    assert names in e.value.msg


@pytest.mark.parametrize("var", ["CNI_NETNS", "CNI_ARGS", "CNI_PATH", "CNI_CONTAINERID", "CNI_IFNAME"])
@pytest.mark.parametrize("bad", ["a\0b", "a\ud800"])
def test_values_no_process_environment_holds_are_error_4(var: str, bad: str) -> None:
    # An in-process caller's mapping may hold them; os.stat() and open() would raise ValueError.
    with pytest.raises(p.CniError) as e:
        p.read_environment(env("ADD", **{var: bad}))
    assert e.value.code == p.ERR_INVALID_ENVIRONMENT


def test_bytes_that_are_not_utf8_are_a_valid_netns_path() -> None:
    # What os.environ makes of b"/var/run/netns/\xff": os.fsencode gives the bytes back.
    assert p.read_environment(env("ADD", CNI_NETNS="/var/run/netns/\udcff")).netns == "/var/run/netns/\udcff"


def test_del_does_not_need_a_netns() -> None:
    assert p.read_environment(env("DEL", CNI_NETNS="-")).netns == ""


def test_unknown_command_is_error_4() -> None:
    with pytest.raises(p.CniError) as e:
        p.read_environment(env("UPDATE"))
    assert (e.value.code, e.value.msg) == (4, "unknown CNI_COMMAND: UPDATE")


@pytest.mark.parametrize("cid", ["-abc", "a b", "a/b", "ä", ""])
def test_invalid_container_id(cid: str) -> None:
    with pytest.raises(p.CniError) as e:
        p.read_environment(env("ADD", CNI_CONTAINERID=cid or "-"))
    assert e.value.code == 4


@pytest.mark.parametrize("ifname", ["a" * 16, ".", "..", "eth/0", "eth:0", "eth 0", "eth\t0"])
def test_invalid_ifname(ifname: str) -> None:
    with pytest.raises(p.CniError) as e:
        p.read_environment(env("ADD", CNI_IFNAME=ifname))
    assert e.value.code == 4


def test_ifname_of_15_characters_is_fine() -> None:
    assert p.read_environment(env("ADD", CNI_IFNAME="a" * 15)).ifname == "a" * 15


# --- configuration and versions ------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"{", 6),
        (b"\xff", 6),
        (b"[]", 6),
        (b'{"cniVersion":"1.0.0"}', 7),
        (b'{"name":"bad name"}', 7),
        (b'{"name":7}', 7),
    ],
)
def test_bad_network_configuration(data: bytes, code: int) -> None:
    with pytest.raises(p.CniError) as e:
        p.parse_netconf(data)
    assert e.value.code == code


def _nested(depth: int) -> bytes:
    return b'{"name":"n","x":' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"[" * 100_000, "nested deeper than"),  # the decoder's RecursionError
        (_nested(p.MAX_DEPTH), "nested deeper than"),  # decodes, but is refused as deep
        (b'{"name":"n","x":' + b"9" * 5000 + b"}", "4300 digits"),  # int()'s digit limit
        (b'{"name":"n","x":"\\ud800"}', "unpaired surrogate"),
        (b'{"name":"n","\\udfff":1}', "unpaired surrogate"),
        (b'{"name":"n","x":[{"y":"a\\udc80"}]}', "unpaired surrogate"),
    ],
)
def test_undecodable_network_configuration_is_error_6(data: bytes, why: str) -> None:
    with pytest.raises(p.CniError) as e:
        p.parse_netconf(data)
    assert e.value.code == p.ERR_DECODING_FAILURE
    assert why in e.value.details


def test_reasonable_nesting_and_text_decode() -> None:
    assert p.parse_netconf(_nested(p.MAX_DEPTH - 2))["name"] == "n"
    assert p.parse_netconf('{"name":"n","x":"\\ud83d\\ude00 é"}'.encode())["x"] == "\U0001f600 é"


def test_missing_cni_version_means_0_1_0_which_is_unsupported() -> None:
    conf = p.parse_netconf(b'{"name":"n"}')
    assert p.config_version(conf) == "0.1.0"
    with pytest.raises(p.CniError) as e:
        p.check_version("ADD", "0.1.0")
    assert e.value.code == p.ERR_INCOMPATIBLE_VERSION


@pytest.mark.parametrize("version", p.SUPPORTED_VERSIONS)
def test_supported_versions_for_add_and_del(version: str) -> None:
    p.check_version("ADD", version)
    p.check_version("DEL", version)


@pytest.mark.parametrize(
    ("command", "version", "ok"),
    [
        ("CHECK", "0.3.1", False),
        ("CHECK", "0.4.0", True),
        ("CHECK", "1.1.0", True),
        ("GC", "1.0.0", False),
        ("GC", "1.1.0", True),
        ("STATUS", "0.4.0", False),
        ("STATUS", "1.1.0", True),
        ("ADD", "0.2.0", False),
        ("ADD", "2.0.0", False),
        ("ADD", "1.2.0", False),
    ],
)
def test_commands_need_their_spec_version(command: str, version: str, ok: bool) -> None:
    if ok:
        p.check_version(command, version)
    else:
        with pytest.raises(p.CniError) as e:
            p.check_version(command, version)
        assert e.value.code == p.ERR_INCOMPATIBLE_VERSION


@pytest.mark.parametrize(
    ("command", "version", "code"),
    [
        ("CHECK", "9" * 5000 + ".0.0", p.ERR_INCOMPATIBLE_VERSION),
        ("GC", "1.0." + "9" * 5000, p.ERR_INCOMPATIBLE_VERSION),
        ("STATUS", "0" * 5000 + "1.1.0", p.ERR_INCOMPATIBLE_VERSION),
        ("CHECK", "\u0661.\u0661.\u0660", p.ERR_DECODING_FAILURE),  # Arabic-Indic digits: not Go's \d
    ],
)
def test_odd_versions_are_refused_without_converting_them(command: str, version: str, code: int) -> None:
    with pytest.raises(p.CniError) as e:
        p.check_version(command, version)
    assert e.value.code == code
    assert len(str(e.value)) < 300


def test_version_components_compare_as_numbers() -> None:
    p.check_version("GC", "1.1.0")
    assert p._version_tuple("01.001.0") == (1, 1, 0)
    assert p._version_tuple("1." + "9" * 5000 + ".0") > p._version_tuple("1.1.0")


def test_version_info_lists_what_is_supported() -> None:
    assert p.version_info() == {
        "cniVersion": "1.1.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }


# --- CNI_ARGS ------------------------------------------------------------------------------

KNOWN = frozenset({"K8S_POD_NAME", "K8S_POD_NAMESPACE"})


def test_cni_args_as_podman_passes_them() -> None:
    raw = "IgnoreUnknown=1;K8S_POD_NAME=web-1;K8S_POD_NAMESPACE=default;MAC=aa:bb;IP=10.0.0.2"
    assert p.parse_cni_args(raw, KNOWN) == {"K8S_POD_NAME": "web-1", "K8S_POD_NAMESPACE": "default"}


def test_cni_args_last_value_wins() -> None:
    raw = "IgnoreUnknown=true;K8S_POD_NAME=a;K8S_POD_NAME=b"
    assert p.parse_cni_args(raw, KNOWN) == {"K8S_POD_NAME": "b"}


@pytest.mark.parametrize(
    "raw",
    [
        "K8S_POD_NAME",
        "K8S_POD_NAME=a;",
        "K8S_POD_NAME=a=b",
        "FOO=1",
        "IgnoreUnknown=maybe;FOO=1",
        "IgnoreUnknown=0;X=1",
    ],
)
def test_bad_cni_args_are_error_4(raw: str) -> None:
    with pytest.raises(p.CniError) as e:
        p.parse_cni_args(raw, KNOWN)
    assert e.value.code == p.ERR_INVALID_ENVIRONMENT


@pytest.mark.parametrize("value", ["web\udcff", "\udc80"])
def test_cni_args_that_are_not_utf8_are_error_4(value: str) -> None:
    # A byte that is not UTF-8 reaches os.environ as a surrogate; no pod is named with it.
    with pytest.raises(p.CniError) as e:
        p.parse_cni_args(f"K8S_POD_NAMESPACE=a;K8S_POD_NAME={value}", KNOWN)
    assert e.value.code == p.ERR_INVALID_ENVIRONMENT
    assert "K8S_POD_NAME" in e.value.details
    # Ignored pairs are not looked at.
    assert p.parse_cni_args(f"IgnoreUnknown=1;X={value};K8S_POD_NAME=é", KNOWN) == {"K8S_POD_NAME": "é"}


def test_empty_cni_args() -> None:
    assert p.parse_cni_args("", KNOWN) == {}


# --- results -------------------------------------------------------------------------------


def test_040_result_to_every_version() -> None:
    r = p.parse_result(PREV_040)
    for v in ("0.3.0", "0.3.1", "0.4.0"):
        out = p.render_result(r, v)
        assert out == {**PREV_040, "cniVersion": v}
        assert list(out) == ["cniVersion", "interfaces", "ips", "routes", "dns"]
    out = p.render_result(r, "1.0.0")
    assert out["cniVersion"] == "1.0.0"
    assert all("version" not in ip for ip in out["ips"])
    assert out["ips"][1] == {"interface": 2, "address": "fd00:10:244:1::5/64", "gateway": "fd00:10:244:1::1"}
    assert out["interfaces"] == PREV_040["interfaces"]
    assert out["routes"] == PREV_040["routes"]
    assert out["dns"] == PREV_040["dns"]


def test_110_result_keeps_its_fields_only_in_110() -> None:
    r = p.parse_result(PREV_110)
    assert p.render_result(r, "1.1.0") == PREV_110
    v100 = p.render_result(r, "1.0.0")
    assert v100["interfaces"] == [
        {"name": "eth0", "mac": "5e:d6:72:3a:f4:1c", "sandbox": "/var/run/netns/cni-1"}
    ]
    assert v100["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}]
    v040 = p.render_result(r, "0.4.0")
    assert v040["ips"] == [
        {"version": "4", "interface": 0, "address": "10.244.1.5/24", "gateway": "10.244.1.1"}
    ]


def test_empty_result_carries_the_version() -> None:
    for v in p.SUPPORTED_VERSIONS:
        assert p.render_result(p.Result(), v) == {"cniVersion": v, "dns": {}}


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"ips": {}},
        {"ips": [{"address": "10.0.0.1"}]},
        {"ips": [{"address": "10.0.0.300/24"}]},
        {"ips": [{"address": "10.0.0.1/24", "version": "5"}]},
        {"ips": [{"address": "10.0.0.1/24", "interface": -1}]},
        {"ips": [{"address": "10.0.0.1/24", "interface": "0"}]},
        {"ips": [{"address": "10.0.0.1/24", "gateway": "fd00::1"}]},
        {"interfaces": [{"name": 3}]},
        {"routes": [{"dst": "nowhere"}]},
        {"routes": [{"dst": "0.0.0.0/0", "gw": "x"}]},
        {"dns": {"nameservers": "10.0.0.1"}},
    ],
)
def test_bad_prev_result_is_a_decoding_failure(bad: Any) -> None:
    with pytest.raises(p.CniError) as e:
        p.parse_result(bad)
    assert e.value.code == p.ERR_DECODING_FAILURE


def test_error_object() -> None:
    e = p.CniError(11, "try later", "API down")
    assert e.to_json("0.4.0") == {
        "cniVersion": "0.4.0",
        "code": 11,
        "msg": "try later",
        "details": "API down",
    }
    assert p.CniError(999, "x").to_json("1.1.0") == {"cniVersion": "1.1.0", "code": 999, "msg": "x"}
    assert json.loads(p.dumps(e.to_json("1.0.0")))["code"] == 11
