"""ldke-peft's own JSONL format for requests (lossless round trip) and negative pools.

The format is documented in :mod:`ldke_peft.requests`.

Layer: data (README "Architecture"): imports only other data modules.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from PIL import Image

from ..errors import ImageError, InvalidRequestError
from .images import _relative, image_fingerprint, load_image
from .records import _bad, _short
from .types import PROBE_FIELDS, EditRequest, Probe
from .validation import _resolve, parse_request


def load_jsonl(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    open_images: bool = False,
    tokenizer: Any | None = None,
) -> list[EditRequest]:
    """Read our JSONL format (see the module docstring) into validated :class:`EditRequest` objects.

    Relative image paths are resolved against ``image_root`` (default: the JSONL file's folder).
    Error messages start with ``line <n> of <path>: `` (from 1, as editors count) and name the field;
    ``exc.index`` is the 0-based record index (blank lines not counted), ``exc.line`` the line number.
    """
    path = os.fspath(path)
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    out: list[EditRequest] = []
    for index, (lineno, data) in enumerate(_jsonl_lines(path)):
        try:
            out.append(parse_request(data, image_root=root, open_images=open_images, tokenizer=tokenizer))
        except InvalidRequestError as exc:
            raise _at_line(exc, path, lineno, index) from None
    return out


def _jsonl_lines(path: str) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON)`` for every non-blank line of a JSONL file (line numbers from 1)."""
    with open(path, encoding="utf-8") as fh:
        for index, (lineno, line) in enumerate((n, t) for n, t in enumerate(fh, start=1) if t.strip()):
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise _at_line(InvalidRequestError(f"not valid JSON: {exc}"), path, lineno, index) from None


def _at_line(exc: InvalidRequestError, path: str, lineno: int, index: int) -> InvalidRequestError:
    """The same error type and field, with ``line <n> of <path>: `` in front (1-based, as editors count);
    ``exc.index`` is the 0-based record index (blank lines not counted), ``exc.line`` the line number."""
    new = type(exc)(f"line {lineno} of {path}: {exc}", field=exc.field, index=index)
    new.line = lineno  # type: ignore[attr-defined]
    return new


#: Keys of a line of a negatives file (:func:`load_negatives`).
_NEGATIVE_KEYS = {"question": "relation", "image": "entity"}


def load_negatives(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> Any:
    """Read a negatives file (JSONL) into an :class:`~ldke_peft.requests.NegativePool`.

    One JSON object per line (blank lines are skipped), either a question with the relation it asks
    for, or an image with the entity it shows (the labels may be ``null`` when unknown)::

        {"question": "When was this building completed?", "relation": "completion year"}
        {"question": "Which architect designed this building?", "relation": "architect"}
        {"image": "buildings/notre_dame.png", "entity": "Notre-Dame de Paris"}

    Questions of *other* relations and images of *other* entities become the router's hard negatives;
    questions labelled with an edit's own relation are other wordings of it (they join its scope).
    Relative image paths are resolved against ``image_root`` (default: the file's folder); images are
    opened here, so a bad one fails before any model is loaded. Errors name the line (from 1) and the
    field: :class:`InvalidRequestError`, :class:`ImageError` for images.
    """
    from .types import NegativePool

    path = os.fspath(path)
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    pool = NegativePool()
    for index, (lineno, data) in enumerate(_jsonl_lines(path)):
        try:
            kind, label = _negative(data, root)
        except InvalidRequestError as exc:
            raise _at_line(exc, path, lineno, index) from None
        (pool.questions if isinstance(kind, str) else pool.images).append((kind, label))
    if not pool.questions and not pool.images:
        raise InvalidRequestError(f"{path} holds no negatives (expected lines like "
                                  '{"question": ..., "relation": ...} or {"image": ..., "entity": ...})')
    return pool


def _negative(data: Any, root: str) -> tuple[Any, str | None]:
    """``(question or PIL image, label)`` of one line of a negatives file."""
    if not isinstance(data, Mapping):
        raise InvalidRequestError(f"expected a JSON object, got {type(data).__name__}")
    known = [k for k in _NEGATIVE_KEYS if k in data]
    if len(known) != 1:
        raise InvalidRequestError(
            "a line holds either a question (with its relation) or an image (with its entity), got "
            + (" and ".join(known) if known else "neither"), field=known[-1] if known else None)
    key = known[0]
    label_key = _NEGATIVE_KEYS[key]
    for k in data:
        if k not in (key, label_key):
            raise InvalidRequestError(f"unknown field {_short(k)} next to {key!r}; known: {key}, {label_key}", field=str(k))
    label = data.get(label_key)
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise InvalidRequestError(f"{label_key}: must be a non-empty string or null, got {_short(label)}", field=label_key)
    value = data[key]
    if key == "question":
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequestError(f"question: must be a non-empty string, got {_short(value)}", field="question")
        return value, label
    if not isinstance(value, str) or not value:
        raise ImageError(f"image: must be a file path, got {_short(value)}", field="image")
    return load_image(_resolve(value, root), "image"), label


def save_negatives(pool: Any, path: str | os.PathLike) -> None:
    """Write a :class:`~ldke_peft.requests.NegativePool` as a negatives file (:func:`load_negatives` reads it
    back); in-memory images are saved as ``images/<sha>.png`` next to it, paths relative to its folder."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    image_dir = os.path.join(folder, "images")
    lines = [{"question": q, "relation": rel} for q, rel in pool.questions]
    lines += [{"image": _relative(_materialise(im, image_dir), folder), "entity": ent} for im, ent in pool.images]
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")


def save_jsonl(
    requests: Sequence[EditRequest],
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
) -> None:
    """Write requests in our JSONL format, one :meth:`EditRequest.to_dict` per line.

    Image paths are written relative to ``image_root`` (default: the JSONL file's folder). In-memory
    PIL images without an existing file are saved as ``images/<sha>.png`` next to the JSONL file
    (deduplicated by pixel content) so :func:`load_jsonl` reads back the same pixels. The requests
    passed in are not modified.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    root = os.fspath(image_root) if image_root is not None else folder
    image_dir = os.path.join(folder, "images")
    lines = []
    for i, req in enumerate(requests):
        if not isinstance(req, EditRequest):
            raise _bad(i, None, f"expected an EditRequest, got {type(req).__name__}")
        req = copy.copy(req)
        req.image = _materialise(req.image, image_dir)
        req.rephrase_images = [_materialise(im, image_dir) for im in req.rephrase_images]
        for key in PROBE_FIELDS:
            setattr(req, key, [_materialise_probe(p, image_dir) for p in getattr(req, key)])
        lines.append(json.dumps(req.to_dict(root), ensure_ascii=False))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(line + "\n")


def _materialise_probe(p: Probe | Mapping, image_dir: str) -> Probe:
    if isinstance(p, Mapping):
        p = Probe(**p)
    return replace(p, image=_materialise(p.image, image_dir))


def _materialise(image: Any, image_dir: str) -> Any:
    """A path for ``image``: its own file when it has one, else a PNG written into ``image_dir``."""
    if image is None or isinstance(image, (str, os.PathLike)):
        return image
    if not isinstance(image, Image.Image):
        raise ImageError(f"cannot save image of type {type(image).__name__}", field="image")
    fn = getattr(image, "filename", "")
    if fn and os.path.isfile(fn):
        return fn
    rgb = image.convert("RGB")
    os.makedirs(image_dir, exist_ok=True)
    out = os.path.join(image_dir, f"{image_fingerprint(rgb)}.png")
    if not os.path.exists(out):
        rgb.save(out, format="PNG")
    return out
