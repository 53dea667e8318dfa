"""Value types for planned rules: a Rule, the rules of one IP family, and the whole Ruleset.

The planner produces these; the renderer and the appliers consume them without deciding anything.
"""

from __future__ import annotations

from .startup import Enum, NamedTuple

BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})

# Every chain this tool may create, in every table. Cleanup removes exactly these
# (plus the jumps into them from built-in chains), so it is one list for both.
ISTIO_CHAINS = (
    "ISTIO_INBOUND",
    "ISTIO_REDIRECT",
    "ISTIO_IN_REDIRECT",
    "ISTIO_OUTPUT",
    "ISTIO_OUTPUT_DNS",
    "ISTIO_DIVERT",
    "ISTIO_TPROXY",
    "ISTIO_DROP",
)


class Family(Enum):
    """An IP family, with the few facts that differ between IPv4 and IPv6 rules."""

    V4 = 4
    V6 = 6

    @property
    def restore_command(self) -> str:
        return "iptables-restore" if self is Family.V4 else "ip6tables-restore"

    @property
    def iptables_command(self) -> str:
        return "iptables" if self is Family.V4 else "ip6tables"

    @property
    def host_prefixlen(self) -> int:
        return 32 if self is Family.V4 else 128

    @property
    def inbound_passthrough_source(self) -> str:
        """Source address Envoy's inbound passthrough cluster binds to."""
        return "127.0.0.6/32" if self is Family.V4 else "::6/128"


class Rule(NamedTuple):
    """One iptables rule: where it goes, what it matches, and its target.

    ``position`` is ``None`` for an append (``-A``) and a 1-based index for an insert (``-I``).
    ``nft`` is the same rule's body as Istio writes it for native nftables (``meta l4proto tcp tcp
    dport 15008 counter return``); the nftables renderer names the table and chain.
    """

    table: str
    chain: str
    matches: tuple[str, ...]
    target: str
    target_args: tuple[str, ...] = ()
    position: int | None = None
    nft: str = ""

    @property
    def spec(self) -> tuple[str, ...]:
        """The rule's arguments after the chain name: matches, ``-j TARGET`` and target options."""
        return (*self.matches, "-j", self.target, *self.target_args)

    def restore_line(self) -> str:
        """The rule as a line of an iptables-restore document."""
        head = ("-A", self.chain) if self.position is None else ("-I", self.chain, str(self.position))
        return " ".join((*head, *self.spec))

    @property
    def jumps_to_chain(self) -> bool:
        return self.target.startswith("ISTIO_")


class PolicyRoute(NamedTuple):
    """TPROXY policy routing: ``ip rule fwmark MARK lookup TABLE`` plus a local default route on lo."""

    family: Family
    mark: int
    table: int


class FamilyRules(NamedTuple):
    """All rules of one IP family, in the order they must be applied."""

    family: Family
    rules: tuple[Rule, ...]

    def tables(self) -> list[str]:
        """Tables that hold rules, in the order iptables-restore documents list them."""
        return sorted({r.table for r in self.rules})

    def rules_of(self, table: str) -> list[Rule]:
        return [r for r in self.rules if r.table == table]

    def new_chains(self, table: str) -> list[str]:
        """Non-built-in chains to create in ``table``: those holding rules, then those only jumped to."""
        seen: dict[str, None] = {}
        rules = self.rules_of(table)
        for r in rules:
            if r.chain not in BUILTIN_CHAINS:
                seen.setdefault(r.chain, None)
        for r in rules:
            if r.jumps_to_chain:
                seen.setdefault(r.target, None)
        return list(seen)


class Ruleset(NamedTuple):
    """What the planner decided: the rules per family and the routing TPROXY needs."""

    v4: FamilyRules
    v6: FamilyRules | None = None
    routes: tuple[PolicyRoute, ...] = ()
    # Addresses to add on lo (``::6/128`` when IPv6 is enabled, as Istio does).
    # Addresses with their prefix length (``::6/128``) to add on lo.
    loopback_addresses: tuple[str, ...] = ()

    @property
    def families(self) -> list[FamilyRules]:
        return [self.v4] if self.v6 is None else [self.v4, self.v6]


class NftRules(NamedTuple):
    """What the planner decided for native nftables: one rule list for the ``inet`` tables (both
    families), in the order they must be applied, and the same routing as a Ruleset."""

    rules: tuple[Rule, ...]
    routes: tuple[PolicyRoute, ...] = ()
    loopback_addresses: tuple[str, ...] = ()
