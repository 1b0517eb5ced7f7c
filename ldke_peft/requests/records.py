"""Errors that name the record (its index in a list or its line in a file) and the field at fault.

Layer: data (README "Architecture"): imports only other data modules.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequestError


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _at_index(exc: InvalidRequestError, index: int, where: str = "record") -> InvalidRequestError:
    """The same error type and field, with ``<where> <index>: `` in front of the message."""
    new = type(exc)(f"{where} {index}: {exc}", field=exc.field)
    new.index = index  # type: ignore[attr-defined]
    return new


def _bad(index: int | None, field_name: str | None, message: str, cls: type[InvalidRequestError] = InvalidRequestError):
    prefix = "" if index is None else f"record {index}: "
    where = f"{field_name}: " if field_name else ""
    exc = cls(f"{prefix}{where}{message}", field=field_name)
    exc.index = index  # type: ignore[attr-defined]
    return exc
