"""Named settings given as strings: ``parse_choice(Routing, "fast", "routing")`` -> ``Routing.FAST``."""

from __future__ import annotations

from enum import Enum


def parse_choice(enum: type[Enum], value, what: str, error: type[Exception] = ValueError) -> Enum:
    """The member of ``enum`` whose value is ``value`` (or ``value`` itself); else ``error`` naming the
    setting ``what`` and every allowed value."""
    try:
        return enum(value)
    except ValueError:
        names = ", ".join(repr(m.value) for m in enum)
        raise error(f"unknown {what} {value!r}: use one of {names}") from None
