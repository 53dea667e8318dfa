"""Turns a run's measurements into the JSON document (items, targets, breakdown) and the table."""

from __future__ import annotations

import statistics
from typing import Any

from .connrate import CIDR_COUNTS
from .cri import lines as cri_lines
from .items import CIDR_COUNT, SCALE_CIDRS, SCALE_PORTS, SYSTEM_PYTHON, Bench

ADD_VS_FLOOR = 1.25
ADD_RSS_MIB = 40.0
INIT_VS_PIECES = 1.5
CONCURRENT_SHARE = 0.6
PLANNING_MS = 250.0
# Native nftables with sets: the connection rate at the most excluded CIDRs, as a share of at none.
CONNRATE_SHARE = 0.9


def _group_status(bench: Bench, group: str, series: list[str]) -> dict[str, Any]:
    st = bench.status.get(group)
    if st is not None:
        return dict(st)
    runs = [bench.series.get(k) for k in series]
    if any(s is not None and s.failures for s in runs):
        return {
            "status": "failed",
            "reason": next(s.failures[0] for s in runs if s is not None and s.failures),
        }
    if any(s is None or not s.seconds for s in runs):
        return {"status": "not run"}
    return {"status": "ok"}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def build(bench: Bench, planning: dict[str, Any] | None, breakdown: dict[str, Any]) -> dict[str, Any]:
    s = {k: v.summary() for k, v in bench.series.items()}
    items: dict[str, Any] = {}
    in_process = {k.split(".", 1)[1]: round(statistics.median(v) * 1000, 2) for k, v in bench.values.items()}
    if "floor" in bench.items:
        items["floor"] = _group_status(bench, "floor", ["floor.add", "floor.restore_v4"])
        items["floor"].update(
            add=s.get("floor.add"),
            pieces={
                "python_S_start": s.get("floor.python_S"),
                "python_site_start": s.get("floor.python_site"),
                "nsenter_net_true": s.get("floor.nsenter"),
                "iptables_restore": s.get("floor.restore_v4"),
                "ip6tables_restore": s.get("floor.restore_v6"),
                "in_process_median_ms": in_process,
            },
        )
    if "cni" in bench.items:
        items["cni"] = _group_status(bench, "cni", ["cni.add", "cni.check", "cni.del"])
        items["cni"].update(add=s.get("cni.add"), check=s.get("cni.check"), **{"del": s.get("cni.del")})
        zst = bench.status.get("cni_zipapp")
        if "cni.add_zipapp" in s or zst:
            items["cni"]["add_zipapp"] = s.get("cni.add_zipapp")
            items["cni"]["zipapp_shebang"] = bench.info.get("zipapp_shebang")
            zfail = (zst or {}).get("reason") or next(
                iter(s["cni.add_zipapp"].get("failure_reasons", [])), ""
            )
            if zfail:
                items["cni"]["zipapp_failure"] = zfail
                if items["cni"]["status"] == "ok":
                    items["cni"].update(status="failed", reason=f"the install-cni zipapp: {zfail}")
        else:
            items["cni"]["add_zipapp"] = None
            items["cni"]["zipapp_unavailable"] = bench.info.get("zipapp_unavailable", "not built")
        sst = bench.status.get("cni_selfcontained")
        items["cni"]["add_selfcontained"] = s.get("cni.add_selfcontained")
        items["cni"]["add_kubectl_kubeconfig"] = s.get("cni.add_kubectl_kubeconfig")
        items["cni"]["selfcontained_version"] = bench.info.get("selfcontained_version")
        sfail = (
            (sst or {}).get("reason")
            or next(iter((s.get("cni.add_selfcontained") or {}).get("failure_reasons", [])), "")
            or bench.info.get("selfcontained_unavailable", "")
        )
        if sfail:
            items["cni"]["selfcontained_failure"] = sfail
        for k in ("cni_rule_lines", "cni_rules_equal_classic", "cni_vs_classic"):
            if k in bench.info:
                items["cni"][k] = bench.info[k]
    if "init" in bench.items:
        items["init"] = _group_status(bench, "init", ["init.apply", "init.dry_run"])
        items["init"].update(
            apply=s.get("init.apply"),
            dry_run=s.get("init.dry_run"),
            apply_injector=s.get("init.apply_injector"),
            injector_args=bench.info.get("injector_args"),
        )
        if "init_dry_run_equals_planner" in bench.info:
            items["init"]["dry_run_equals_planner"] = bench.info["init_dry_run_equals_planner"]
    if "old_way" in bench.items:
        items["old_way"] = _group_status(bench, "old_way", ["old_way.apply"])
        items["old_way"].update(apply=s.get("old_way.apply"), calls=bench.info.get("old_way_calls"))
    if "concurrency" in bench.items:
        items["concurrency"] = bench.status.get("concurrency", {"status": "not run"})
    if "scale" in bench.items:
        add = _group_status(bench, "scale_add", ["scale.add_cidrs"])
        status = add["status"] if planning is not None else "failed"
        items["scale"] = {
            "status": status,
            **({"reason": add["reason"]} if "reason" in add else {}),
            "plan_render": planning,
            "add_cidrs": s.get("scale.add_cidrs"),
            "add_cidrs_count": CIDR_COUNT,
        }
    if "nft" in bench.items:
        items["nft"] = _nft_item(bench, s)
    if "connrate" in bench.items:
        items["connrate"] = bench.connrate or {"status": "not run"}
    if "nftlib" in bench.items:
        items["nftlib"] = _nftlib_item(bench, s)
    if "cri" in bench.items:
        items["cri"] = bench.status.get("cri", {"status": "not run"})
    doc: dict[str, Any] = {
        "machine": bench.info.get("machine"),
        "params": {"reps": bench.reps, "concurrency": bench.concurrency, "quick": bench.quick},
        "items": items,
        "classic_rule_lines": bench.info.get("classic_rule_lines"),
        "run": {
            "netns_prefix": bench.ns.prefix,
            "api_server_pid": bench.server.pid if bench.server is not None else None,
            "rss_wrapper": " ".join(bench.rss_wrapper),
            "kubeconfig": bench.info.get("kubeconfig"),
            "zipapp_shebang": bench.info.get("zipapp_shebang"),
        },
    }
    doc["targets"] = _targets(bench, planning)
    doc["breakdown"] = _breakdown(bench, breakdown)
    doc["failures"] = sum(1 for it in items.values() if it.get("status") == "failed")
    return doc


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def _nft_item(bench: Bench, s: dict[str, Any]) -> dict[str, Any]:
    """The CNI ADD and the init container with native nftables, beside their iptables runs."""
    item = _group_status(bench, "nft_cni", ["nft.cni_add"])
    init = _group_status(bench, "nft_init", ["nft.init_apply", "nft.init_dry_run"])
    if item["status"] == "ok" and init["status"] != "ok":
        item = init

    def med(key: str) -> float | None:
        return (s.get(key) or {}).get("median_ms")

    item.update(
        cni_add=s.get("nft.cni_add"),
        cni_add_iptables=s.get("cni.add"),
        cni_add_vs_iptables=_ratio(med("nft.cni_add"), med("cni.add")),
        init_apply=s.get("nft.init_apply"),
        init_apply_iptables=s.get("init.apply"),
        init_apply_vs_iptables=_ratio(med("nft.init_apply"), med("init.apply")),
        init_dry_run=s.get("nft.init_dry_run"),
    )
    infos = ("classic_nft_rule_lines", "cni_nft_rule_lines", "cni_nft_rules_equal_classic",
             "cni_nft_vs_classic", "init_nft_dry_run_equals_planner")  # fmt: skip
    for k in infos:
        if k in bench.info:
            item[k] = bench.info[k]
    return item


def _nftlib_item(bench: Bench, s: dict[str, Any]) -> dict[str, Any]:
    """nft -f - against libnftables, and which is cheaper."""
    item = _group_status(bench, "nftlib", ["nftlib.binary", "nftlib.library", "nftlib.nft"])
    in_process = {k: round(statistics.median(v), 3) for k, v in sorted(bench.nftlib_values.items())}
    item.update(
        interpreter=f"{SYSTEM_PYTHON} -S",
        binding=bench.info.get("nftables_binding"),
        python_S=s.get("nftlib.python_S"),
        binary=s.get("nftlib.binary"),
        library=s.get("nftlib.library"),
        nft_alone=s.get("nftlib.nft"),
        in_process_median=in_process,
    )
    b, lib = s.get("nftlib.binary") or {}, s.get("nftlib.library") or {}
    if "median_ms" in b and "median_ms" in lib:
        cheaper = "binary" if b["median_ms"] <= lib["median_ms"] else "library"
        item["time_cheaper"] = cheaper
        item["library_vs_binary"] = _ratio(lib["median_ms"], b["median_ms"])
        item["difference_ms"] = round(abs(lib["median_ms"] - b["median_ms"]), 2)
    # Memory held at once: the library is one process; the binary variant holds the interpreter
    # and nft together while nft runs.
    own_b, own_lib = in_process.get("binary.hwm_kib"), in_process.get("library.hwm_kib")
    nft_rss = (s.get("nftlib.nft") or {}).get("peak_rss_mib")
    if own_b is not None and own_lib is not None and nft_rss is not None:
        item["held_at_once_mib"] = {
            "binary": round(own_b / 1024 + nft_rss, 1),
            "binary_python": round(own_b / 1024, 1),
            "binary_nft": nft_rss,
            "library": round(own_lib / 1024, 1),
        }
        item["memory_cheaper"] = (
            "binary"
            if item["held_at_once_mib"]["binary"] <= item["held_at_once_mib"]["library"]
            else "library"
        )
    return item


def _target(
    name: str,
    value: float | None,
    limit: float | None,
    unit: str,
    extra: bool = True,
    *,
    at_least: bool = False,
) -> dict[str, Any]:
    """PASS when value <= limit (value >= limit with ``at_least``) and ``extra`` holds."""
    if value is None or limit is None:
        ok = None
    else:
        ok = (value >= limit if at_least else value <= limit) and extra
    out = {
        "target": name,
        "value": None if value is None else round(value, 2),
        "limit": None if limit is None else round(limit, 2),
        "unit": unit,
        "result": "n/a" if ok is None else ("PASS" if ok else "FAIL"),
    }
    if at_least:
        out["at_least"] = True
    return out


def _targets(bench: Bench, planning: dict[str, Any] | None) -> list[dict[str, Any]]:
    def med(key: str) -> float | None:
        ser = bench.series.get(key)
        return None if ser is None else _ms(ser.median)

    add, floor = med("cni.add"), med("floor.add")
    rss_ser = bench.series.get("cni.add")
    rss = max(rss_ser.rss_kib) / 1024 if rss_ser and rss_ser.rss_kib else None
    pieces = [med("floor.python_S"), med("floor.restore_v4"), med("floor.restore_v6")]
    init_limit = INIT_VS_PIECES * sum(p for p in pieces if p is not None) if None not in pieces else None
    conc = bench.status.get("concurrency", {})
    n = bench.concurrency
    rates = {
        (p["backend"], p["excluded_cidrs"]): p.get("conn_per_s")
        for p in (bench.connrate or {}).get("points", [])
        if p.get("status") == "ok"
    }
    most = max(CIDR_COUNTS)
    nft_zero = rates.get(("nftables", 0))
    return [
        _target(
            f"init apply, the injector's command line <= {INIT_VS_PIECES} x (python -S + both restores)",
            med("init.apply_injector"),
            init_limit,
            "ms",
        ),
        _target(
            f"CNI ADD with kubectl's YAML kubeconfig <= {ADD_VS_FLOOR} x floor",
            med("cni.add_kubectl_kubeconfig"),
            None if floor is None else ADD_VS_FLOOR * floor,
            "ms",
        ),
        _target(
            f"CNI ADD median <= {ADD_VS_FLOOR} x floor",
            add,
            None if floor is None else ADD_VS_FLOOR * floor,
            "ms",
        ),
        _target(f"CNI ADD peak RSS <= {ADD_RSS_MIB:g} MiB", rss, ADD_RSS_MIB, "MiB"),
        _target(
            f"self-contained plugin ADD median <= {ADD_VS_FLOOR} x floor",
            med("cni.add_selfcontained"),
            None if floor is None else ADD_VS_FLOOR * floor,
            "ms",
        ),
        _target(
            "self-contained plugin ADD median <= zipapp ADD median (same run)",
            med("cni.add_selfcontained"),
            med("cni.add_zipapp"),
            "ms",
        ),
        _target(
            f"init apply median <= {INIT_VS_PIECES} x (python -S start + both restores)",
            med("init.apply"),
            init_limit,
            "ms",
        ),
        _target(
            f"{n} concurrent ADDs: 0 failures, wall <= {CONCURRENT_SHARE:.0%} of {n} x ADD median",
            conc.get("wall_ms"),
            None if add is None or "wall_ms" not in conc else CONCURRENT_SHARE * n * add,
            "ms",
            extra=conc.get("failures", 1) == 0,
        ),
        _target(
            f"plan+render {SCALE_CIDRS:,} CIDRs + {SCALE_PORTS:,} ports <= {PLANNING_MS:g} ms",
            None if planning is None else planning.get("median_ms"),
            PLANNING_MS,
            "ms",
        ),
        _target(
            "CNI ADD with native_nftables median <= iptables ADD median (same run)",
            med("nft.cni_add"),
            add,
            "ms",
        ),  # fmt: skip
        _target(
            f"nftables sets: conn/s at {most:,} excluded CIDRs >= {CONNRATE_SHARE:.0%} of at 0",
            rates.get(("nftables", most)),
            None if nft_zero is None else CONNRATE_SHARE * nft_zero,
            "conn/s",
            at_least=True,
        ),
    ]


def _split(
    total: float,
    base: dict[str, float],
    profile: dict[str, Any],
    api_ms: float | None,
    costs: dict[str, float],
) -> dict[str, Any]:
    """One process's median split into pieces measured separately; 'rest' is the difference.

    With an exec census (strace), every spawn is charged what it costs alone: namespace entry
    (nsenter, or a Python launcher) apart from the iptables binaries' own work."""
    nsenter = base["nsenter"]
    parts: dict[str, float] = {
        "interpreter_start_ms": base["start"],
        "site_startup_ms": base["site"],
        "imports_ms": profile.get("imports_after_startup_ms", 0.0),
    }
    if api_ms is not None:
        parts["api_call_ms"] = api_ms
    counts: dict[str, int] = profile.get("execs", {}).get("counts", {})
    notes: dict[str, str] = {}
    if counts:
        launchers = {p: n for p, n in counts.items() if p == "nsenter" or p.endswith("nsexec.py")}
        entry = 0.0
        for p, n in launchers.items():
            cost = (
                nsenter if p == "nsenter" else next((v for k, v in costs.items() if k.startswith(p)), nsenter)
            )
            entry += n * cost
        parts["netns_entry_ms"] = entry
        notes["netns_entry_ms"] = ", ".join(f"{n} x {p}" for p, n in launchers.items())
        restores = [p for p in counts if p.endswith("-restore")]
        parts["restores_ms"] = max(0.0, base["restores"] - 2 * nsenter) * sum(counts[p] for p in restores) / 2
        notes["restores_ms"] = ", ".join(f"{counts[p]} x {p}" for p in restores)
        saves = [p for p in counts if p.endswith("-save")]
        parts["state_reads_ms"] = sum(
            counts[p] * max(0.0, costs.get(f"nsenter + {p}", nsenter) - nsenter) for p in saves
        )
        notes["state_reads_ms"] = ", ".join(f"{counts[p]} x {p}" for p in saves)
        others = {
            p: n for p, n in counts.items() if p not in launchers and p not in restores and p not in saves
        }
        if others:
            parts["other_programs_ms"] = sum(
                n * next((v for k, v in costs.items() if k.split()[0] == p), 0.0) for p, n in others.items()
            )
            notes["other_programs_ms"] = ", ".join(f"{n} x {p}" for p, n in others.items())
    else:
        parts["restores_ms"] = base["restores"]
        notes["restores_ms"] = "2 x (nsenter + restore), measured alone"
    parts = {k: round(v, 2) for k, v in parts.items()}
    return {
        "median_ms": total,
        **parts,
        "rest_ms": round(total - sum(parts.values()), 2),
        "notes": notes,
    }


def _breakdown(bench: Bench, prof: dict[str, Any]) -> dict[str, Any]:
    """The ADD (and init apply) medians split into their pieces."""

    def med(key: str) -> float | None:
        ser = bench.series.get(key)
        return None if ser is None else _ms(ser.median)

    start = med("floor.python_S") or 0.0
    base = {
        "start": start,
        "site": round(max(0.0, (med("floor.python_site") or 0.0) - start), 2),
        "restores": (med("floor.restore_v4") or 0.0) + (med("floor.restore_v6") or 0.0),
        "nsenter": med("floor.nsenter") or 0.0,
    }
    costs = {
        k[len("spawn.") :]: round(statistics.median(v.seconds) * 1000, 2)
        for k, v in bench.series.items()
        if k.startswith("spawn.") and v.seconds
    }
    if base["nsenter"]:
        costs["nsenter --net true"] = base["nsenter"]
    out: dict[str, Any] = {
        "floor": {
            "median_ms": med("floor.add"),
            "imports_ms": _median(bench.values.get("floor.imports_ms")),
            "get_ms": _median(bench.values.get("floor.get_ms")),
            "restores_ms": _sum(
                _median(bench.values.get("floor.restore_v4_ms")),
                _median(bench.values.get("floor.restore_v6_ms")),
            ),
        },
        "spawn_costs_ms": costs,
    }
    add = med("cni.add")
    if add is not None and "imports_total_ms" in prof:
        out["add"] = _split(add, base, prof, prof.get("api", {}).get("fetch_pod_ms"), costs)
        out["add"]["cpu_ms"] = _ms(statistics.median(bench.series["cni.add"].cpu))
    init = med("init.apply")
    if init is not None and "imports_total_ms" in prof.get("init", {}):
        out["init"] = _split(init, base, prof["init"], None, costs)
    out["profile"] = prof
    return out


def _median(v: list[float] | None) -> float | None:
    return None if not v else round(statistics.median(v) * 1000, 2)


def _sum(*v: float | None) -> float | None:
    return None if any(x is None for x in v) else round(sum(x for x in v if x is not None), 2)


# ------------------------------------------------------------------------------------ table


def _row(label: str, st: dict[str, Any] | None, note: str = "") -> str:
    if not st or not st.get("n"):
        fails = f"{st['failures']} failed" if st and st.get("failures") else "-"
        return f"  {label:<46} {'':>4} {fails:>9} {'':>9} {'':>9}  {note}"
    rss = f"{st['peak_rss_mib']:.1f}" if "peak_rss_mib" in st else ""
    fail = f"  {st['failures']} FAILED" if st.get("failures") else ""
    return f"  {label:<46} {st['n']:>4} {st['median_ms']:>9.1f} {st['p95_ms']:>9.1f} {rss:>9}  {note}{fail}"


def _status_line(item: dict[str, Any]) -> str:
    if item.get("status") in ("ok", None):
        return ""
    return f"  ({item['status']}: {item.get('reason', '')})"


def _versus(ratio: float | None, what: str, other: dict[str, Any] | None) -> str:
    if ratio is None or not other:
        return ""
    return f"{ratio:.2f} x {what} ({other['median_ms']:.1f} ms)"


def _nft_lines(n: dict[str, Any]) -> list[str]:
    out = ["7. native nftables (interleaved with the iptables runs of 2. and 3.)" + _status_line(n)]
    add_vs = _versus(n.get("cni_add_vs_iptables"), "iptables ADD", n.get("cni_add_iptables"))
    init_vs = _versus(n.get("init_apply_vs_iptables"), "iptables apply", n.get("init_apply_iptables"))
    out.append(_row('CNI ADD, "native_nftables": true', n.get("cni_add"), add_vs))
    out.append(_row("init apply --native-nftables", n.get("init_apply"), init_vs))
    out.append(_row("--native-nftables --dry-run", n.get("init_dry_run")))
    if "cni_nft_rule_lines" in n:
        out.append(
            f"  rules: the ADD leaves {n['cni_nft_rule_lines']} nft rule lines (the classic rules: "
            f"{n.get('classic_nft_rule_lines')}, as the init apply leaves them); "
            f"dry run = planner: {n.get('init_nft_dry_run_equals_planner')}"
        )
    return out


def _connrate_lines(c: dict[str, Any]) -> list[str]:
    m = c.get("method", {})
    out = [
        "8. connection rate: new TCP connections/s from the pod through nat OUTPUT to the redirect"
        + _status_line(c)
    ]
    if not c.get("points"):
        return out
    out.append(
        f"   ({m.get('slices_per_point')} x {m.get('slice_seconds')} s per point, interleaved; "
        f"destination {m.get('destination')}, excluded: {m.get('cidrs')})"
    )
    out.append(
        f"  {'backend':<16} {'excluded':>9} {'rules':>7} {'conn/s':>9} {'vs 0':>6} {'us/conn':>8} "
        f"{'load ms':>8} {'slowest':>8} {'conntrack':>10}"
    )
    for p in c["points"]:
        name = "iptables-nft" if p["backend"] == "iptables" else "nftables (sets)"
        if p.get("status") != "ok" or "conn_per_s" not in p:
            out.append(f"  {name:<16} {p['excluded_cidrs']:>9,} FAILED: {p.get('reason', '')[:200]}")
            continue
        out.append(
            f"  {name:<16} {p['excluded_cidrs']:>9,} {p['rule_lines']:>7,} {p['conn_per_s']:>9,.0f} "
            f"{p.get('vs_zero', 0):>6.2f} {p['us_per_connection']:>8.1f} {p['load_ms']:>8.1f} "
            f"{p['slowest_connect_ms']:>6.1f}ms {p['max_conntrack_entries']:>10,}"
        )
    pts = [p for p in c["points"] if "max_conntrack_entries" in p]
    if pts:
        worst = max(p["max_conntrack_entries"] for p in pts)
        drops = sum(p.get(k, 0) for p in pts for k in ("conntrack_insert_failed", "conntrack_drop",
                                                          "conntrack_early_drop"))  # fmt: skip
        tw = max(p.get("max_time_wait", 0) for p in pts)
        ctmax = m.get("nf_conntrack_max")
        out.append(
            f"  conntrack: at most {worst:,} entries in a namespace (nf_conntrack_max "
            f"{ctmax:,}), {drops} insert failures or drops; TIME_WAIT sockets: at most {tw}; "
            "redirect counter = connections"
            if ctmax
            else f"  conntrack: at most {worst:,} entries in a namespace, {drops} insert failures or drops"
        )
    return out


def _nftlib_lines(n: dict[str, Any]) -> list[str]:
    out = [
        f"9. nft -f - against libnftables (python3-nftables): the classic rules from {n.get('interpreter')}"
        + _status_line(n)
    ]
    out.append(_row("python3 -S -c pass (via nsenter)", n.get("python_S")))
    out.append(_row("binary: spawn nft -f -, write the script", n.get("binary")))
    out.append(_row("library: import nftables, Nftables().cmd()", n.get("library")))
    out.append(_row("nft -f - alone (via nsenter)", n.get("nft_alone")))
    ip = n.get("in_process_median", {})
    if ip:
        mib = {k: ip.get(f"{k}.hwm_kib", 0) / 1024 for k in ("binary", "library")}
        out.append(
            f"  in the process (medians): binary: nft {ip.get('binary.load_ms', 0):.1f} ms, own peak RSS "
            f"{mib['binary']:.1f} MiB; library: import {ip.get('library.import_ms', 0):.1f} ms, "
            f"Nftables() {ip.get('library.context_ms', 0):.1f} ms, "
            f"cmd {ip.get('library.load_ms', 0):.1f} ms, own peak RSS {mib['library']:.1f} MiB"
        )
    if "time_cheaper" in n:
        held = n.get("held_at_once_mib")
        mem = ""
        if held:
            mem = (
                f"; memory held at once: binary {held['binary']:.1f} MiB (python {held['binary_python']:.1f} "
                f"+ nft {held['binary_nft']:.1f}), library {held['library']:.1f} MiB: "
                f"the {n['memory_cheaper']} is smaller"
            )
        out.append(
            f"  cheaper in time: the {n['time_cheaper']}, by {n['difference_ms']:.1f} ms "
            f"(library = {n['library_vs_binary']:.2f} x binary){mem}"
        )
    return out


def _load(avg: list[float] | None) -> str:
    return "n/a" if not avg else "/".join(f"{v:.2f}" for v in avg)


def table(doc: dict[str, Any]) -> str:
    m = doc.get("machine") or {}
    p = doc["params"]
    out = [
        f"machine: {m.get('cpu')}, {m.get('cores')} cores, kernel {m.get('kernel')}, "
        f"Python {m.get('python')}, {m.get('iptables')}, {m.get('nft')}",
        f"reps {p['reps']}, concurrency {p['concurrency']}{', quick' if p['quick'] else ''}; "
        f"classic rules: {doc.get('classic_rule_lines')} rule lines (both families); "
        f"load average {_load(m.get('load_average_at_start'))} at the start, "
        f"{_load(m.get('load_average_at_end'))} at the end",
        "",
        f"  {'item':<46} {'n':>4} {'median ms':>9} {'p95 ms':>9} {'RSS MiB':>9}",
    ]
    items = doc["items"]
    if "floor" in items:
        f = items["floor"]
        pc = f["pieces"]
        ip = pc.get("in_process_median_ms", {})
        out.append("1. floor" + _status_line(f))
        out.append(_row("reference ADD (python -S, TLS GET, 2 restores)", f.get("add")))
        out.append(_row("python -S -c pass", pc.get("python_S_start")))
        out.append(_row("python -c pass (site, venv .pth)", pc.get("python_site_start")))
        out.append(_row("nsenter --net=NS true", pc.get("nsenter_net_true")))
        out.append(_row("iptables-restore (via nsenter)", pc.get("iptables_restore")))
        out.append(_row("ip6tables-restore (via nsenter)", pc.get("ip6tables_restore")))
        if ip:
            out.append(
                f"  {'in the floor process (medians):':<46} imports {ip.get('imports_ms')} ms, TLS GET "
                f"{ip.get('get_ms')} ms, restores {ip.get('restore_v4_ms')} + {ip.get('restore_v6_ms')} ms"
            )
    if "cni" in items:
        c = items["cni"]
        out.append("2. istio-cni (console script)" + _status_line(c))
        out.append(_row("ADD (TLS GET + both families)", c.get("add")))
        out.append(_row("CHECK", c.get("check")))
        out.append(_row("DEL", c.get("del")))
        if c.get("zipapp_failure"):
            out.append(f"  {'ADD, install-cni zipapp':<46} FAILED: {c['zipapp_failure'][:300]}")
        elif c.get("add_zipapp"):
            out.append(_row("ADD, install-cni zipapp (python -S)", c["add_zipapp"]))
        if c.get("add_kubectl_kubeconfig"):
            out.append(_row("ADD with kubectl's YAML kubeconfig", c["add_kubectl_kubeconfig"]))
        if c.get("add_selfcontained"):
            out.append(_row("ADD, self-contained plugin (install-cni's)", c["add_selfcontained"]))
        elif c.get("selfcontained_failure"):
            out.append(f"  {'ADD, self-contained plugin':<46} n/a: {c['selfcontained_failure'][:300]}")
        else:
            out.append(f"  {'ADD, install-cni zipapp':<46} n/a: {c.get('zipapp_unavailable')}")
    if "init" in items:
        i = items["init"]
        out.append("3. istio-iptables (init container)" + _status_line(i))
        out.append(_row("apply, the injector's command line (IPv4 pod)", i.get("apply_injector")))
        out.append(_row("apply --dual-stack into a fresh netns", i.get("apply")))
        out.append(_row("--dry-run", i.get("dry_run")))
    if "old_way" in items:
        o = items["old_way"]
        out.append("4. the old way" + _status_line(o))
        out.append(_row(f"{o.get('calls')} iptables/ip6tables calls (sh)", o.get("apply")))
    if "concurrency" in items:
        c = items["concurrency"]
        out.append("5. concurrency" + _status_line(c))
        if "wall_ms" in c:
            out.append(_row(f"{c['concurrency']} ADDs at once: latency of each", c.get("latency")))
            out.append(
                f"  wall {c['wall_ms']:.0f} ms (median of {c['rounds']} rounds: {c['wall_ms_each_round']}), "
                f"p99 {c['p99_ms']} ms, failures {c['failures']}, "
                f"CPU use {c['cpu_utilisation']:.0%} of all cores"
            )
            out.append(
                f"  CPU per ADD {c['cpu_ms_per_add']:.0f} ms: {c['concurrency']} ADDs need at least "
                f"{c['cpu_bound_wall_ms']:.0f} ms on {c['cores']} cores"
            )
    if "scale" in items:
        sc = items["scale"]
        out.append("6. scale" + _status_line(sc))
        pl = sc.get("plan_render")
        if pl:
            out.append(
                _row(
                    f"plan+render {SCALE_CIDRS:,} CIDRs + {SCALE_PORTS:,} ports",
                    pl,
                    f"in-process, {pl['rules']} rules, {pl['restore_bytes'] // 1024} KiB",
                )
            )
            if "parse" in pl:
                out.append(_row("parse the same from option strings", pl["parse"], "in-process"))
        out.append(_row(f"ADD with {CIDR_COUNT:,} excluded CIDRs (annotation)", sc.get("add_cidrs")))
    if "nft" in items:
        out += _nft_lines(items["nft"])
    if "connrate" in items:
        out += _connrate_lines(items["connrate"])
    if "nftlib" in items:
        out += _nftlib_lines(items["nftlib"])
    if "cri" in items:
        out += cri_lines(items["cri"], _row, _status_line(items["cri"]))
    out += ["", "targets"]
    for t in doc["targets"]:
        fmt = ",.0f" if t["unit"] == "conn/s" else ".1f"
        val = "n/a" if t["value"] is None else f"{t['value']:{fmt}} {t['unit']}"
        lim = "n/a" if t["limit"] is None else f"{t['limit']:{fmt}} {t['unit']}"
        bound = "at least" if t.get("at_least") else "limit"
        out.append(f"  {t['result']:<5} {t['target']:<70} {val:>12} ({bound} {lim})")
    b = doc.get("breakdown") or {}
    prof = b.get("profile", {})
    for key, title, p in (("add", "CNI ADD", prof), ("init", "init apply", prof.get("init", {}))):
        part = b.get(key)
        if not part:
            continue
        fl = b.get("floor", {})
        out += [
            "",
            f"where the time goes: {title} median {part['median_ms']:.1f} ms "
            f"(floor ADD {fl.get('median_ms')} ms)",
        ]
        floor_note = {
            "imports_ms": f"floor: {fl.get('imports_ms')} ms",
            "api_call_ms": f"floor: {fl.get('get_ms')} ms",
            "site_startup_ms": "floor: none (-S)",
        }
        labels = {
            "interpreter_start_ms": "interpreter start (python -S -c pass)",
            "site_startup_ms": "site start-up (site, venv .pth files)",
            "imports_ms": "imports after start-up (-X importtime)",
            "api_call_ms": "API call (kubeconfig, TLS, GET; cni.kube)",
            "netns_entry_ms": "netns entry",
            "restores_ms": "restores (the binaries' own time)",
            "state_reads_ms": "state reads (iptables-save, detection)",
            "other_programs_ms": "other programs",
            "rest_ms": "rest (plugin logic, netlink, logs; by difference)",
        }
        for k, label in labels.items():
            if k in part:
                note = part["notes"].get(k) or floor_note.get(k, "")
                if k == "restores_ms" and key == "add":
                    note += f"; floor: {fl.get('restores_ms')} ms incl. nsenter"
                out.append(f"  {label:<50} {part[k]:>8.1f} ms  {note}")
        top = list(p.get("imports_by_package_ms", {}).items())[:8]
        if top:
            out.append("  imports by top-level package (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in top))
        cprof = [row for row in p.get("cprofile", []) if "function" in row][:6]
        if cprof:
            out.append(
                "  cProfile, cumulative (profiler-inflated): "
                + ", ".join(
                    f"{row['function'].split('(')[-1].rstrip(')')} {row['cumulative_ms']:.0f}"
                    for row in cprof
                )
            )
    zp = prof.get("zipapp", {})
    if "imports_total_ms" in zp:
        ztop = ", ".join(f"{k} {v:.1f}" for k, v in list(zp["imports_by_package_ms"].items())[:6])
        out.append(
            f"  zipapp ADD (python -S): imports {zp['imports_after_startup_ms']:.1f} ms after start-up; "
            f"by package: {ztop}"
        )
    costs = b.get("spawn_costs_ms", {})
    if costs and ("add" in b or "init" in b):
        out.append("  programs alone (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()))
    for line in prof.get("plugin_debug_timings", [])[:4]:
        out.append(f"  plugin log: {line[:160]}")
    return "\n".join(out)
