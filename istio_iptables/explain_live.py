"""``istio-iptables --explain PACKET [--live]``: the command, and the live front end that reads
what a network namespace holds.

Planned (no ``--live``): the rules the other options plan, for the backend they name
(``--native-nftables`` or iptables), in the packet's family. Nothing is applied or read.

Live: from inside the namespace (``--network-namespace PATH``, else this one), every rule source
whose hooks the packet can meet: iptables-legacy-save and iptables-nft-save of the packet's
family (only where that backend has tables) and ``nft -j list ruleset`` (native tables; the
tables iptables-nft keeps in nf_tables are read through iptables-nft-save instead). The walk
merges their base chains by priority, foreign rules included, and says which holds Istio's
chains. The namespace's own addresses (netlink) tell which destinations are local. Nothing is
changed in the namespace.

Imported only when ``--explain`` is given.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from . import explain as x
from . import explain_rules as er
from .config import ConfigError
from .packet import parse_packet

if TYPE_CHECKING:
    from .config import ApplyOptions, Config
    from .environment import RealMachine
    from .executor import Completed
    from .netns import Netns

FAMILY_NAME = {4: "IPv4", 6: "IPv6"}


class ExplainError(Exception):
    """The rules could not be read (one line for the user)."""


def planned_model(cfg: Config, native_nftables: bool, family: int) -> x.Model:
    if native_nftables:
        from .planner import plan_nft

        return er.planned_nft(plan_nft(cfg))
    from .planner import plan

    return er.planned_iptables(plan(cfg), family)


class _Reader:
    """Runs the save/list commands from inside the namespace (the calling thread is in it)."""

    def __init__(self) -> None:
        from .executor import RealExecutor

        self.executor = RealExecutor()

    def run(self, argv: list[str]) -> Completed:
        from .executor import CommandNotFound

        try:
            return self.executor.run(argv, timeout=30)
        except CommandNotFound as e:
            raise ExplainError(f"{e.program}: command not found") from None

    def output(self, argv: list[str]) -> str:
        res = self.run(argv)
        if not res.ok:
            raise ExplainError(f"{' '.join(argv)} failed (exit {res.returncode}): {res.stderr.strip()}")
        return res.stdout


def read_live(family: int) -> x.Model:
    """The model of what the calling thread's namespace holds, for packets of ``family``."""
    from . import backend, netlink
    from .apply import legacy_table_presence
    from .executor import which
    from .ruleset import Family

    fam = Family.V4 if family == 4 else Family.V6
    reader = _Reader()
    tables: list[x.Table] = []
    read: list[str] = []
    notes: list[str] = []
    legacy = backend.find(fam, backend.LEGACY)
    if legacy is not None and legacy_table_presence().get(fam, True):
        tables += er.iptables_tables(reader.output([legacy.save]), family, f"{fam.iptables_command}-legacy")
        read.append(f"{legacy.save.rsplit('/', 1)[-1]}")
    proto = netlink.NFPROTO_IPV4 if family == 4 else netlink.NFPROTO_IPV6
    nft_ipt = backend.find(fam, backend.NFT)
    try:
        has_nft_tables = netlink.nft_table_count(proto) > 0
    except netlink.NetlinkError:
        has_nft_tables = True
    skip: frozenset[tuple[str, str]] = frozenset()
    if nft_ipt is not None and has_nft_tables:
        saved = reader.output([nft_ipt.save])
        tables += er.iptables_tables(saved, family, f"{fam.iptables_command}-nft")
        read.append(f"{nft_ipt.save.rsplit('/', 1)[-1]}")
        # Tables of those names that nft made, not iptables-nft, are read from nft -j instead.
        foreign = er.incompatible_tables(saved)
        nft_family = "ip" if family == 4 else "ip6"
        skip = frozenset((nft_family, t) for t in er.IPT_TABLE_NAMES - foreign)
    nft = which("nft")
    if nft is not None:
        import json

        text = reader.output([nft, "-j", "list", "ruleset"])
        try:
            items = [i for i in json.loads(text or '{"nftables": []}')["nftables"] if isinstance(i, dict)]
        except (ValueError, KeyError, TypeError) as e:
            raise ExplainError(f"nft -j list ruleset: unreadable output ({e})") from None
        nft_tables, nft_notes = er.nft_json_tables(items, skip=skip)
        tables += [t for t in nft_tables if family in t.families]
        notes += nft_notes
        read.append("nft -j list ruleset")
    elif legacy is None and nft_ipt is None:
        raise ExplainError(
            f"no iptables-save or nft binaries in PATH to read the {FAMILY_NAME[family]} rules"
        )
    try:
        addresses = frozenset(_addresses(netlink.local_addresses()))
    except netlink.NetlinkError as e:
        raise ExplainError(f"cannot list the namespace's addresses: {e}") from None
    ours = sorted({t.source for t in tables if _holds_ours(t)})
    holder = f"Istio's chains in {', '.join(ours)}" if ours else "no Istio chains found"
    desc = f"live {FAMILY_NAME[family]} rules ({holder}; read with {', '.join(read) or 'nothing'})"
    return x.Model(tables, desc, notes=notes, local_addresses=addresses)


def _addresses(texts: list[str]) -> list[x.IPAddress]:
    import ipaddress

    out = []
    for t in texts:
        try:
            out.append(ipaddress.ip_address(t.split("%", 1)[0]))
        except ValueError:
            continue
    return out


def _holds_ours(t: x.Table) -> bool:
    if t.syntax == "iptables":
        return any(name.startswith("ISTIO_") for name in t.chains)
    return t.label.split(" ", 1)[-1] in set(er.NFT_TABLES.values())


def live_model(ns: Netns | None, family: int) -> x.Model:
    """``read_live`` from inside ``ns`` (None: this thread's namespace)."""
    from .netns import NetnsError

    if ns is None:
        return read_live(family)
    try:
        with ns.entered():
            model = read_live(family)
    except NetnsError as e:
        raise ExplainError(str(e)) from None
    if ns.path:
        model.description += f" in {ns.path}"
    return model


def run(cfg: Config, opts: ApplyOptions, real: RealMachine | None) -> int:
    """The command: print the walk; 0 when it was printed, 1 on bad input or unreadable rules."""
    from .cli import _error

    assert opts.explain is not None
    try:
        packet = parse_packet(opts.explain)
    except ConfigError as e:
        _error(str(e))
        return 1
    try:
        if opts.explain_live:
            ns = None
            if opts.network_namespace:
                from .netns import NetnsError, open_netns

                try:
                    ns = (
                        real.namespace(opts.network_namespace) if real else open_netns(opts.network_namespace)
                    )
                except NetnsError as e:
                    raise ExplainError(str(e)) from None
            model = live_model(ns, packet.family)
        else:
            model = planned_model(cfg, opts.native_nftables, packet.family)
    except ExplainError as e:
        _error(str(e))
        return 1
    walk = x.explain(model, packet)
    for note in model.notes:
        walk.assumptions.append(note)
    text = x.render_json(walk) if opts.explain_format == "json" else x.render_text(walk)
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0
