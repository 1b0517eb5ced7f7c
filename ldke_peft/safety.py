"""Validation of an LDKE pack's files before loading (owned by the reliability work; see SECURITY.md)."""

from __future__ import annotations

from typing import Any


def validate_pack(path_or_repo: str, config: Any, subfolder: str | None = None, **hub_kwargs: Any) -> None:
    """Raise an :class:`~ldke_peft.errors.AdapterLoadError` subclass if the pack cannot be loaded safely."""
    return None
