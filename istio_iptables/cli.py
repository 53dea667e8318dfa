"""The ``istio-iptables`` and ``istio-clean-iptables`` commands.

Arguments are read the way Istio's Go flag parser (pflag) reads them: ``--flag value``,
``--flag=value``, ``-p 15001``, ``-p15001``, ``-p=15001``, and booleans as ``--flag`` or
``--flag=true|false`` (``-n=false``). Bad input exits 1 with one line on stderr, as Istio does.

click is imported only for ``--help`` and for usage errors: once normalize_argv has rewritten the
arguments as ``--name=value``, reading them needs no parser, and the start-up of every pod's
init container does not pay for one. Nor for ``logging`` (with what it imports, a few ms): while
a command runs, its records and the applier's go through its logsink.Sink, which writes Istio's
log lines itself.
"""

from __future__ import annotations

import os
import sys

from . import logsink
from .config import ConfigError
from .environment import DetectionError, RealMachine
from .netns import NetnsError
from .options import BY_KEY, BY_SHORT, ENV_ONLY, FLAGS, Kind, load, log_settings
from .startup import TYPE_CHECKING, exit_now

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

    import click

    from .config import ApplyOptions, Config
    from .environment import Machine
    from .netns import Netns
    from .options import OptionDef

PROG_IPTABLES = "istio-iptables"
PROG_CLEAN = "istio-clean-iptables"

_log = logsink.get_logger("istio_iptables")
_NEGATIONS = {o.negation: o for o in FLAGS if o.negation}


def normalize_argv(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Rewrite pflag-style arguments as ``--name=value`` (``--help`` kept) and return them with
    the positional arguments. Raises click.UsageError for an unknown flag or a missing value."""
    out: list[str] = []
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            positional.extend(args[i:])
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name == "help":
                out.append("--help")
                continue
            if name in _NEGATIONS:
                if eq:
                    raise _usage_error(f"flag --{name} does not take a value")
                out.append(f"--{_NEGATIONS[name].name}=false")
                continue
            opt = BY_KEY.get(name)
            if opt is None or opt.name is None:
                raise _usage_error(f"unknown flag: --{name}")
            if not eq and opt.kind is not Kind.BOOL:
                if i >= len(args):
                    raise _usage_error(f"flag needs an argument: --{name}")
                value, i = args[i], i + 1
            out.append(f"--{name}={value if eq or opt.kind is not Kind.BOOL else 'true'}")
        elif arg.startswith("-") and arg != "-":
            i = _shorthands(arg, args, i, out)
        else:
            positional.append(arg)
    return out, positional


def _usage_error(message: str) -> click.UsageError:
    import click

    return click.UsageError(message)


def _values_without_click(argv: Sequence[str]) -> tuple[dict[str, str], list[str]] | None:
    """The flag values by long name and the positional arguments, read as click would read the
    normalized arguments (every option a ``--name=value`` string, the last occurrence winning);
    None when click must handle them: ``--help``, or a usage error."""
    try:
        normalized, positional = normalize_argv(argv)
    except Exception as e:
        import click

        if isinstance(e, click.UsageError):
            return None
        raise
    if "--help" in normalized:
        return None
    values: dict[str, str] = {}
    for arg in normalized:
        name, _, value = arg[2:].partition("=")
        values[name] = value
    return values, positional


def _shorthands(arg: str, args: Sequence[str], i: int, out: list[str]) -> int:
    """One ``-abc`` cluster: booleans take no value (or ``=value``); a value flag takes the rest
    of the cluster (``-p15001``, ``-p=15001``) or the next argument."""
    j = 1
    while j < len(arg):
        ch = arg[j]
        if ch == "h":
            out.append("--help")
            j += 1
            continue
        opt = BY_SHORT.get(ch)
        if opt is None:
            raise _usage_error(f"unknown shorthand flag: {ch!r} in {arg}")
        rest = arg[j + 1 :]
        if opt.kind is Kind.BOOL:
            if rest.startswith("="):
                out.append(f"--{opt.name}={rest[1:]}")
                return i
            out.append(f"--{opt.name}=true")
            j += 1
            continue
        if rest:
            value = rest[1:] if rest.startswith("=") else rest
        elif i < len(args):
            value, i = args[i], i + 1
        else:
            raise _usage_error(f"flag needs an argument: {ch!r} in {arg}")
        out.append(f"--{opt.name}={value}")
        return i
    return i


def _command(prog: str, summary: str) -> click.Command:
    """The click command for ``prog``: used for --help and to report usage errors."""
    import click

    class _Option(click.Option):
        """A click option for one OptionDef; every value reaches it as text (see normalize_argv)."""

        def __init__(self, odef: OptionDef) -> None:
            assert odef.name is not None
            decls = [f"--{odef.name}", odef.name.replace("-", "_")]
            if odef.short:
                decls.insert(0, f"-{odef.short}")
            super().__init__(decls, type=str, default=None, metavar=odef.kind.metavar)
            self.odef = odef

        def get_help_record(self, ctx: click.Context) -> tuple[str, str]:
            o = self.odef
            names = ", ".join(([f"-{o.short}"] if o.short else []) + [f"--{o.name}"])
            if o.kind is Kind.BOOL:
                names += "[=true|false]"
                if o.negation:
                    names += f" / --{o.negation}"
            else:
                names += f" {o.kind.metavar}"
            extra = [f"default: {o.shown_default}"]
            if o.env:
                extra.insert(0, "env: " + ", ".join(o.env))
            text = f"{o.help} [{'; '.join(extra)}]"
            if o.apply_only:
                text += " [acts only when rules are applied]"
            return names, text

    class _PflagCommand(click.Command):
        def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
            normalized, positional = normalize_argv(args)
            ctx.meta["positional"] = positional
            return super().parse_args(ctx, normalized)

    return _PflagCommand(
        name=prog,
        params=[_Option(o) for o in FLAGS],
        callback=lambda **kwargs: kwargs,
        help=summary,
        epilog=_epilog(),
        context_settings={"help_option_names": ["--help"], "max_content_width": 110},
        add_help_option=True,
    )


def _epilog() -> str:
    lines = ["\b", "Settings read only from the environment:"]
    for o in ENV_ONLY:
        lines.append(f"  {o.env[0]} (default: {o.shown_default}): {o.help}")
    lines += [
        "",
        "\b",
        "Options marked [acts only when rules are applied] change nothing in a --dry-run.",
        "Command-line values win over environment variables.",
    ]
    return "\n".join(lines)


_SUMMARIES = {
    PROG_IPTABLES: "Set up the iptables rules that send a pod's traffic through its sidecar proxy.",
    PROG_CLEAN: "Remove the iptables rules and chains istio-iptables set up.",
}


def _error(message: str) -> None:
    sys.stderr.write("Error: " + logsink.escape_controls(" ".join(str(message).split())) + "\n")


def _describe(cfg: Config, opts: ApplyOptions) -> str:
    owners = cfg.owner_groups
    inbound = cfg.inbound_ports
    return " ".join(
        [
            f"PROXY_PORT={cfg.proxy_port}",
            f"PROXY_INBOUND_CAPTURE_PORT={cfg.inbound_capture_port}",
            f"PROXY_TUNNEL_PORT={cfg.inbound_tunnel_port}",
            f"PROXY_UID={','.join(cfg.proxy_uids)}",
            f"PROXY_GID={','.join(cfg.proxy_gids)}",
            f"INBOUND_INTERCEPTION_MODE={cfg.interception_mode.value}",
            f"INBOUND_PORTS_INCLUDE={'*' if inbound.wildcard else ','.join(map(str, inbound.ports))}",
            f"OUTBOUND_OWNER_GROUPS={'*' if owners.except_ else ','.join(owners.values)}",
            f"ENABLE_INBOUND_IPV6={str(cfg.enable_ipv6).lower()}",
            f"DNS_CAPTURE={str(cfg.redirect_dns).lower()}",
            f"DNS_SERVERS={','.join(map(str, (*cfg.dns_servers_v4, *cfg.dns_servers_v6)))}",
            f"DRY_RUN={str(opts.dry_run).lower()}",
            f"NETWORK_NAMESPACE={opts.network_namespace or ''}",
        ]
    )


def parse(
    prog: str,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    machine: Machine | None = None,
) -> tuple[Config, ApplyOptions] | int:
    """Parse the command line and environment: the configuration, or an exit status (0 after
    --help, 1 after printing the one-line error). Its log records go to stderr as the logging
    options say, as in ``run``."""
    previous = logsink.get_sink()
    try:
        return _parse(prog, argv, env, machine)
    finally:
        logsink.set_sink(previous)


def _parse(
    prog: str,
    argv: Sequence[str],
    env: Mapping[str, str] | None,
    machine: Machine | None,
) -> tuple[Config, ApplyOptions] | int:
    """``parse``, leaving the command's log sink installed from the moment the logging options are
    known; records logged before that go wherever they went before the call. The caller puts the
    previous sink back."""
    env = os.environ if env is None else env
    read = _values_without_click(argv)
    if read is not None:
        values, positional = read
    else:
        parsed = _parse_with_click(prog, argv)
        if isinstance(parsed, int):
            return parsed
        values, positional = parsed
    try:
        settings = log_settings(values, env)
        # Records at or above the configured level, to whatever sys.stderr is at the time.
        logsink.set_sink(logsink.Sink(settings.level, as_json=settings.json))
        cfg, opts = load(values, env, machine)
    except (ConfigError, DetectionError) as e:
        _error(str(e))
        return 1
    for arg in positional:
        # Istio's command ignores positional arguments (so "--dry-run false" means --dry-run).
        _log.warning("ignoring positional argument %r", arg)
    _log.info("Istio iptables variables: %s", _describe(cfg, opts))
    return cfg, opts


def _parse_with_click(prog: str, argv: Sequence[str]) -> tuple[dict[str, str], list[str]] | int:
    """What _values_without_click returns, through click: prints --help (0) or the error (1)."""
    import click

    cmd = _command(prog, _SUMMARIES.get(prog, ""))
    try:
        with cmd.make_context(prog, list(argv)) as ctx:
            kwargs: dict[str, Any] = cmd.invoke(ctx)
            positional: list[str] = ctx.meta.get("positional", [])
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        _error(e.format_message())
        return 1
    values = {o.name: kwargs[o.name.replace("-", "_")] for o in FLAGS if o.name is not None}
    return {k: v for k, v in values.items() if v is not None}, positional


def run(
    prog: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    machine: Machine | None = None,
) -> int:
    """One invocation of ``prog``; returns the exit status. Its log records, and the applier's, go
    to stderr as the logging options say; the previous sink is back when it returns."""
    previous = logsink.get_sink()
    real = RealMachine() if machine is None else None
    try:
        parsed = _parse(prog, argv, env, machine or real)
        if isinstance(parsed, int):
            return parsed
        cfg, opts = parsed
        if prog == PROG_CLEAN:
            return _clean(cfg, opts, real)
        return _iptables(cfg, opts, real)
    finally:
        if real is not None:
            real.close()
        logsink.set_sink(previous)


def _target(real: RealMachine | None, opts: ApplyOptions) -> Netns | None:
    """The namespace to work in, opened once (IPv6 detection may have opened it already), so that
    every step works in it whatever its path names by then. Raises ApplyError."""
    if real is None or not opts.network_namespace:
        return None
    from .apply import NETNS, ApplyError

    try:
        return real.namespace(opts.network_namespace)
    except NetnsError as e:
        raise ApplyError(str(e), 1, NETNS) from None


def _iptables(cfg: Config, opts: ApplyOptions, real: RealMachine | None = None) -> int:
    if opts.explain is not None:
        from .explain_live import run as explain

        return explain(cfg, opts, real)
    if opts.explain_live or opts.explain_format != "text":
        _error("--live and --explain-format need --explain PACKET")
        return 1
    if opts.dry_run and opts.cleanup_only:
        _log.info("dry-run with --cleanup-only: nothing to print, nothing removed")
        return 0
    if opts.native_nftables:
        return _nftables(cfg, opts, real)
    from .planner import plan

    ruleset = plan(cfg)
    if opts.dry_run:
        from .render import render_dry_run

        _log.info("running in dry-run mode, no rule changes will be made")
        sys.stdout.write(render_dry_run(ruleset))
        sys.stdout.flush()
        return 0
    from .apply import ApplyError, apply

    try:
        netns = _target(real, opts) if not opts.skip_rule_apply or opts.run_validation else None
        apply(ruleset, opts, netns=netns)
        # Istio's validation init container runs with --skip-rule-apply to check rules the CNI
        # plugin installed, so validation does not depend on applying here.
        if opts.run_validation and not opts.cleanup_only:
            from .validation import validate

            validate(cfg, opts, ipv6=cfg.enable_ipv6, netns=netns)
    except ApplyError as e:
        _error(str(e))
        return int(getattr(e, "exit_code", 1))
    return 0


def _nftables(cfg: Config, opts: ApplyOptions, real: RealMachine | None) -> int:
    """``_iptables`` for --native-nftables: the same plan, written as nftables rules."""
    from .planner import plan_nft

    rules = plan_nft(cfg)
    if opts.dry_run:
        from .nftables import render_dry_run_nft

        _log.info("running in dry-run mode, no rule changes will be made")
        sys.stdout.write(render_dry_run_nft(rules.rules))
        sys.stdout.flush()
        return 0
    from .apply import ApplyError
    from .nft_apply import apply_nft

    try:
        netns = _target(real, opts) if not opts.skip_rule_apply or opts.run_validation else None
        apply_nft(rules, opts, netns=netns)
        if opts.run_validation and not opts.cleanup_only:
            from .validation import validate

            validate(cfg, opts, ipv6=cfg.enable_ipv6, netns=netns)
    except ApplyError as e:
        _error(str(e))
        return int(getattr(e, "exit_code", 1))
    return 0


def _clean(cfg: Config, opts: ApplyOptions, real: RealMachine | None = None) -> int:
    if opts.explain is not None or opts.explain_live or opts.explain_format != "text":
        _error(f"--explain, --live and --explain-format are options of {PROG_IPTABLES}")
        return 1
    if opts.dry_run:
        _log.info("running in dry-run mode, no rules removed")
        return 0
    from .apply import ApplyError, cleanup

    try:
        if opts.native_nftables:
            from .nft_apply import cleanup_nft
            from .planner import plan_nft

            cleanup_nft(opts, rules=plan_nft(cfg), netns=_target(real, opts))
            return 0
        from .planner import plan

        # Both families, whatever this configuration says: rules of an earlier dual-stack run
        # must not survive. The planned rules let cleanup also find our plain rules in built-in
        # chains and our routes.
        cleanup(opts, enable_ipv6=True, ruleset=plan(cfg), netns=_target(real, opts))
    except ApplyError as e:
        _error(str(e))
        return int(getattr(e, "exit_code", 1))
    return 0


def iptables_main() -> None:
    """Console script ``istio-iptables``."""
    exit_now(run(PROG_IPTABLES, sys.argv[1:]))


def clean_main() -> None:
    """Console script ``istio-clean-iptables`` (same options as istio-iptables)."""
    exit_now(run(PROG_CLEAN, sys.argv[1:]))
