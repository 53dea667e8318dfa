"""The start-up measures of the per-pod commands, in one place.

``istio-iptables`` (the init container), ``istio-clean-iptables`` and ``istio-cni`` (run by the
runtime for every pod) are short-lived processes whose time is mostly the interpreter starting
and importing modules, so what they import is kept small. The measures that stand in for a
public module live here; every other module takes them from here. Each falls back to the public
module when the private one it uses is missing (another interpreter or version), so a missing
private module costs start-up time, never correctness. tests/test_import_budget.py names, per
command, the modules that must not be imported.

What each saves: the median of the paired differences of the wall-clock time of the command
with the measure and with the public API swapped in (60-80 interleaved runs each, a 2-core
machine). dry-run and apply: istio-iptables with the injector's arguments
(deploy/examples/meshed-pod-init.yaml), the apply in a fresh namespace; clean: after that apply;
ADD and DEL: the self-contained plugin (scripts/build-plugin), ADD with a prevResult into a
fresh namespace. The commands take about 16 ms (dry-run), 25 ms (apply), 47 ms (clean), 45-54 ms
(ADD) and 21 ms (DEL).

=================  =========================  ==================================================
measure            instead of                 saves
=================  =========================  ==================================================
NamedTuple         typing.NamedTuple          7.7 ms dry-run, 10.3 apply, 5.6 clean, 4.6 ADD,
                                              5.2 DEL (typing, with re and enum on istio-iptables)
                   collections.namedtuple     1.0 ms dry-run, 1.3-2.9 apply, 1.6-2.2 ADD (it
                                              compiles generated code for every class)
Enum               enum.Enum                  1.5 ms dry-run, 2.1 apply; nothing on clean, ADD
                                              and DEL, where shlex, json or ssl load enum anyway
TYPE_CHECKING      typing.TYPE_CHECKING       5.2 ms dry-run, 6.5 apply; typing's 2.4-3.0 ms
                                              import on ADD and DEL
exit_now           sys.exit                   2.2 ms dry-run, 3.2-4.6 apply, 5-6 clean, 5.5-6.4
                                              ADD, 3.1 DEL (the interpreter's shutdown)
socket             socket (``_socket``)       2.7 ms dry-run, 3.2-3.5 apply; nothing on ADD,
                                              where ssl imports socket
SIGKILL, ...       signal (``_signal``)       1.9-2.3 ms apply; signal's own 0.4-0.5 ms on ADD
                                              and DEL (enum is loaded there)
libc_function      ctypes (``_ctypes``)       1.0 ms istio-iptables --network-namespace (setns
                                              on Python 3.11), 1.5 ms ADD (files-only
                                              nsswitch.conf); where nsswitch.conf names NSS
                                              modules the launcher binds unshare and mount
                                              through it too (nsexec): 0.8-1.3 ms DEL, within an
                                              ADD's noise (ctypes' import: 0.7-1.9 ms)
=================  =========================  ==================================================

Measured and kept elsewhere, being the modules' own code rather than stand-ins (wall-clock as
above; "import" marks the in-process cost of the import with the command's other modules loaded):
the sink (logsink.py, no ``logging``: 8.3 ms dry-run, 10.2 apply, 6 clean, 4.8-5.3 ADD, 6.9 DEL),
the executor's posix_spawn (no ``subprocess``: 7.7 ms apply, 2.8-4.5 clean, 4.5 DEL), hand-written
parsers and plain console scripts (no ``re``: 2.3 ms dry-run, 2.4-3.4 apply), click only for
--help and usage errors (21 ms dry-run), json only for --log_as_json (4.0 ms dry-run, 4.7
apply), ``ipaddress`` only where an address is read (DEL: import 1.0 ms), ``traceback`` only on
an internal error (ADD, DEL: import 2.4-2.9 ms), ``shlex`` only when rules exist (apply: import
2.5 ms), the kube client's own HTTP GET (``http.client``: import 18 ms) and PyYAML only for
kubeconfigs that need it (import 7 ms), no ``contextlib`` (0.4 ms dry-run, 1.1 apply). Dropped,
saving under 0.1 ms on any command: deferring the ``fcntl`` and ``select`` imports.

``TYPE_CHECKING`` is False at run time and True for type checkers (they treat any name so
spelled that way), so ``if TYPE_CHECKING:`` imports cost nothing when the code runs; type
checkers read the public classes there.
"""

from __future__ import annotations

TYPE_CHECKING = False

if TYPE_CHECKING:
    import _socket as socket  # noqa: F401 - resolved by __getattr__ at run time
    from collections.abc import Callable
    from enum import Enum as Enum
    from signal import SIGKILL, SIGPIPE, SIGXFSZ
    from typing import NamedTuple as NamedTuple
else:
    # --- records: NamedTuple ---------------------------------------------------------------------

    try:
        from _collections import _tuplegetter
    except ImportError:  # not CPython's collections: the public class
        _tuplegetter = None

    if _tuplegetter is None:
        from typing import NamedTuple
    else:

        def _record_new(name, fields, defaults):
            """``__new__`` of a record class: positional and keyword arguments, and the defaults.

            A closure rather than generated source (``collections.namedtuple`` compiles one for
            each class, which costs more at start-up than every construction here costs later)."""
            count = len(fields)
            known = frozenset(fields)

            def __new__(cls, *args, **kwargs):
                if kwargs or len(args) != count:
                    if len(args) > count:
                        raise TypeError(f"{name}() takes {count} arguments but {len(args)} were given")
                    args = list(args)
                    for field in fields[len(args) :]:
                        if field in kwargs:
                            args.append(kwargs.pop(field))
                        elif field in defaults:
                            args.append(defaults[field])
                        else:
                            raise TypeError(f"{name}() missing required argument: {field!r}")
                    if kwargs:
                        extra = next(iter(kwargs))
                        why = "multiple values for" if extra in known else "an unexpected keyword"
                        raise TypeError(f"{name}() got {why} argument {extra!r}")
                return tuple.__new__(cls, args)

            return __new__

        class _RecordMeta(type):
            @property
            def __signature__(cls):
                """The fields as parameters, for ``inspect.signature`` (tools that build records
                from their signature): built on demand, so only they import ``inspect``."""
                import inspect

                param = inspect.Parameter
                return inspect.Signature(
                    [
                        param(f, param.POSITIONAL_OR_KEYWORD, default=cls._field_defaults.get(f, param.empty))
                        for f in cls._fields
                    ]
                )

        class _RecordBase(tuple, metaclass=_RecordMeta):
            """What ``collections.namedtuple`` classes offer, shared by every record class."""

            __slots__ = ()

            def __repr__(self):
                inner = ", ".join(f"{f}={v!r}" for f, v in zip(self._fields, self, strict=True))
                return f"{type(self).__name__}({inner})"

            def _replace(self, **changes):
                values = [changes.pop(f, v) for f, v in zip(self._fields, self, strict=True)]
                if changes:
                    raise TypeError(f"got unexpected field names: {list(changes)!r}")
                return tuple.__new__(type(self), values)

            def _asdict(self):
                return dict(zip(self._fields, self, strict=True))

            @classmethod
            def _make(cls, iterable):
                values = tuple(iterable)
                if len(values) != len(cls._fields):
                    raise TypeError(f"expected {len(cls._fields)} arguments, got {len(values)}")
                return tuple.__new__(cls, values)

            def __getnewargs__(self):
                return tuple(self)

        class _NamedTupleMeta(type):
            """What ``typing.NamedTuple`` does for a class statement, without importing ``typing``:
            the annotated names become the fields of a tuple subclass (with their defaults), and
            the class body's methods, properties and docstring stay on it."""

            def __new__(cls, name, bases, ns):
                fields = tuple(ns.get("__annotations__", {}))
                defaults = {}
                for f in fields:
                    if f in ns:
                        defaults[f] = ns[f]
                    elif defaults:
                        raise TypeError(f"Non-default namedtuple field {f} cannot follow default field")
                body = {k: v for k, v in ns.items() if k not in fields}
                body["__slots__"] = ()
                body["_fields"] = fields
                body["_field_defaults"] = defaults
                body["__match_args__"] = fields
                body["__new__"] = _record_new(name, fields, defaults)
                for i, f in enumerate(fields):
                    body[f] = _tuplegetter(i, f"Alias for field number {i}")
                return _RecordMeta(name, (_RecordBase,), body)

        _NamedTupleBase = type.__new__(_NamedTupleMeta, "NamedTuple", (), {})

        def NamedTuple(*args, **kwargs):  # noqa: N802 - typing's name
            raise TypeError("only the class form 'class X(NamedTuple): ...' is supported here")

        NamedTuple.__mro_entries__ = lambda bases: (_NamedTupleBase,)

    # --- enumerations: Enum ----------------------------------------------------------------------
    # Plain Python, no private module: nothing to fall back from.

    class _EnumMeta(type):
        """The part of ``enum.Enum`` these modules use, without importing ``enum``: each public,
        non-callable class attribute becomes a member, an instance with ``name`` and ``value``;
        ``Cls(value)``, ``Cls[name]``, iteration in definition order, ``len`` and identity
        comparison work as with ``enum.Enum``."""

        def __new__(mcs, name, bases, ns):
            members = {
                k: v
                for k, v in ns.items()
                if not k.startswith("_")
                and not callable(v)
                and not isinstance(v, (property, staticmethod, classmethod))
            }
            body = {k: v for k, v in ns.items() if k not in members}
            body["__slots__"] = ("name", "value")
            cls = super().__new__(mcs, name, bases, body)
            cls._members = {}
            cls._by_value = {}
            for key, value in members.items():
                member = object.__new__(cls)
                object.__setattr__(member, "name", key)
                object.__setattr__(member, "value", value)
                type.__setattr__(cls, key, member)
                cls._members[key] = member
                cls._by_value.setdefault(value, member)
            return cls

        def __call__(cls, value):
            try:
                return cls._by_value[value]
            except (KeyError, TypeError):
                raise ValueError(f"{value!r} is not a valid {cls.__qualname__}") from None

        def __getitem__(cls, name):
            return cls._members[name]

        def __iter__(cls):
            return iter(cls._members.values())

        def __len__(cls):
            return len(cls._members)

        def __contains__(cls, member):
            return isinstance(member, cls) and cls._members.get(member.name) is member

    class Enum(metaclass=_EnumMeta):
        def __repr__(self):
            return f"<{type(self).__qualname__}.{self.name}: {self.value!r}>"

        def __str__(self):
            return f"{type(self).__qualname__}.{self.name}"

        def __setattr__(self, key, value):
            raise AttributeError(f"cannot set {key!r} on an enumeration member")

        def __reduce__(self):
            return type(self), (self.value,)

        __hash__ = object.__hash__

    # --- socket and signal: their C halves -------------------------------------------------------
    # The interpreter has ``_signal`` loaded already; ``signal`` and ``socket`` import ``enum``
    # (and socket ``selectors``) for their IntEnum constants, which these modules do not need.
    # ``socket`` is resolved when a module first imports it from here (commands that never
    # open a socket, such as a CNI DEL, do not initialise ``_socket`` either).

    def __getattr__(name):
        if name != "socket":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        global socket
        try:
            import _socket as socket
        except ImportError:
            import socket
        return socket

    try:
        from _signal import SIGKILL, SIGPIPE, SIGXFSZ
    except ImportError:
        from signal import SIGKILL, SIGPIPE, SIGXFSZ  # noqa: F401 - for the modules importing them from here


# --- libc functions: _ctypes ---------------------------------------------------------------------

_libc_functions: dict[str, Callable[..., int]] = {}


def libc_function(name: str) -> Callable[..., int]:
    """libc's ``name`` as ``ctypes.CDLL(None, use_errno=True).<name>`` binds it (int arguments,
    bytes as ``char *``, None as NULL; an int result; errno kept for get_errno), through
    ``_ctypes``, the C half of ``ctypes``: the package itself costs a pod start about 1-1.5 ms
    more. Falls back to ``ctypes`` when ``_ctypes`` lacks what this needs. Raises AttributeError
    when libc has no such function."""
    function = _libc_functions.get(name)
    if function is None:
        function = _libc_functions[name] = _bind(name)
    return function


def _bind(name: str) -> Callable[..., int]:
    try:
        import _ctypes

        class _Int(_ctypes._SimpleCData):  # ctypes.c_int
            _type_ = "i"

        class _Function(_ctypes.CFuncPtr):  # a CDLL function with use_errno=True
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = _Int

        program = _ctypes.dlopen(None, 0)  # type: ignore[arg-type]  # dlopen(NULL): this program and libc
    except (ImportError, AttributeError):
        import ctypes

        function: Callable[..., int] = getattr(ctypes.CDLL(None, use_errno=True), name)
        return function
    try:
        address = _ctypes.dlsym(program, name)
    except OSError:
        raise AttributeError(f"libc has no function {name}") from None
    function = _Function(address)
    return function


def get_errno() -> int:
    """The errno the last libc_function call left (``ctypes.get_errno``)."""
    try:
        from _ctypes import get_errno as errno_of
    except ImportError:
        from ctypes import get_errno as errno_of
    return int(errno_of())


# --- ending the process: exit_now ----------------------------------------------------------------


def exit_now(code: int) -> None:
    """End a short-lived command at once with ``code``, after flushing its standard streams.

    Skips the interpreter's own shutdown (tearing down every module and object it loaded), which
    costs a pod start 2-6 ms and does nothing these commands need: their files are written
    through and closed, and their children reaped, before this is called. When a stream cannot
    be flushed (a closed pipe), or there is no ``os._exit``, the ordinary exit reports it.
    """
    import os
    import sys

    try:
        sys.stdout.flush()
        sys.stderr.flush()
        end = os._exit
    except (OSError, ValueError, AttributeError):
        sys.exit(code)
    end(code)
