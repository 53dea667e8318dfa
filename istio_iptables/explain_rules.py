"""Front ends of ``--explain``: rules in the forms iptables and nft print them, read into the
evaluator's model (explain.Model).

Three spellings, one model:

- iptables rule specifications: the planner's arguments (``-p tcp --dport 15008 -j RETURN``) and
  iptables-save's lines (``-p tcp -m tcp --dport 15008 -j RETURN``), legacy or nft variant;
- nft rule text: the bodies the planner writes for native nftables (``meta l4proto tcp tcp dport
  15008 counter return``);
- ``nft -j list ruleset``: what a namespace holds, for native nftables and foreign nft tables.

The planned walk reads the planner's rules; the live walk (explain_live) reads iptables-save or
``nft -j``. Both end in the same model and the same evaluator, and a test loads the planned rules
into a namespace and requires the two models to be equal (explain.Model.signature).

Whatever a parser does not know (an iptables module or target, an nft expression) becomes an
UnknownMatch / unknown verdict: a walk that reaches it stops with ``verdict: unknown``.
"""

from __future__ import annotations

import ipaddress
import shlex
from typing import Any

from . import explain as x
from .nftables import _BASE as NFT_BASE
from .nftables import _REGULAR as NFT_REGULAR
from .nftables import TABLES as NFT_TABLES
from .nftables import chain_name
from .ruleset import BUILTIN_CHAINS, NftRules, Rule, Ruleset

MASK = x.MASK32

# iptables tables: their built-in chains, the hook each is on, and the priority of the table.
IPT_CHAINS = {
    "raw": ("PREROUTING", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}
IPT_PRIORITY = {"raw": -300, "mangle": -150, "nat": -100, "filter": 0, "security": 50}
_NAT_SRC_PRIORITY = 100  # nat POSTROUTING and INPUT (source NAT)
# iptables' tables as iptables-nft keeps them in nf_tables (ip/ip6 family, these names).
IPT_TABLE_NAMES = frozenset(IPT_CHAINS)

_PROTO_NUMBERS = {"6": "tcp", "17": "udp", "1": "icmp", "58": "ipv6-icmp", "132": "sctp", "136": "udplite"}
_PROTO_NAMES = {"tcp", "udp", "icmp", "icmpv6", "ipv6-icmp", "sctp", "udplite", "esp", "ah", "gre"}


def ipt_chain(table: str, chain: str) -> x.Chain:
    """An empty iptables chain; a built-in one is a base chain on its hook."""
    if chain not in BUILTIN_CHAINS or chain not in IPT_CHAINS.get(table, ()):
        return x.Chain(chain, policy="-")
    hook = chain.lower()
    prio = IPT_PRIORITY[table]
    if table == "nat" and hook in ("postrouting", "input"):
        prio = _NAT_SRC_PRIORITY
    kind = "nat" if table == "nat" else ("route" if (table, hook) == ("mangle", "output") else "filter")
    return x.Chain(chain, hook=hook, priority=prio, kind=kind)


class ParseError(ValueError):
    pass


# --------------------------------------------------------------------------- values


def _addr_ranges(value: str, family: int) -> tuple[tuple[int, int], ...]:
    out = []
    for item in value.split(","):
        item = item.strip()
        if "-" in item and "/" not in item:
            lo, hi = item.split("-", 1)
            a, b = ipaddress.ip_address(lo.strip()), ipaddress.ip_address(hi.strip())
            if a.version != family or b.version != family:
                raise ParseError(f"{item}: not an IPv{family} range")
            out.append((int(a), int(b)))
            continue
        net = ipaddress.ip_network(item, strict=False)
        if net.version != family:
            raise ParseError(f"{item}: not an IPv{family} address")
        out.append(x.interval(net))
    return tuple(out)


def _int(text: str) -> int:
    t = text.strip()
    return int(t, 16) if t.lower().startswith("0x") else int(t, 10)


def _port_ranges(value: str, sep: str) -> tuple[tuple[int, int], ...]:
    out = []
    for item in value.split(","):
        item = item.strip()
        lo, s, hi = item.partition(sep)
        a = int(lo) if lo else 0
        b = int(hi) if s and hi else (65535 if s else a)
        out.append((a, b))
    return tuple(out)


def _id_ranges(value: str, kind: str) -> tuple[tuple[int, int], ...]:
    out = []
    for item in value.split(","):
        item = item.strip()
        lo, dash, hi = item.partition("-")
        if lo.isdigit() and (not dash or hi.isdigit()):
            out.append((int(lo), int(hi) if dash else int(lo)))
            continue
        out.append((_resolve(item, kind),) * 2)
    return tuple(out)


def _resolve(name: str, kind: str) -> int:
    """A user or group name as the kernel's rule holds it (iptables and nft resolve names when
    they load rules; the planner writes names as given)."""
    try:
        if kind == "uid":
            import pwd

            return pwd.getpwnam(name).pw_uid
        import grp

        return grp.getgrnam(name).gr_gid
    except (KeyError, ValueError):
        raise ParseError(
            f"{'user' if kind == 'uid' else 'group'} {name!r} is not known on this machine"
        ) from None


def _mark(value: str) -> tuple[int, int]:
    v, slash, m = value.partition("/")
    return _int(v), (_int(m) if slash else MASK)


def _proto(value: str) -> str:
    v = value.lower()
    return _PROTO_NUMBERS.get(v, v)


# --------------------------------------------------------------------------- iptables


_BASE_OPTS = {
    "-s": "saddr", "--source": "saddr", "--src": "saddr",
    "-d": "daddr", "--destination": "daddr", "--dst": "daddr",
    "-i": "iif", "--in-interface": "iif",
    "-o": "oif", "--out-interface": "oif",
    "-p": "proto", "--protocol": "proto",
    "-f": "frag", "--fragment": "frag",
}  # fmt: skip
_STARTS = frozenset({*_BASE_OPTS, "-m", "--match", "-j", "--jump", "-g", "--goto", "-c", "--set-counters"})
_PORT_OPTS = {
    "--dport": "dport", "--destination-port": "dport", "--sport": "sport", "--source-port": "sport",
    "--dports": "dport", "--destination-ports": "dport", "--sports": "sport", "--source-ports": "sport",
}  # fmt: skip
_NO_VALUE = frozenset(
    {"--syn", "--socket-exists", "--suppl-groups", "--save-mark", "--restore-mark", "--notrack"}
)
_NOOP_TARGETS = frozenset({"LOG", "NFLOG", "ULOG", "TRACE", "AUDIT"})


def parse_iptables_rule(
    chain: str, spec: list[str] | tuple[str, ...], family: int, chains: set[str]
) -> x.XRule:
    """One iptables rule (``spec``: the tokens after ``-A CHAIN``) of a table whose chains are
    ``chains``."""
    text = " ".join(["-A", chain, *(_quote(t) for t in spec)])
    items: list[x.Match | x.Action] = []
    verdict: x.Verdict | None = None
    tokens = list(spec)
    i = 0
    negate = False
    module: str | None = None
    proto: str | None = None
    owner: list[x.Owner] = []
    owner_text: list[str] = []
    unknown_module = False

    def flush_owner() -> None:
        if owner:
            items.append(x.OwnerMatch(tuple(owner), xt=True, text=" ".join(["-m owner", *owner_text])))
            owner.clear()
            owner_text.clear()

    def value(at: int) -> str:
        if at + 1 >= len(tokens):
            raise ParseError(f"{tokens[at]} without a value")
        return tokens[at + 1]

    while i < len(tokens):
        t = tokens[i]
        if t == "!":
            negate = True
            i += 1
            continue
        bang = "! " if negate else ""
        if t in ("-c", "--set-counters"):
            i += 3
            continue
        if t in _BASE_OPTS:
            what = _BASE_OPTS[t]
            if what == "frag":
                items.append(x.ConstMatch(negate, "the first packet is not a fragment", text=f"{bang}{t}"))
                i += 1
            else:
                v = value(i)
                shown = f"{bang}{t} {v}"
                if what in ("saddr", "daddr"):
                    items.append(x.AddrMatch(what, family, _addr_ranges(v, family), negate, text=shown))
                elif what in ("iif", "oif"):
                    items.append(x.IfaceMatch(what, (v,), negate, "+", text=shown))
                else:
                    p = _proto(v)
                    if p not in ("all", "0"):
                        items.append(x.ProtoMatch(frozenset({p}), negate, text=shown))
                    if not negate:
                        proto = p
                i += 2
            negate = False
            continue
        if t in ("-m", "--match"):
            flush_owner()
            module = value(i)
            unknown_module = module not in ("tcp", "udp", "multiport", "owner", "mark", "connmark",
                                             "conntrack", "state", "comment")  # fmt: skip
            if unknown_module:
                items.append(x.UnknownMatch(f"the {module} match is not modelled", text=f"-m {module}"))
            i += 2
            negate = False
            continue
        if t in ("-j", "--jump", "-g", "--goto"):
            flush_owner()
            target = value(i)
            verdict, actions = _ipt_target(target, tokens[i + 2 :], t in ("-g", "--goto"), chains)
            items.extend(actions)
            break
        # A module option.
        takes_value = t not in _NO_VALUE
        v = value(i) if takes_value else ""
        shown = f"{bang}{t} {v}".rstrip()
        i += 2 if takes_value else 1
        if unknown_module:
            # Its options belong to the UnknownMatch already recorded; keep them in its text.
            last = items[-1]
            last.text = f"{last.text} {shown}"
            negate = False
            continue
        if t in _PORT_OPTS and module in (None, "tcp", "udp", "multiport"):
            port_proto = module if module in ("tcp", "udp") else proto
            items.append(x.PortMatch(_PORT_OPTS[t], port_proto, _port_ranges(v, ":"), negate, text=shown))
        elif t == "--ports" and module == "multiport":
            items.append(x.UnknownMatch("multiport --ports (either port) is not modelled", text=shown))
        elif t == "--syn":
            items.append(x.SynMatch(negate, text=shown))
        elif t in ("--uid-owner", "--gid-owner") and module == "owner":
            kind = "uid" if t == "--uid-owner" else "gid"
            try:
                owner.append(x.Owner(kind, _id_ranges(v, kind), negate))
                owner_text.append(shown)
            except ParseError as e:
                items.append(x.UnknownMatch(str(e), text=f"-m owner {shown}"))
        elif t == "--socket-exists" and module == "owner":
            owner.append(x.Owner("socket", (), negate))
            owner_text.append(shown)
        elif t == "--mark" and module in ("mark", "connmark"):
            val, mask = _mark(v)
            which = "mark" if module == "mark" else "ctmark"
            items.append(x.MarkMatch(which, ((val, val),), mask, negate, text=f"-m {module} {shown}"))
        elif t in ("--ctstate", "--state") and module in ("conntrack", "state"):
            states = frozenset(s.strip().lower() for s in v.split(","))
            items.append(x.CtStateMatch(states, negate, text=f"-m {module} {shown}"))
        elif t == "--comment" and module == "comment":
            pass
        else:
            what = f"-m {module} {t}" if module else t
            items.append(x.UnknownMatch(f"{what} is not modelled", text=shown))
        negate = False
    flush_owner()
    return x.XRule(text, tuple(items), verdict)


def _quote(token: str) -> str:
    return shlex.quote(token) if any(c.isspace() for c in token) or not token else token


def _ipt_target(
    target: str, opts: list[str], goto: bool, chains: set[str]
) -> tuple[x.Verdict | None, list[x.Action]]:
    text = " ".join([target, *opts])
    o: dict[str, str] = {}
    i = 0
    while i < len(opts):
        k = opts[i]
        if k in _NO_VALUE or i + 1 >= len(opts) or opts[i + 1].startswith("--"):
            o[k] = ""
            i += 1
        else:
            o[k] = opts[i + 1]
            i += 2
    if target in chains:
        return x.Verdict("goto" if goto else "jump", chain=target), []
    if goto:
        return x.Verdict("unknown", why=f"goto {target}: no such chain"), []
    if target in ("ACCEPT", "DROP", "RETURN"):
        return x.Verdict(target.lower()), []
    if target == "REJECT":
        return x.Verdict("drop", why="REJECT"), []
    if target == "REDIRECT":
        ports = o.get("--to-ports") or o.get("--to-port")
        return x.Verdict("redirect", ports=_span(ports) if ports else None), []
    if target == "TPROXY":
        port = int(o["--on-port"]) if "--on-port" in o else None
        keep, xor = MASK, 0
        if "--tproxy-mark" in o:
            v, m = _mark(o["--tproxy-mark"])
            keep, xor = ~m & MASK, v
        addr = o.get("--on-ip")
        if addr in ("0.0.0.0", "::"):
            addr = None
        return x.Verdict(
            "tproxy", ports=None if port is None else (port, port), addr=addr, keep=keep, xor=xor
        ), []
    if target == "MARK":
        return None, [_mark_op("mark", o, text)]
    if target == "CONNMARK":
        if "--save-mark" in o or "--restore-mark" in o:
            nfmask = _int(o.get("--nfmask", o.get("--mask", "0xffffffff")))
            ctmask = _int(o.get("--ctmask", o.get("--mask", "0xffffffff")))
            to = "ctmark" if "--save-mark" in o else "mark"
            return None, [x.CopyMark(to, nfmask, ctmask, text=text)]
        return None, [_mark_op("ctmark", o, text)]
    if target == "CT":
        if "--notrack" in o:
            return None, [x.NoTrack(text=text)]
        zone = o.get("--zone") or o.get("--zone-orig") or o.get("--zone-reply")
        if zone is not None and zone.isdigit():
            return None, [x.SetZone(int(zone), text=text)]
        return None, [x.UnknownAction(f"CT {text} is not modelled", text=text)]
    if target == "NOTRACK":
        return None, [x.NoTrack(text=text)]
    if target in _NOOP_TARGETS:
        return None, []
    if target in ("SNAT", "MASQUERADE"):
        return x.Verdict("snat"), []
    return x.Verdict("unknown", why=f"the {target} target is not modelled"), []


def _span(text: str) -> tuple[int, int]:
    lo, _, hi = text.replace(":", "-").partition("-")
    return int(lo), int(hi or lo)


def _mark_op(which: str, o: dict[str, str], text: str) -> x.Action:
    if "--set-xmark" in o:
        v, m = _mark(o["--set-xmark"])
        return x.SetMark(which, ~m & MASK, v, text=text)
    if "--set-mark" in o:
        v, m = _mark(o["--set-mark"])
        return x.SetMark(which, ~(v | m) & MASK, v, text=text)
    if "--and-mark" in o:
        return x.SetMark(which, _int(o["--and-mark"]), 0, text=text)
    if "--or-mark" in o:
        v = _int(o["--or-mark"])
        return x.SetMark(which, ~v & MASK, v, text=text)
    if "--xor-mark" in o:
        return x.SetMark(which, MASK, _int(o["--xor-mark"]), text=text)
    return x.UnknownAction(f"{text} is not modelled", text=text)


def _safe_ipt_rule(chain: str, spec: list[str] | tuple[str, ...], family: int, chains: set[str]) -> x.XRule:
    try:
        return parse_iptables_rule(chain, spec, family, chains)
    except (ParseError, ValueError) as e:
        text = " ".join(["-A", chain, *spec])
        return x.XRule(text, (x.UnknownMatch(f"cannot read this rule ({e})", text=text),), None)


def iptables_tables(text: str, family: int, source: str) -> list[x.Table]:
    """The tables of one iptables-save dump (``source``: iptables-nft, iptables-legacy)."""
    from .state import parse_save

    out = []
    for name, saved in parse_save(text).items():
        chains: dict[str, x.Chain] = {}
        for chain, policy in saved.chains.items():
            ch = ipt_chain(name, chain)
            if ch.hook is not None:
                ch.policy = policy.lower()
            chains[chain] = ch
        names = set(chains)
        for chain, specs in saved.rules.items():
            ch = chains.setdefault(chain, ipt_chain(name, chain))
            for spec in specs:
                try:
                    tokens = shlex.split(spec)
                except ValueError:
                    tokens = spec.split()
                ch.rules.append(_safe_ipt_rule(chain, tokens, family, names))
        out.append(x.Table(name, frozenset({family}), chains, "iptables", source, iptables_name=name))
    return sorted(out, key=lambda t: list(IPT_CHAINS).index(t.label) if t.label in IPT_CHAINS else 99)


def incompatible_tables(saved: str) -> frozenset[str]:
    """The tables iptables-nft-save could not show (``# Table `nat' is incompatible, use 'nft'
    tool.``): nft made them, and their rules are read from ``nft -j``."""
    out = set()
    for line in saved.splitlines():
        if line.startswith("# Table `") and "' is incompatible" in line:
            out.add(line[len("# Table `") :].split("'", 1)[0])
    return frozenset(out)


def planned_iptables_tables(rules: tuple[Rule, ...], family: int) -> list[x.Table]:
    """The tables a planned family's rules make in an empty namespace: what iptables-restore
    --noflush of the rendered document leaves (appends, 1-based inserts)."""
    out = []
    for name in IPT_CHAINS:
        planned = [r for r in rules if r.table == name]
        if not planned:
            continue
        chains = {c: ipt_chain(name, c) for c in IPT_CHAINS[name]}
        for r in planned:
            chains.setdefault(r.chain, ipt_chain(name, r.chain))
            if r.jumps_to_chain:
                chains.setdefault(r.target, ipt_chain(name, r.target))
        names = set(chains)
        for r in planned:
            rule = _safe_ipt_rule(r.chain, r.spec, family, names)
            target = chains[r.chain].rules
            if r.position is None:
                target.append(rule)
            else:
                target.insert(r.position - 1, rule)
        out.append(x.Table(name, frozenset({family}), chains, "iptables", "planned", iptables_name=name))
    return out


def planned_iptables(ruleset: Ruleset, family: int) -> x.Model:
    fr = ruleset.v4 if family == 4 else ruleset.v6
    desc = f"planned iptables rules (IPv{family}), from the options given"
    if fr is None:
        return x.Model(
            [], desc, notes=["no IPv6 rules are planned (IPv6 is off): nothing captures this packet"]
        )
    return x.Model(planned_iptables_tables(fr.rules, family), desc)


# --------------------------------------------------------------------------- nft text


def _nft_tokens(body: str) -> list[str]:
    out, i, n = [], 0, len(body)
    while i < n:
        ch = body[i]
        if ch.isspace():
            i += 1
            continue
        if ch in '{"':
            close = "}" if ch == "{" else '"'
            j = body.find(close, i + 1)
            if j < 0:
                raise ParseError(f"unbalanced {ch}")
            out.append(body[i : j + 1])
            i = j + 1
            continue
        j = i
        while j < n and not body[j].isspace():
            j += 1
        out.append(body[i:j])
        i = j
    return out


def _set_items(token: str) -> list[str]:
    if token.startswith("{"):
        return [t.strip() for t in token[1:-1].split(",") if t.strip()]
    return [t for t in token.split(",") if t]


def _unquote(s: str) -> str:
    return s[1:-1] if len(s) >= 2 and s[0] == s[-1] == '"' else s


_META_KEYS = frozenset({"l4proto", "nfproto", "skuid", "skgid", "mark", "iifname", "oifname", "iif", "oif"})
_NFT_VERDICTS = frozenset({"accept", "drop", "return", "continue"})
_LOG_OPTS = frozenset({"prefix", "level", "group", "snaplen", "queue-threshold", "flags"})


def _nft_num_ranges(items: list[str], conv: Any) -> tuple[tuple[int, int], ...]:
    out = []
    for it in items:
        lo, dash, hi = it.partition("-")
        a = conv(lo)
        out.append((a, conv(hi) if dash else a))
    return tuple(out)


def _nft_addr_ranges(items: list[str], family: int) -> tuple[tuple[int, int], ...]:
    return _addr_ranges(",".join(items), family)


def _meta_match(key: str, negate: bool, items: list[str], shown: str) -> x.Match:
    if key == "l4proto":
        return x.ProtoMatch(frozenset(_proto(i) for i in items), negate, text=shown)
    if key == "nfproto":
        fams = {"ipv4": 4, "ipv6": 6}
        if len(items) != 1 or items[0] not in fams:
            return x.UnknownMatch(f"{shown} is not modelled", text=shown)
        return x.FamilyMatch(fams[items[0]], negate, text=shown)
    if key in ("skuid", "skgid"):
        kind = "uid" if key == "skuid" else "gid"
        return x.OwnerMatch((x.Owner(kind, _id_ranges(",".join(items), kind), negate),), xt=False, text=shown)
    if key == "mark":
        return x.MarkMatch("mark", _nft_num_ranges(items, _int), x.MASK32, negate, text=shown)
    which = "iif" if key in ("iifname", "iif") else "oif"
    return x.IfaceMatch(which, tuple(_unquote(i) for i in items), negate, "*", text=shown)


def parse_nft_rule(body: str) -> x.XRule:
    """One nft rule body, as the planner writes it (``meta l4proto tcp tcp dport 15008 counter
    return``) or as ``nft list`` prints it."""
    try:
        return _parse_nft_rule(body)
    except (ParseError, ValueError, IndexError) as e:
        return x.XRule(body, (x.UnknownMatch(f"cannot read this rule ({e})", text=body),), None)


def _parse_nft_rule(body: str) -> x.XRule:
    toks = _nft_tokens(body)
    items: list[x.Match | x.Action] = []
    verdict: x.Verdict | None = None
    i = 0
    n = len(toks)

    def operand(at: int) -> tuple[bool, list[str], int]:
        negate = False
        if at < n and toks[at] in ("==", "!=", "eq", "ne"):
            negate = toks[at] in ("!=", "ne")
            at += 1
        if at >= n:
            raise ParseError("a value is missing")
        if toks[at].startswith("@"):
            raise ParseError(f"the named set {toks[at]} is not modelled")
        return negate, _set_items(toks[at]), at + 1

    while i < n:
        t = toks[i]
        start = i
        if t == "counter":
            i += 1
            if i < n and toks[i] == "packets":
                i += 4  # packets N bytes M
            continue
        if t == "log":
            i += 1
            while i + 1 < n and toks[i] in _LOG_OPTS:
                i += 2
            continue
        if t == "meta" and i + 1 < n and toks[i + 1] in _META_KEYS:
            i += 1
            t = toks[i]
        if t == "mark" and i + 1 < n and toks[i + 1] == "set":
            action, i = _nft_set_value("mark", toks, i + 2, " ".join(toks[start : i + 3]))
            items.append(action)
            continue
        if t in _META_KEYS:
            negate, vals, i = operand(i + 1)
            shown = " ".join(toks[start:i])
            items.append(_meta_match(t, negate, vals, shown))
            continue
        if t in ("ip", "ip6") and i + 1 < n:
            family = 4 if t == "ip" else 6
            fld = toks[i + 1]
            negate, vals, i = operand(i + 2)
            shown = " ".join(toks[start:i])
            if fld in ("saddr", "daddr"):
                items.append(x.AddrMatch(fld, family, _nft_addr_ranges(vals, family), negate, text=shown))
            elif fld in ("protocol", "nexthdr"):
                items.append(x.FamilyMatch(family, text=t))
                items.append(x.ProtoMatch(frozenset(_proto(v) for v in vals), negate, text=shown))
            else:
                items.append(x.UnknownMatch(f"{t} {fld} is not modelled", text=shown))
            continue
        if t in ("tcp", "udp", "th") and i + 1 < n:
            fld = toks[i + 1]
            if fld == "flags":
                negate, vals, i = operand(i + 2)
                shown = " ".join(toks[start:i])
                if vals == ["syn"] and t == "tcp":
                    items.append(x.SynMatch(negate, text=shown))
                else:
                    items.append(x.UnknownMatch(f"{shown} is not modelled", text=shown))
                continue
            negate, vals, i = operand(i + 2)
            shown = " ".join(toks[start:i])
            if fld not in ("sport", "dport"):
                items.append(x.UnknownMatch(f"{t} {fld} is not modelled", text=shown))
                continue
            items.append(x.PortMatch(fld, t, _nft_num_ranges(vals, int), negate, text=shown))
            continue
        if t == "ct" and i + 1 < n:
            key = toks[i + 1]
            if i + 2 < n and toks[i + 2] == "set":
                i += 3
                shown = " ".join(toks[start : i + 1])
                if key == "mark":
                    action, i = _nft_set_value("ctmark", toks, i, shown)
                    items.append(action)
                elif key == "zone":
                    items.append(x.SetZone(int(toks[i]), text=shown))
                    i += 1
                else:
                    items.append(x.UnknownAction(f"ct {key} set is not modelled", text=shown))
                    i += 1
                continue
            negate, vals, i = operand(i + 2)
            shown = " ".join(toks[start:i])
            if key == "state":
                items.append(x.CtStateMatch(frozenset(v.lower() for v in vals), negate, text=shown))
            elif key == "mark":
                items.append(x.MarkMatch("ctmark", _nft_num_ranges(vals, _int), x.MASK32, negate, text=shown))
            else:
                items.append(x.UnknownMatch(f"ct {key} is not modelled", text=shown))
            continue
        if t in _NFT_VERDICTS:
            verdict = None if t == "continue" else x.Verdict(t)
            i += 1
            continue
        if t in ("jump", "goto"):
            verdict = x.Verdict(t, chain=toks[i + 1])
            i += 2
            continue
        if t == "redirect":
            i += 1
            ports = None
            if i + 1 < n and toks[i] == "to" and toks[i + 1].startswith(":"):
                ports = _span(toks[i + 1][1:])
                i += 2
            verdict = x.Verdict("redirect", ports=ports)
            continue
        if t == "tproxy":
            i += 1
            if i < n and toks[i] in ("ip", "ip6"):
                i += 1
            if i + 1 >= n or toks[i] != "to":
                raise ParseError("tproxy without 'to'")
            dest = toks[i + 1]
            i += 2
            addr, _, port = dest.rpartition(":")
            items.append(x.TproxyStmt(int(port), addr.strip("[]") or None, text=" ".join(toks[start:i])))
            continue
        if t == "notrack":
            items.append(x.NoTrack(text=t))
            i += 1
            continue
        if t == "reject":
            verdict = x.Verdict("drop", why="reject")
            break
        if t in ("masquerade", "snat"):
            verdict = x.Verdict("snat")
            break
        rest = " ".join(toks[i:])
        items.append(x.UnknownMatch(f"{t!r} is not modelled", text=rest))
        break
    return x.XRule(body, tuple(items), verdict)


def _nft_set_value(which: str, toks: list[str], i: int, shown: str) -> tuple[x.Action, int]:
    """The value of ``mark set``/``ct mark set``: a number, the other mark, or ``mark or N``..."""
    v = toks[i]
    if v == "ct" and i + 1 < len(toks) and toks[i + 1] == "mark" and which == "mark":
        return x.CopyMark("mark", text=shown + " mark"), i + 2
    if v == "mark" and which == "ctmark" and not (i + 1 < len(toks) and toks[i + 1] in ("or", "and", "xor")):
        return x.CopyMark("ctmark", text=shown), i + 1
    if v == "mark" and i + 2 < len(toks) and toks[i + 1] in ("or", "and", "xor", "|", "&", "^"):
        op, n = toks[i + 1], _int(toks[i + 2])
        if op in ("or", "|"):
            return x.SetMark(which, ~n & MASK, n, text=f"{shown} {op} {toks[i + 2]}"), i + 3
        if op in ("and", "&"):
            return x.SetMark(which, n, 0, text=f"{shown} {op} {toks[i + 2]}"), i + 3
        return x.SetMark(which, MASK, n, text=f"{shown} {op} {toks[i + 2]}"), i + 3
    return x.SetMark(which, 0, _int(v), text=shown), i + 1


def planned_nft(rules: NftRules) -> x.Model:
    """The ``inet`` tables the planned native nftables rules make (nftables.render_nft's layout
    and insert rules)."""
    tables = []
    for table, name in NFT_TABLES.items():
        planned = [r for r in rules.rules if r.table == table]
        if not planned:
            continue
        used = {r.chain for r in planned}
        chains: dict[str, x.Chain] = {}
        for chain, (kind, hook, prio) in NFT_BASE[table].items():
            if chain in used:
                chains[chain_name(chain)] = x.Chain(chain_name(chain), hook=hook, priority=prio, kind=kind)
        for chain in NFT_REGULAR[table]:
            if chain in used:
                chains[chain_name(chain)] = x.Chain(chain_name(chain))
        for r in planned:
            rule = parse_nft_rule(r.nft)
            target = chains[chain_name(r.chain)].rules
            index = None if r.position is None else r.position - 1
            if index is None or not target or index >= len(target):
                target.append(rule)
            else:
                target.insert(index, rule)
        tables.append(x.Table(f"inet {name}", frozenset({4, 6}), chains, "nft", "planned"))
    return x.Model(tables, "planned native nftables rules (inet tables), from the options given")


# --------------------------------------------------------------------------- nft -j


_FAMILIES = {"inet": frozenset({4, 6}), "ip": frozenset({4}), "ip6": frozenset({6})}


def nft_json_tables(
    items: list[dict[str, Any]], *, skip: frozenset[tuple[str, str]] = frozenset()
) -> tuple[list[x.Table], list[str]]:
    """The tables of ``nft -j list ruleset`` output (``items``: its "nftables" list) that packets
    of IPv4 or IPv6 traverse, leaving out the (family, name) pairs in ``skip`` (iptables-nft's
    own tables, read with iptables-nft-save instead); and notes on what is not walked."""
    tables: dict[tuple[str, str], x.Table] = {}
    notes: list[str] = []
    for it in items:
        if "table" in it:
            t = it["table"]
            key = (t.get("family", ""), t.get("name", ""))
            if key in skip:
                continue
            if key[0] not in _FAMILIES:
                notes.append(f"not walked: table {key[0]} {key[1]} (family {key[0]})")
                continue
            tables[key] = x.Table(f"{key[0]} {key[1]}", _FAMILIES[key[0]], {}, "nft", "nft")
        elif "chain" in it:
            c = it["chain"]
            table = tables.get((c.get("family", ""), c.get("table", "")))
            if table is None:
                continue
            name = c.get("name", "")
            ch = x.Chain(name)
            if "hook" in c:
                if c["hook"] not in x.HOOKS:
                    notes.append(f"not walked: {table.label} {name} (hook {c['hook']})")
                else:
                    ch.hook = c["hook"]
                    ch.priority = int(c.get("prio", 0))
                    ch.kind = c.get("type", "filter")
                    ch.policy = c.get("policy", "accept")
            table.chains[name] = ch
        elif "rule" in it:
            r = it["rule"]
            table = tables.get((r.get("family", ""), r.get("table", "")))
            if table is None:
                continue
            ch = table.chains.setdefault(r.get("chain", ""), x.Chain(r.get("chain", "")))
            ch.rules.append(parse_nft_json_rule(r.get("expr", [])))
    return list(tables.values()), notes


def parse_nft_json_rule(exprs: list[dict[str, Any]]) -> x.XRule:
    items: list[x.Match | x.Action] = []
    verdict: x.Verdict | None = None
    texts: list[str] = []
    for e in exprs:
        try:
            text, item, v = _json_expr(e)
        except (ParseError, ValueError, KeyError, TypeError, IndexError) as err:
            text = _json_text(e)
            item, v = x.UnknownMatch(f"cannot read this expression ({err})", text=text), None
        texts.append(text)
        if item is not None:
            items.append(item)
        if v is not None:
            verdict = None if v.kind == "continue" else v
    return x.XRule(" ".join(t for t in texts if t), tuple(items), verdict)


def _json_text(e: Any) -> str:
    import json

    return json.dumps(e, separators=(",", ":"))


def _json_expr(e: dict[str, Any]) -> tuple[str, x.Match | x.Action | None, x.Verdict | None]:
    ((kind, v),) = e.items()
    if kind == "match":
        op = "" if v["op"] in ("==", "in") and "&" not in v["left"] else v["op"] + " "
        text = f"{_left_text(v['left'])} {op}{_value_text(v['right'])}"
        return text, _json_match(v["op"], v["left"], v["right"], text), None
    if kind == "counter":
        return "counter", None, None
    if kind == "log":
        return "log", None, None
    if kind in ("accept", "drop", "return", "continue"):
        return kind, None, x.Verdict(kind)
    if kind in ("jump", "goto"):
        return f"{kind} {v['target']}", None, x.Verdict(kind, chain=v["target"])
    if kind == "redirect":
        port = (v or {}).get("port")
        ports = None if port is None else _json_span(port)
        text = "redirect" + ("" if ports is None else f" to :{x._port_text(ports)}")
        return text, None, x.Verdict("redirect", ports=ports)
    if kind == "tproxy":
        port = int(v["port"])
        addr = v.get("addr")
        text = f"tproxy {v.get('family', '')} to {addr or ''}:{port}".replace("  ", " ")
        return text, x.TproxyStmt(port, addr, text=text), None
    if kind == "mangle":
        return _json_mangle(v)
    if kind == "notrack":
        return "notrack", x.NoTrack(text="notrack"), None
    if kind == "reject":
        return "reject", None, x.Verdict("drop", why="reject")
    if kind in ("snat", "masquerade"):
        return kind, None, x.Verdict("snat")
    text = _json_text(e)
    if kind == "xt":
        why = "an iptables extension (xt) that nft cannot show: read these rules with iptables-save"
        return text, x.UnknownMatch(why, text=text), None
    return text, x.UnknownMatch(f"the {kind} expression is not modelled", text=text), None


def _json_span(v: Any) -> tuple[int, int]:
    if isinstance(v, dict) and "range" in v:
        return int(v["range"][0]), int(v["range"][1])
    return int(v), int(v)


def _left_text(left: dict[str, Any]) -> str:
    if "meta" in left:
        key = left["meta"]["key"]
        return key if key in ("iifname", "oifname", "iif", "oif", "mark", "skuid", "skgid") else f"meta {key}"
    if "payload" in left:
        return f"{left['payload']['protocol']} {left['payload']['field']}"
    if "ct" in left:
        return f"ct {left['ct']['key']}"
    if "&" in left:
        inner, mask = left["&"]
        return f"{_left_text(inner)} & {_value_text(mask)}"
    return _json_text(left)


def _value_text(v: Any) -> str:
    if isinstance(v, dict):
        if "set" in v:
            return "{ " + ", ".join(_value_text(i) for i in v["set"]) + " }"
        if "prefix" in v:
            return f"{v['prefix']['addr']}/{v['prefix']['len']}"
        if "range" in v:
            return f"{_value_text(v['range'][0])}-{_value_text(v['range'][1])}"
        return _json_text(v)
    if isinstance(v, list):
        return ",".join(_value_text(i) for i in v)
    if isinstance(v, str) and (not v or any(c.isspace() for c in v) or v.endswith("*")):
        return f'"{v}"'
    return str(v)


def _items(right: Any) -> list[Any]:
    if isinstance(right, dict) and "set" in right:
        return list(right["set"])
    if isinstance(right, list):
        return list(right)
    return [right]


def _num_range(v: Any) -> tuple[int, int]:
    if isinstance(v, dict) and "range" in v:
        return _num(v["range"][0]), _num(v["range"][1])
    n = _num(v)
    return n, n


def _num(v: Any) -> int:
    if isinstance(v, bool):
        raise ParseError(f"{v!r}: not a number")
    if isinstance(v, int):
        return v
    return _int(str(v))


def _addr_item(v: Any, family: int) -> tuple[int, int]:
    if isinstance(v, dict) and "prefix" in v:
        return x.interval(ipaddress.ip_network(f"{v['prefix']['addr']}/{v['prefix']['len']}", strict=False))
    if isinstance(v, dict) and "range" in v:
        a, b = (ipaddress.ip_address(s) for s in v["range"])
        return int(a), int(b)
    a = ipaddress.ip_address(v)
    if a.version != family:
        raise ParseError(f"{v}: not an IPv{family} address")
    return int(a), int(a)


def _compare(op: str, n: int, high: int) -> tuple[tuple[int, int], bool] | None:
    """``op n`` as one range (and whether it is negated), for < > <= >=."""
    if op == "<":
        return (0, n - 1), False
    if op == "<=":
        return (0, n), False
    if op == ">":
        return (n + 1, high), False
    if op == ">=":
        return (n, high), False
    return None


def _json_match(op: str, left: dict[str, Any], right: Any, text: str) -> x.Match:
    negate = op == "!="
    if isinstance(right, str) and right.startswith("@"):
        return x.UnknownMatch(f"the named set {right} is not modelled", text=text)
    if op not in ("==", "!=", "in", "<", ">", "<=", ">="):
        return x.UnknownMatch(f"the {op} comparison is not modelled", text=text)
    cmp_ = op in ("<", ">", "<=", ">=")
    if "meta" in left:
        key = left["meta"]["key"]
        if key in ("skuid", "skgid", "mark") and cmp_:
            r = _compare(op, _num(right), x.MASK32)
            assert r is not None
            if key == "mark":
                return x.MarkMatch("mark", (r[0],), x.MASK32, False, text=text)
            return x.OwnerMatch((x.Owner("uid" if key == "skuid" else "gid", (r[0],)),), xt=False, text=text)
        if cmp_:
            return x.UnknownMatch(f"meta {key} {op} is not modelled", text=text)
        vals = _items(right)
        if key == "l4proto":
            return x.ProtoMatch(frozenset(_proto(str(v)) for v in vals), negate, text=text)
        if key == "nfproto":
            fams = {"ipv4": 4, "ipv6": 6}
            if len(vals) == 1 and vals[0] in fams:
                return x.FamilyMatch(fams[vals[0]], negate, text=text)
            return x.UnknownMatch(f"meta nfproto {vals} is not modelled", text=text)
        if key in ("skuid", "skgid"):
            kind = "uid" if key == "skuid" else "gid"
            ranges = tuple(_num_range(v) for v in vals)
            return x.OwnerMatch((x.Owner(kind, ranges, negate),), xt=False, text=text)
        if key == "mark":
            return x.MarkMatch("mark", tuple(_num_range(v) for v in vals), x.MASK32, negate, text=text)
        if key in ("iifname", "oifname", "iif", "oif"):
            which = "iif" if key.startswith("i") else "oif"
            return x.IfaceMatch(which, tuple(str(v) for v in vals), negate, "*", text=text)
        return x.UnknownMatch(f"meta {key} is not modelled", text=text)
    if "payload" in left:
        proto, fld = left["payload"]["protocol"], left["payload"]["field"]
        if proto in ("ip", "ip6"):
            family = 4 if proto == "ip" else 6
            if fld in ("saddr", "daddr") and not cmp_:
                ranges = tuple(_addr_item(v, family) for v in _items(right))
                return x.AddrMatch(fld, family, ranges, negate, text=text)
            if fld in ("protocol", "nexthdr") and not cmp_:
                return x.ProtoMatch(frozenset(_proto(str(v)) for v in _items(right)), negate, text=text)
            return x.UnknownMatch(f"{proto} {fld} is not modelled", text=text)
        if proto in ("tcp", "udp", "th") and fld in ("sport", "dport"):
            if cmp_:
                r = _compare(op, _num(right), 65535)
                assert r is not None
                return x.PortMatch(fld, proto, (r[0],), False, text=text)
            return x.PortMatch(fld, proto, tuple(_num_range(v) for v in _items(right)), negate, text=text)
        if proto == "tcp" and fld == "flags" and op == "in" and right == "syn":
            return x.SynMatch(False, text=text)
        return x.UnknownMatch(f"{proto} {fld} is not modelled", text=text)
    if "ct" in left:
        key = left["ct"]["key"]
        if key == "state" and not cmp_:
            return x.CtStateMatch(frozenset(str(v).lower() for v in _items(right)), negate, text=text)
        if key == "mark" and not cmp_:
            return x.MarkMatch(
                "ctmark", tuple(_num_range(v) for v in _items(right)), x.MASK32, negate, text=text
            )
        return x.UnknownMatch(f"ct {key} is not modelled", text=text)
    if "&" in left and op in ("==", "!="):
        inner, mask = left["&"]
        which = {"mark": "mark"}.get(inner.get("meta", {}).get("key", "")) or (
            "ctmark" if inner.get("ct", {}).get("key") == "mark" else ""
        )
        if which:
            return x.MarkMatch(which, (_num_range(right),), _num(mask), negate, text=text)
    return x.UnknownMatch("this expression is not modelled", text=text)


def _json_mangle(v: dict[str, Any]) -> tuple[str, x.Action, None]:
    key, value = v["key"], v["value"]
    target = (
        "mark"
        if key.get("meta", {}).get("key") == "mark"
        else (
            "ctmark"
            if key.get("ct", {}).get("key") == "mark"
            else ("zone" if key.get("ct", {}).get("key") == "zone" else "")
        )
    )
    text = f"{_left_text(key)} set {_value_text(value) if not isinstance(value, dict) else _left_text(value)}"
    if target == "zone" and isinstance(value, int):
        return text, x.SetZone(value, text=text), None
    if target in ("mark", "ctmark"):
        if isinstance(value, int):
            return text, x.SetMark(target, 0, value, text=text), None
        src = (
            "mark"
            if value.get("meta", {}).get("key") == "mark"
            else ("ctmark" if value.get("ct", {}).get("key") == "mark" else "")
        )
        if src and src != target:
            return text, x.CopyMark(target, text=text), None
        for op in ("|", "&", "^"):
            if op in value:
                inner, n = value[op]
                inner_src = (
                    "mark"
                    if inner.get("meta", {}).get("key") == "mark"
                    else ("ctmark" if inner.get("ct", {}).get("key") == "mark" else "")
                )
                if inner_src == target and isinstance(n, int):
                    text = f"{_left_text(key)} set {_left_text(inner)} {op} {n:#x}"
                    keep, xor = {"|": (~n & MASK, n), "&": (n, 0), "^": (MASK, n)}[op]
                    return text, x.SetMark(target, keep, xor, text=text), None
    return text, x.UnknownAction(f"{text} is not modelled", text=text), None
