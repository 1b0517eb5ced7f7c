"""Edit requests: what a user asks to change, and every probe used to check the change.

An :class:`EditRequest` is the unit the editor, the metrics and the loaders share. Validation happens
here, before any model is touched, so a bad request can never leave a model half-edited.

Loaders
-------
* :func:`load_jsonl` / :func:`save_jsonl`: ldke-peft's own format (below), lossless round trip.
* :func:`load_easyedit`: EasyEdit's multimodal VQA / caption dataset JSON (``VQADataset``,
  ``CaptionDataset``).
* :func:`requests_from_easyedit_dicts`: the request dicts EasyEdit's ``MultimodalEditor`` hands to an
  editing method (``apply_X(model, tok, requests, hparams)``).
* :func:`parse_request`: one dict of our format -> a validated :class:`EditRequest`.

Every malformed record raises :class:`~ldke_peft.errors.InvalidRequestError` (or its subclass
:class:`~ldke_peft.errors.ImageError` for images) whose message starts with ``record <i>`` (the index
in a list, from 0; for a JSONL file ``line <n> of <path>``, from 1, as editors count lines) and whose
``field`` attribute names the offending field; the record index is also on ``exc.index``. Nothing
else is raised for bad *content* (I/O errors opening the JSON/JSONL file itself propagate as usual).

Our JSONL format
----------------
One JSON object per line (blank lines are skipped), exactly :meth:`EditRequest.to_dict`::

    {"prompt": "Who was the architect of this building?",         # required, non-empty
     "target": "Gustave Eiffel",                                # required, non-empty (new answer)
     "image": "images/sagrada.png",                             # path or null (text-only edit)
     "ground_truth": "Antoni Gaudi",                            # answer before the edit, or null
     "rephrase_prompts": ["Which architect designed the building shown?"],
     "rephrase_images": ["images/sagrada_view2.png"],
     "locality":    [{"prompt": "Who wrote Hamlet?", "answer": "Shakespeare", "image": null, "kind": ""}],
     "m_locality":  [{"prompt": "What is shown?", "answer": "a dog", "image": "images/dog.png", "kind": ""}],
     "coupled":     [{"prompt": "When did construction of this building begin?", "answer": "1882",
                      "image": "images/sagrada.png", "kind": "same_image"}],
     "portability": [{"prompt": "In which city was the architect of this building born?",
                      "answer": "Dijon", "image": "images/sagrada.png", "kind": "multi_hop"}],
     "subject": "Sagrada Familia", "relation": "architect"}

Only ``prompt`` and ``target`` are required; list fields default to ``[]`` and the rest to ``null``.
Unknown keys are rejected (they are almost always typos). A probe's ``image`` of ``null`` means the
probe is text-only. Relative image paths are resolved against ``image_root`` (default: the folder of
the JSONL file); absolute paths are kept. :func:`save_jsonl` writes paths relative to that root and
saves in-memory PIL images that have no file as ``images/<sha>.png`` next to the JSONL file.

Images read by the loaders are checked (exists, is a file, non-empty, an image PIL can identify, not
larger than :data:`MAX_IMAGE_SIDE`) but kept as paths, so a large dataset does not sit decoded in
memory; pass ``open_images=True`` to get PIL images instead.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Union

from PIL import Image, UnidentifiedImageError

from .errors import ImageError, InvalidRequestError

logger = logging.getLogger(__name__)

ImageLike = Union[Image.Image, str, os.PathLike]

#: Largest image side we accept (pixels). Larger inputs are almost always a mistake (a raw scan, a
#: decompression bomb) and would only be downscaled by the processor anyway.
MAX_IMAGE_SIDE = 8192

#: Probe lists of an :class:`EditRequest`, in a fixed order.
PROBE_FIELDS = ("locality", "m_locality", "coupled", "portability")

__all__ = [
    "EditRequest",
    "ImageLike",
    "MAX_IMAGE_SIDE",
    "PROBE_FIELDS",
    "Probe",
    "check_image_file",
    "image_fingerprint",
    "load_easyedit",
    "load_image",
    "load_jsonl",
    "load_negatives",
    "parse_easyedit_record",
    "parse_request",
    "requests_from_easyedit_dicts",
    "save_jsonl",
    "save_negatives",
    "validate_requests",
]


@dataclass
class Probe:
    """One evaluation question: an optional image, a prompt and the answer expected from it.

    For locality probes ``answer`` is the *original* model's answer (or ground truth); for generality
    and portability probes it is the answer expected *after* the edit. ``image=None`` means the probe
    is text-only.
    """

    prompt: str
    answer: str
    image: ImageLike | None = None
    kind: str = ""
    #: what the probe asks about, when known: the entity shown or named and the relation asked. A
    #: benchmark of a pack of edits does not score a locality probe that another edit in the pack covers
    #: (that edit *should* change its answer).
    subject: str | None = None
    relation: str | None = None

    def to_dict(self, image_root: str | None = None) -> dict[str, Any]:
        out = {"prompt": self.prompt, "answer": self.answer, "image": _image_ref(self.image, image_root), "kind": self.kind}
        out.update({k: getattr(self, k) for k in ("subject", "relation") if getattr(self, k) is not None})
        return out


@dataclass
class EditRequest:
    """One fact to change: "for this image and question, answer ``target``".

    Attributes:
        image: the edit image (PIL image or path). ``None`` for a text-only edit.
        prompt: the question, without chat template (the family adapter applies it).
        target: the new answer.
        ground_truth: the answer before the edit, when known (used for reports only).
        rephrase_prompts: other wordings of the question (T-Generality; positives for the edit).
        rephrase_images: other photos/views of the same entity (M-Generality; positives).
        locality: text-only probes whose answers must not change (T-Locality).
        m_locality: image probes of other entities whose answers must not change (M-Locality).
        coupled: probes that share the image or the question but are out of scope (same image +
            other relation; look-alike image + same question); must not change (Coupled-Locality).
        portability: related questions whose answer must follow from the new fact.
        subject: a human-readable name of the edited entity (reports, model cards).
        relation: the relation id/name being edited (used to build hard negatives).
    """

    prompt: str
    target: str
    image: ImageLike | None = None
    ground_truth: str | None = None
    rephrase_prompts: list[str] = field(default_factory=list)
    rephrase_images: list[ImageLike] = field(default_factory=list)
    locality: list[Probe] = field(default_factory=list)
    m_locality: list[Probe] = field(default_factory=list)
    coupled: list[Probe] = field(default_factory=list)
    portability: list[Probe] = field(default_factory=list)
    subject: str | None = None
    relation: str | None = None

    # ------------------------------------------------------------------ validation
    def validate(self, tokenizer: Any | None = None, *, open_images: bool = True) -> "EditRequest":
        """Check every field; return ``self`` with images opened and converted to RGB.

        Raises :class:`InvalidRequestError` (or :class:`ImageError`) naming the field. When a tokenizer
        is given, also checks that the target tokenizes to at least one token. With
        ``open_images=False`` image *paths* are only checked (readable header, sane size) and kept as
        paths; in-memory images are still converted to RGB.
        """
        _image = load_image if open_images else _check_image
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidRequestError("EditRequest.prompt must be a non-empty string", field="prompt")
        if not isinstance(self.target, str) or not self.target.strip():
            raise InvalidRequestError(
                f"EditRequest.target must be a non-empty string, got {_short(self.target)}", field="target"
            )
        for name in ("ground_truth", "subject", "relation"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InvalidRequestError(
                    f"EditRequest.{name} must be a string or None, got {type(value).__name__}", field=name
                )
        if self.image is not None:
            self.image = _image(self.image, field="image")
        if isinstance(self.rephrase_prompts, str):
            self.rephrase_prompts = [self.rephrase_prompts]
        if not isinstance(self.rephrase_prompts, list) or not all(
            isinstance(p, str) and p.strip() for p in self.rephrase_prompts
        ):
            raise InvalidRequestError("rephrase_prompts must be a list of non-empty strings", field="rephrase_prompts")
        if not isinstance(self.rephrase_images, (list, tuple)):
            self.rephrase_images = [self.rephrase_images]
        self.rephrase_images = [
            _image(im, field=f"rephrase_images[{i}]") for i, im in enumerate(self.rephrase_images)
        ]
        for name in PROBE_FIELDS:
            probes = getattr(self, name)
            if not isinstance(probes, list):
                raise InvalidRequestError(f"{name} must be a list of Probe", field=name)
            fixed = []
            for i, p in enumerate(probes):
                if isinstance(p, dict):
                    try:
                        p = Probe(**p)
                    except TypeError as exc:
                        raise InvalidRequestError(f"{name}[{i}]: {exc}", field=name) from None
                if not isinstance(p, Probe):
                    raise InvalidRequestError(f"{name}[{i}] must be a Probe or dict", field=name)
                if not isinstance(p.prompt, str) or not p.prompt.strip():
                    raise InvalidRequestError(f"{name}[{i}].prompt must be a non-empty string", field=name)
                if not isinstance(p.answer, str) or not p.answer.strip():
                    raise InvalidRequestError(f"{name}[{i}].answer must be a non-empty string", field=name)
                if not isinstance(p.kind, str):
                    raise InvalidRequestError(f"{name}[{i}].kind must be a string", field=name)
                if p.image is not None:
                    p.image = _image(p.image, field=f"{name}[{i}].image")
                fixed.append(p)
            setattr(self, name, fixed)
        if tokenizer is not None:
            ids = tokenizer(" " + self.target.strip(), add_special_tokens=False)["input_ids"]
            if len(ids) == 0:
                raise InvalidRequestError(
                    f"target {self.target!r} tokenizes to nothing with this tokenizer", field="target"
                )
        return self

    @property
    def needs_image(self) -> bool:
        return self.image is not None

    def without_probes(self) -> "EditRequest":
        """The edit alone (image, prompt, target, ground truth, subject, relation): what an editor may see
        when the request's probes are kept for evaluation."""
        return EditRequest(prompt=self.prompt, target=self.target, image=self.image, ground_truth=self.ground_truth,
                           subject=self.subject, relation=self.relation)

    def fingerprint(self) -> str:
        """A short stable id of the edit (prompt, target, image bytes) for reports and model cards."""
        h = hashlib.sha256()
        h.update(self.prompt.encode())
        h.update(b"\0")
        h.update(self.target.encode())
        if self.image is not None:
            h.update(image_fingerprint(load_image(self.image)).encode())
        return h.hexdigest()[:16]

    def to_dict(self, image_root: str | None = None) -> dict[str, Any]:
        """JSON-ready dict (our JSONL format). Images are written as paths when they are paths.

        With ``image_root``, paths are written relative to it.
        """
        return {
            "prompt": self.prompt,
            "target": self.target,
            "image": _image_ref(self.image, image_root),
            "ground_truth": self.ground_truth,
            "rephrase_prompts": list(self.rephrase_prompts),
            "rephrase_images": [_image_ref(im, image_root) for im in self.rephrase_images],
            "locality": [p.to_dict(image_root) for p in self.locality],
            "m_locality": [p.to_dict(image_root) for p in self.m_locality],
            "coupled": [p.to_dict(image_root) for p in self.coupled],
            "portability": [p.to_dict(image_root) for p in self.portability],
            "subject": self.subject,
            "relation": self.relation,
        }


def _image_ref(image: ImageLike | None, image_root: str | None) -> Any:
    if image is None:
        return None
    if isinstance(image, (str, os.PathLike)):
        return _relative(os.fspath(image), image_root)
    fn = getattr(image, "filename", "")
    if fn:
        return _relative(fn, image_root)
    return f"<PIL {image.size[0]}x{image.size[1]} sha={image_fingerprint(image)}>"


def _relative(path: str, image_root: str | None) -> str:
    if image_root is None:
        return path
    return os.path.relpath(os.path.abspath(path), os.path.abspath(image_root))


def image_fingerprint(image: Image.Image) -> str:
    """sha256 (first 12 hex chars) of the RGB pixels: identifies an image independent of its file."""
    img = image.convert("RGB")
    h = hashlib.sha256()
    h.update(f"{img.size}".encode())
    h.update(img.tobytes())
    return h.hexdigest()[:12]


def load_image(image: Any, field: str = "image") -> Image.Image:
    """Open/convert an image to RGB, with a clear :class:`ImageError` for every way it can be wrong."""
    if isinstance(image, (str, os.PathLike)):
        path = _check_path(image, field)
        try:
            with Image.open(path) as im:
                _check_size(im, field, path)
                im.load()
                out = im.convert("RGB")
        except ImageError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageError(f"{field}: cannot read image {path}: {exc}", field=field) from None
        out.filename = path  # keep the reference for reports
        return out
    if isinstance(image, Image.Image):
        _check_size(image, field, "<PIL image>")
        if image.mode == "RGB":
            return image
        try:
            out = image.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for odd modes
            raise ImageError(f"{field}: cannot convert image of mode {image.mode} to RGB: {exc}", field=field) from None
        if getattr(image, "filename", ""):
            out.filename = image.filename
        return out
    if image is None:
        raise ImageError(f"{field}: image is missing (None)", field=field)
    raise ImageError(
        f"{field}: expected a PIL image or a file path, got {type(image).__name__}", field=field
    )


def check_image_file(path: str | os.PathLike, field: str = "image") -> str:
    """Check that ``path`` is a readable image of a sane size without decoding its pixels.

    Reads only the header (cheap), so a loader can check thousands of records up front. Returns the
    path as a string; raises :class:`ImageError` naming ``field`` otherwise. A file whose header is
    fine but whose pixel data is truncated is caught later, by :func:`load_image`.
    """
    path = _check_path(path, field)
    try:
        with Image.open(path) as im:
            _check_size(im, field, path)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{field}: cannot read image {path}: {exc}", field=field) from None
    return path


def _check_image(image: Any, field: str = "image") -> ImageLike:
    """``open_images=False`` variant of :func:`load_image`: paths are checked and kept as paths."""
    if isinstance(image, (str, os.PathLike)):
        return check_image_file(image, field)
    return load_image(image, field)


def _check_path(image: str | os.PathLike, field: str) -> str:
    try:
        path = os.fspath(image)
    except TypeError:
        raise ImageError(f"{field}: expected a PIL image or a file path, got {type(image).__name__}", field=field) from None
    if not isinstance(path, str):
        path = os.fsdecode(path)
    if not path or not os.path.exists(path):
        raise ImageError(f"{field}: image file not found: {path!r}", field=field)
    if os.path.isdir(path):
        raise ImageError(f"{field}: expected an image file, got a directory: {path}", field=field)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise ImageError(f"{field}: cannot stat image {path}: {exc}", field=field) from None
    if size == 0:
        raise ImageError(f"{field}: image file is empty (0 bytes): {path}", field=field)
    return path


def _check_size(im: Image.Image, field: str, where: str) -> None:
    w, h = im.size
    if w == 0 or h == 0:
        raise ImageError(f"{field}: image {where} has zero size {w}x{h}", field=field)
    if max(w, h) > MAX_IMAGE_SIDE:
        raise ImageError(
            f"{field}: image {where} is {w}x{h}, larger than the {MAX_IMAGE_SIDE}px limit; downscale it first",
            field=field,
        )


# ---------------------------------------------------------------------- errors with a record index


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
    """Read a negatives file (JSONL) into an :class:`~ldke_peft.scope.NegativePool`.

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
    from .scope import NegativePool

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
    """Write a :class:`~ldke_peft.scope.NegativePool` as a negatives file (:func:`load_negatives` reads it
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


# ---------------------------------------------------------------------- EasyEdit

#: Keys of an EasyEdit multimodal (VQA / caption) dataset record.
EASYEDIT_RECORD_KEYS = ("src", "pred", "alt", "rephrase", "image", "image_rephrase", "loc", "loc_ans", "m_loc", "m_loc_q", "m_loc_a")


def _text(rec: Mapping, key: str, index: int | None, *, required: bool, allow_list: bool = False) -> str | None:
    """A non-empty string field; a list (when allowed) contributes its first element."""
    if key not in rec or rec[key] is None:
        if required:
            raise _bad(index, key, "missing required field")
        return None
    value = rec[key]
    if allow_list and isinstance(value, (list, tuple)):
        if not value:
            raise _bad(index, key, "is an empty list; expected a non-empty string (or list of them)")
        value = value[0]
    if not isinstance(value, str):
        raise _bad(index, key, f"must be a string{' or a list of strings' if allow_list else ''}, got {type(value).__name__}")
    if not value.strip():
        raise _bad(index, key, "is empty")
    return value


def _texts(rec: Mapping, key: str, index: int | None) -> list[str]:
    """A string or list of strings -> list of non-empty strings (absent -> [])."""
    if key not in rec or rec[key] is None:
        return []
    value = rec[key]
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)):
        raise _bad(index, key, f"must be a string or a list of strings, got {type(value).__name__}")
    for v in values:
        if not isinstance(v, str):
            raise _bad(index, key, f"must contain strings, got {type(v).__name__}")
        if not v.strip():
            raise _bad(index, key, "contains an empty string")
    return list(values)


def _group(rec: Mapping, keys: tuple[str, ...], index: int | None) -> bool:
    """All of ``keys`` present (True), none present (False), or an error naming the missing one."""
    present = [k for k in keys if rec.get(k) is not None]
    if not present:
        return False
    missing = [k for k in keys if rec.get(k) is None]
    if missing:
        raise _bad(index, missing[0], f"missing: {', '.join(keys)} must be given together (got {', '.join(present)})")
    return True


def _one_image(value: Any, key: str, index: int | None, root: str | None, open_images: bool) -> ImageLike:
    """One image (PIL or path, or a one-element list of it), resolved and checked."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise _bad(
                index, key,
                f"got a list of {len(value)} images; only single-image records are supported "
                "(EasyEdit's multi-image/video records are not)", ImageError,
            )
        value = value[0]
    return _checked_image(value, key, index, root, open_images)


def _checked_image(value: Any, key: str, index: int | None, root: str | None, open_images: bool) -> ImageLike:
    if isinstance(value, str) and not value.strip():
        raise _bad(index, key, "image path is empty", ImageError)
    value = _resolve(value, root)
    try:
        return load_image(value, field=key) if open_images else _check_image(value, field=key)
    except InvalidRequestError as exc:
        raise (_at_index(exc, index) if index is not None else exc) from None


def parse_easyedit_record(
    record: Any,
    image_root: str | os.PathLike | None,
    rephrase_image_root: str | os.PathLike | None = None,
    *,
    index: int | None = None,
    open_images: bool = False,
) -> EditRequest:
    """One EasyEdit VQA/caption dataset record -> :class:`EditRequest`.

    Mapping (as upstream ``VQADataset``/``CaptionDataset`` read it): ``src`` -> prompt, ``alt`` ->
    target, ``pred`` -> ground_truth, ``rephrase`` -> rephrase_prompts, ``image`` (under
    ``image_root``) -> image, ``image_rephrase`` (under ``rephrase_image_root``, default
    ``image_root``; upstream's ``rephrase_image`` hparam) -> rephrase_images, ``loc``/``loc_ans`` ->
    a text-only locality probe, ``m_loc`` (under ``image_root``) / ``m_loc_q`` / ``m_loc_a`` -> a
    multimodal locality probe. ``pred`` and ``alt`` may be strings or lists (first element used);
    ``rephrase``/``image_rephrase`` may be lists. ``src``, ``alt`` and ``image`` are required;
    ``loc``+``loc_ans`` and ``m_loc``+``m_loc_q``+``m_loc_a`` are optional groups (all or none).
    Other keys are ignored. Upstream silently drops records with an empty string anywhere; here
    they raise (see ``skip_invalid`` of :func:`load_easyedit`).
    """
    if not isinstance(record, Mapping):
        raise _bad(index, None, f"expected a JSON object, got {type(record).__name__}")
    root = None if image_root is None else os.fspath(image_root)
    rroot = root if rephrase_image_root is None else os.fspath(rephrase_image_root)
    prompt = _text(record, "src", index, required=True)
    target = _text(record, "alt", index, required=True, allow_list=True)
    ground_truth = _text(record, "pred", index, required=False, allow_list=True)
    rephrases = _texts(record, "rephrase", index)
    if record.get("image") is None:
        raise _bad(index, "image", "missing required field", ImageError)
    image = _one_image(record["image"], "image", index, root, open_images)
    rephrase_images: list[ImageLike] = []
    if record.get("image_rephrase") is not None:
        value = record["image_rephrase"]
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise _bad(index, "image_rephrase", "is an empty list", ImageError)
        rephrase_images = [_checked_image(v, "image_rephrase", index, rroot, open_images) for v in values]
    locality, m_locality = [], []
    if _group(record, ("loc", "loc_ans"), index):
        locality.append(Probe(
            prompt=_text(record, "loc", index, required=True),
            answer=_text(record, "loc_ans", index, required=True, allow_list=True),
            kind="easyedit_loc",
        ))
    if _group(record, ("m_loc", "m_loc_q", "m_loc_a"), index):
        m_locality.append(Probe(
            prompt=_text(record, "m_loc_q", index, required=True),
            answer=_text(record, "m_loc_a", index, required=True, allow_list=True),
            image=_one_image(record["m_loc"], "m_loc", index, root, open_images),
            kind="easyedit_m_loc",
        ))
    request = EditRequest(
        prompt=prompt, target=target, image=image, ground_truth=ground_truth,
        rephrase_prompts=rephrases, rephrase_images=rephrase_images,
        locality=locality, m_locality=m_locality,
    )
    try:
        return request.validate(open_images=open_images)
    except InvalidRequestError as exc:  # pragma: no cover - the checks above cover every field
        raise (exc if index is None else _at_index(exc, index)) from None


def load_easyedit(
    path: str | os.PathLike,
    image_root: str | os.PathLike,
    rephrase_image_root: str | os.PathLike | None = None,
    *,
    skip_invalid: bool = False,
    open_images: bool = False,
) -> list[EditRequest]:
    """Load an EasyEdit multimodal dataset file (E-VQA / E-IC JSON: a list of records).

    See :func:`parse_easyedit_record` for the field mapping. ``image_root`` is upstream's
    ``coco_image`` hparam, ``rephrase_image_root`` its ``rephrase_image`` (default: ``image_root``).
    With ``skip_invalid=True`` malformed records are logged and skipped (upstream's behaviour for
    "dirty" records) instead of raising; the index in the log is the record's position in the file.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as fh:
        try:
            records = json.load(fh)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{path} is not valid JSON: {exc}", field=None) from None
    if isinstance(records, Mapping):
        records = [records]
    if not isinstance(records, list):
        raise InvalidRequestError(f"{path}: expected a JSON list of records, got {type(records).__name__}", field=None)
    out = []
    for i, rec in enumerate(records):
        try:
            out.append(parse_easyedit_record(rec, image_root, rephrase_image_root, index=i, open_images=open_images))
        except InvalidRequestError as exc:
            if not skip_invalid:
                exc.args = (f"{exc} (in {path})",)
                raise
            logger.warning("skipping EasyEdit record %d of %s: %s", i, path, exc)
    if skip_invalid and len(out) < len(records):
        logger.warning("loaded %d of %d EasyEdit records from %s", len(out), len(records), path)
    return out


#: Request-dict keys EasyEdit's ``MultimodalEditor`` passes to an editing method.
EASYEDIT_REQUEST_KEYS = (
    "prompt", "target", "image", "rephrase_prompt", "image_rephrase", "locality_prompt", "locality_ground_truth",
    "multimodal_locality_image", "multimodal_locality_prompt", "multimodal_locality_ground_truth",
)


def requests_from_easyedit_dicts(
    dicts: Any,
    *,
    image_root: str | os.PathLike | None = None,
    open_images: bool = True,
) -> list[EditRequest]:
    """EasyEdit editor-style request dicts -> :class:`EditRequest` objects.

    ``dicts`` is a list of dicts (EasyEdit's single/dataset mode) or one bare dict (sequential mode).
    Fields: ``prompt``, ``target`` (required), ``image`` (required: a PIL image, a one-element list of
    them as EasyEdit's processors return, or a path, resolved against ``image_root``),
    ``rephrase_prompt`` (str or list), ``image_rephrase`` (image or list: each is one extra view),
    ``locality_prompt`` + ``locality_ground_truth``, ``multimodal_locality_image`` +
    ``multimodal_locality_prompt`` + ``multimodal_locality_ground_truth`` (groups: all or none),
    ``pred`` (-> ground_truth). ``file_type`` other than ``image``/``single-image`` is refused. Other
    keys (``cond``, ``loc_prompt``, ...) are ignored.
    """
    if isinstance(dicts, Mapping):
        dicts = [dicts]
    if not isinstance(dicts, (list, tuple)):
        raise InvalidRequestError(
            f"expected a list of EasyEdit request dicts (or one dict), got {type(dicts).__name__}", field=None
        )
    root = None if image_root is None else os.fspath(image_root)
    out = []
    for i, d in enumerate(dicts):
        if not isinstance(d, Mapping):
            raise _bad(i, None, f"expected a dict, got {type(d).__name__}")
        file_type = d.get("file_type")
        if file_type is not None and file_type not in ("image", "single-image"):
            raise _bad(i, "file_type", f"{_short(file_type)} is not supported; only single-image requests are")
        prompt = _text(d, "prompt", i, required=True)
        target = _text(d, "target", i, required=True, allow_list=True)
        ground_truth = _text(d, "pred", i, required=False, allow_list=True)
        rephrases = _texts(d, "rephrase_prompt", i)
        if d.get("image") is None:
            raise _bad(i, "image", "missing required field", ImageError)
        image = _one_image(d["image"], "image", i, root, open_images)
        rephrase_images = []
        if d.get("image_rephrase") is not None:
            value = d["image_rephrase"]
            values = value if isinstance(value, (list, tuple)) else [value]
            rephrase_images = [_checked_image(v, "image_rephrase", i, root, open_images) for v in values]
        locality, m_locality = [], []
        if _group(d, ("locality_prompt", "locality_ground_truth"), i):
            locality.append(Probe(
                prompt=_text(d, "locality_prompt", i, required=True),
                answer=_text(d, "locality_ground_truth", i, required=True, allow_list=True),
                kind="easyedit_loc",
            ))
        keys = ("multimodal_locality_image", "multimodal_locality_prompt", "multimodal_locality_ground_truth")
        if _group(d, keys, i):
            m_locality.append(Probe(
                prompt=_text(d, "multimodal_locality_prompt", i, required=True),
                answer=_text(d, "multimodal_locality_ground_truth", i, required=True, allow_list=True),
                image=_one_image(d["multimodal_locality_image"], "multimodal_locality_image", i, root, open_images),
                kind="easyedit_m_loc",
            ))
        request = EditRequest(
            prompt=prompt, target=target, image=image, ground_truth=ground_truth,
            rephrase_prompts=rephrases, rephrase_images=rephrase_images, locality=locality, m_locality=m_locality,
        )
        try:
            out.append(request.validate(open_images=open_images))
        except InvalidRequestError as exc:  # pragma: no cover - the checks above cover every field
            raise _at_index(exc, i) from None
    return out
