"""Validating requests given as objects or dicts; errors name the record and the field.

Owns: the record-indexed error helpers and :func:`parse_request` / :func:`validate_requests`.

Layer: data (README "Architecture"): imports only other data modules.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any


from ..errors import InvalidRequestError
from .records import _at_index, _bad, _short
from .types import PROBE_FIELDS, EditRequest, Probe


# ---------------------------------------------------------------------- our format

_REQUEST_KEYS = tuple(f.name for f in fields(EditRequest))
_PROBE_KEYS = tuple(f.name for f in fields(Probe))


def parse_request(
    data: Any,
    *,
    image_root: str | os.PathLike | None = None,
    index: int | None = None,
    open_images: bool = True,
    tokenizer: Any | None = None,
) -> EditRequest:
    """Build and validate an :class:`EditRequest` from one dict of our format (:meth:`EditRequest.to_dict`).

    Relative image paths are resolved against ``image_root`` (when given). ``index``, when given, is
    put in front of every error message (``record 3: ...``). Raises only
    :class:`InvalidRequestError`/:class:`ImageError`, whatever ``data`` is.
    """
    if not isinstance(data, Mapping):
        raise _bad(index, None, f"expected a JSON object (dict) for a request, got {type(data).__name__}")
    for key in data:
        if not isinstance(key, str) or key not in _REQUEST_KEYS:
            raise _bad(index, str(key), f"unknown field {_short(key)}; known fields: {', '.join(_REQUEST_KEYS)}")
    for key in ("prompt", "target"):
        if key not in data:
            raise _bad(index, key, "missing required field")
    kwargs = dict(data)
    root = None if image_root is None else os.fspath(image_root)
    if "image" in kwargs:
        kwargs["image"] = _resolve(kwargs["image"], root)
    for key in ("rephrase_prompts", "rephrase_images", *PROBE_FIELDS):
        value = kwargs.get(key)
        if value is None:
            value = []
        elif not isinstance(value, list):
            if key in ("rephrase_prompts", "rephrase_images") and isinstance(value, (str, os.PathLike)):
                value = [value]
            else:
                raise _bad(index, key, f"must be a list, got {type(value).__name__}")
        kwargs[key] = list(value)
    kwargs["rephrase_images"] = [_resolve(im, root) for im in kwargs["rephrase_images"]]
    for key in PROBE_FIELDS:
        probes = []
        for j, p in enumerate(kwargs[key]):
            if isinstance(p, Mapping):
                bad = [k for k in p if not isinstance(k, str) or k not in _PROBE_KEYS]
                if bad:
                    raise _bad(index, key, f"{key}[{j}] has unknown field {_short(bad[0])}; known: {', '.join(_PROBE_KEYS)}")
                missing = [k for k in ("prompt", "answer") if k not in p]
                if missing:
                    raise _bad(index, key, f"{key}[{j}] is missing required field {missing[0]!r}")
                p = dict(p)
                p["image"] = _resolve(p.get("image"), root)
                if p.get("kind") is None:
                    p["kind"] = ""
                p = Probe(**p)
            elif not isinstance(p, Probe):
                raise _bad(index, key, f"{key}[{j}] must be an object with prompt/answer, got {type(p).__name__}")
            probes.append(p)
        kwargs[key] = probes
    request = EditRequest(**kwargs)
    try:
        return request.validate(tokenizer, open_images=open_images)
    except InvalidRequestError as exc:
        raise (exc if index is None else _at_index(exc, index)) from None


def _resolve(image: Any, root: str | None) -> Any:
    """Join a relative path onto ``root``; anything else (absolute path, PIL, junk) passes through."""
    if root is None or not isinstance(image, (str, os.PathLike)):
        return image
    path = os.fspath(image)
    if not isinstance(path, str) or not path or os.path.isabs(path):
        return path
    return os.path.join(root, path)


def validate_requests(
    requests: Sequence[EditRequest | Mapping] | EditRequest,
    tokenizer: Any | None = None,
    *,
    open_images: bool = True,
) -> list[EditRequest]:
    """Validate a list of requests (dicts of our format are parsed); errors name the index.

    Returns the validated list (the :class:`EditRequest` objects are validated in place).
    """
    if isinstance(requests, (EditRequest, Mapping)):
        requests = [requests]
    if not isinstance(requests, Sequence) or isinstance(requests, (str, bytes)):
        raise InvalidRequestError(
            f"expected a list of EditRequest, got {type(requests).__name__}", field=None
        )
    out = []
    for i, req in enumerate(requests):
        if isinstance(req, EditRequest):
            try:
                out.append(req.validate(tokenizer, open_images=open_images))
            except InvalidRequestError as exc:
                raise _at_index(exc, i, "request") from None
        else:
            out.append(parse_request(req, index=i, open_images=open_images, tokenizer=tokenizer))
    return out
