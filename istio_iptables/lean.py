"""What the modules on every pod start use instead of ``typing`` and ``dataclasses``.

The CNI plugin and the init container import the planner and the applier on every pod start,
so those modules avoid the two imports that cost most at start-up: ``typing`` and
``dataclasses`` (which pulls in ``inspect``, ``ast``, ``dis`` and ``tokenize``, and compiles
generated code for every class), and ``enum``. Records are ``NamedTuple`` classes and
enumerations ``Enum`` classes, built here by small stand-ins that type checkers never see: they
read ``typing.NamedTuple`` and ``enum.Enum``.

``TYPE_CHECKING`` is False at run time and True for type checkers (they treat any name so
spelled that way), so ``if TYPE_CHECKING:`` imports cost nothing when the code runs.
"""

from __future__ import annotations

TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import NamedTuple as NamedTuple
else:
    from _collections import _tuplegetter

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
            """The fields as parameters, for ``inspect.signature`` (tools that build records from
            their signature): built on demand, so only they import ``inspect``."""
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
        the annotated names become the fields of a tuple subclass (with their defaults), and the
        class body's methods, properties and docstring stay on it."""

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

if TYPE_CHECKING:
    from enum import Enum as Enum
else:

    class _EnumMeta(type):
        """The part of ``enum.Enum`` these modules use, without importing ``enum`` (about 2 ms of
        every start with what it imports): each public, non-callable class attribute becomes a member,
        an instance with ``name`` and ``value``; ``Cls(value)``, ``Cls[name]``, iteration in
        definition order, ``len`` and identity comparison work as with ``enum.Enum``."""

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


def exit_now(code: int) -> None:
    """End a short-lived command at once with ``code``, after flushing its standard streams.

    Skips the interpreter's own shutdown (tearing down every module and object it loaded), which
    costs a pod start several milliseconds and does nothing these commands need: their files are
    written through and closed, and their children reaped, before this is called. When a stream
    cannot be flushed (a closed pipe), the ordinary exit reports it.
    """
    import os
    import sys

    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code)
