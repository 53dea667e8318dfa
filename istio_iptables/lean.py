"""What the modules on every pod start use instead of ``typing`` and ``dataclasses``.

The CNI plugin and the init container import the planner and the applier on every pod start,
so those modules avoid the two imports that cost most at start-up: ``typing`` and
``dataclasses`` (which pulls in ``inspect``, ``ast``, ``dis`` and ``tokenize``, and compiles
generated code for every class). Records are ``NamedTuple`` classes, built here by a small
stand-in that type checkers never see: they read ``typing.NamedTuple``.

``TYPE_CHECKING`` is False at run time and True for type checkers (they treat any name so
spelled that way), so ``if TYPE_CHECKING:`` imports cost nothing when the code runs.
"""

from __future__ import annotations

TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import NamedTuple as NamedTuple
else:

    class _NamedTupleMeta(type):
        """What ``typing.NamedTuple`` does for a class statement, without importing ``typing``:
        the annotated names become a ``collections.namedtuple`` (with their defaults), and the
        class body's methods, properties and docstring are copied onto it."""

        def __new__(cls, name, bases, ns):
            from collections import namedtuple

            fields = list(ns.get("__annotations__", {}))
            defaults = []
            for f in fields:
                if f in ns:
                    defaults.append(ns[f])
                elif defaults:
                    raise TypeError(f"Non-default namedtuple field {f} cannot follow default field")
            tup = namedtuple(name, fields, defaults=defaults, module=ns["__module__"])
            for key, value in ns.items():
                if key not in fields and key not in ("__module__", "__qualname__", "__annotations__"):
                    setattr(tup, key, value)
            tup.__qualname__ = ns.get("__qualname__", name)
            return tup

    _NamedTupleBase = type.__new__(_NamedTupleMeta, "NamedTuple", (), {})

    def NamedTuple(*args, **kwargs):  # noqa: N802 - typing's name
        raise TypeError("only the class form 'class X(NamedTuple): ...' is supported here")

    NamedTuple.__mro_entries__ = lambda bases: (_NamedTupleBase,)
