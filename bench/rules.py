"""What the kernel holds after a run: iptables-save of both families in a namespace, reduced to
tables, our chains and rule lines (no counters), so two namespaces can be compared exactly; and
for native nftables, the ruleset as ``nft -s list ruleset`` prints it."""

from __future__ import annotations

from typing import Any

from . import proc

BUILTIN = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
FAMILIES = (("v4", "iptables-save"), ("v6", "ip6tables-save"))


def parse_save(text: str) -> dict[str, dict[str, list[str]]]:
    """``{table: {"chains": [...non-built-in...], "rules": [...-A lines...]}}``; tables holding
    nothing but empty built-in chains are left out (iptables-nft lists tables that merely exist)."""
    tables: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), {"chains": [], "rules": []})
        elif current is None:
            continue
        elif line.startswith(":"):
            name = line[1:].split()[0]
            if name not in BUILTIN:
                current["chains"].append(name)
        elif line.startswith("-A "):
            current["rules"].append(line)
    return {t: v for t, v in tables.items() if v["chains"] or v["rules"]}


def dump(netns_path: str) -> dict[str, Any]:
    """Both families' rules in the namespace (raises RuntimeError when a save fails)."""
    out: dict[str, Any] = {}
    for fam, cmd in FAMILIES:
        r = proc.run(["nsenter", f"--net={netns_path}", "--", cmd], timeout=30)
        if not r.ok:
            raise RuntimeError(r.describe())
        out[fam] = parse_save(r.stdout.decode())
    return out


def rule_count(d: dict[str, Any]) -> int:
    return sum(len(t["rules"]) for fam in d.values() for t in fam.values())


def has_capture(d: dict[str, Any]) -> bool:
    """Both families hold the nat chains of sidecar capture."""
    need = {"ISTIO_INBOUND", "ISTIO_OUTPUT", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT"}
    return all(need <= set(d.get(fam, {}).get("nat", {}).get("chains", [])) for fam, _ in FAMILIES)


def difference(expected: dict[str, Any], actual: dict[str, Any]) -> str:
    """Empty when equal; otherwise a short description of the first differences."""
    if expected == actual:
        return ""
    notes = []
    for fam, _ in FAMILIES:
        e, a = expected.get(fam, {}), actual.get(fam, {})
        for table in sorted(set(e) | set(a)):
            er = e.get(table, {"chains": [], "rules": []})
            ar = a.get(table, {"chains": [], "rules": []})
            missing = [r for r in er["rules"] if r not in ar["rules"]]
            extra = [r for r in ar["rules"] if r not in er["rules"]]
            if missing or extra or er != ar:
                notes.append(
                    f"{fam} {table}: {len(ar['rules'])} rules (expected {len(er['rules'])})"
                    + (f", missing {missing[0]!r}" if missing else "")
                    + (f", unexpected {extra[0]!r}" if extra else "")
                    + ("" if missing or extra else ", different order or chains")
                )
    return "; ".join(notes[:3])


def nft_dump(netns_path: str) -> list[str]:
    """The namespace's whole nf_tables ruleset (``nft -s list ruleset``: no counter values), one
    stripped line each. iptables-nft's tables show up here too."""
    r = proc.run(["nsenter", f"--net={netns_path}", "--", "nft", "-s", "list", "ruleset"], timeout=30)
    if not r.ok:
        raise RuntimeError(r.describe())
    return [line.strip() for line in r.stdout.decode().splitlines() if line.strip()]


def nft_rule_count(lines: list[str]) -> int:
    """Rule lines in an ``nft_dump`` (not tables, chains, their types or braces)."""
    skip = ("table ", "chain ", "type ", "}")
    return sum(1 for line in lines if not line.startswith(skip))


def nft_difference(expected: list[str], actual: list[str]) -> str:
    """Empty when equal; otherwise the first line that differs."""
    if expected == actual:
        return ""
    for i, (e, a) in enumerate(zip(expected, actual, strict=False)):
        if e != a:
            return f"nft ruleset line {i + 1}: {a!r}, expected {e!r}"
    return f"nft ruleset: {len(actual)} lines, expected {len(expected)}"
