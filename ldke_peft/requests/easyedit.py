"""EasyEdit's formats: its multimodal dataset JSON (``VQADataset``/``CaptionDataset``) and the request
dicts its ``MultimodalEditor`` hands to an editing method.

Layer: data (README "Architecture"): imports only other data modules.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any


from ..errors import ImageError, InvalidRequestError
from .images import ImageLike, _check_image, load_image
from .records import _at_index, _bad, _short
from .types import EditRequest, Probe
from .validation import _resolve

logger = logging.getLogger(__name__)

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


def _fact(rec: Mapping, keys: tuple[str, str, str], index: int | None, root: str | None,
          open_images: bool) -> tuple[str, str, str | None, list[str], ImageLike]:
    """``(prompt, target, ground truth, rephrasings, image)`` of a record, from its ``(prompt, target,
    rephrase)`` keys; the ground truth is ``pred`` and the image ``image`` in both EasyEdit formats."""
    prompt = _text(rec, keys[0], index, required=True)
    target = _text(rec, keys[1], index, required=True, allow_list=True)
    ground_truth = _text(rec, "pred", index, required=False, allow_list=True)
    rephrases = _texts(rec, keys[2], index)
    if rec.get("image") is None:
        raise _bad(index, "image", "missing required field", ImageError)
    return prompt, target, ground_truth, rephrases, _one_image(rec["image"], "image", index, root, open_images)


def _locality_probes(rec: Mapping, keys: tuple[str, str], index: int | None) -> list[Probe]:
    """The text locality probe of a record, from its ``(prompt, answer)`` keys (none when both are absent)."""
    if not _group(rec, keys, index):
        return []
    return [Probe(prompt=_text(rec, keys[0], index, required=True),
                  answer=_text(rec, keys[1], index, required=True, allow_list=True), kind="easyedit_loc")]


def _m_locality_probes(rec: Mapping, keys: tuple[str, str, str], index: int | None, root: str | None,
                       open_images: bool) -> list[Probe]:
    """The multimodal locality probe of a record, from its ``(image, prompt, answer)`` keys."""
    if not _group(rec, keys, index):
        return []
    return [Probe(prompt=_text(rec, keys[1], index, required=True),
                  answer=_text(rec, keys[2], index, required=True, allow_list=True),
                  image=_one_image(rec[keys[0]], keys[0], index, root, open_images), kind="easyedit_m_loc")]


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
    prompt, target, ground_truth, rephrases, image = _fact(record, ("src", "alt", "rephrase"), index, root, open_images)
    rephrase_images: list[ImageLike] = []
    if record.get("image_rephrase") is not None:
        value = record["image_rephrase"]
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise _bad(index, "image_rephrase", "is an empty list", ImageError)
        rephrase_images = [_checked_image(v, "image_rephrase", index, rroot, open_images) for v in values]
    locality = _locality_probes(record, ("loc", "loc_ans"), index)
    m_locality = _m_locality_probes(record, ("m_loc", "m_loc_q", "m_loc_a"), index, root, open_images)
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
        prompt, target, ground_truth, rephrases, image = _fact(d, ("prompt", "target", "rephrase_prompt"), i, root,
                                                               open_images)
        rephrase_images = []
        if d.get("image_rephrase") is not None:
            value = d["image_rephrase"]
            values = value if isinstance(value, (list, tuple)) else [value]
            rephrase_images = [_checked_image(v, "image_rephrase", i, root, open_images) for v in values]
        locality = _locality_probes(d, ("locality_prompt", "locality_ground_truth"), i)
        m_locality = _m_locality_probes(
            d, ("multimodal_locality_image", "multimodal_locality_prompt", "multimodal_locality_ground_truth"), i,
            root, open_images)
        request = EditRequest(
            prompt=prompt, target=target, image=image, ground_truth=ground_truth,
            rephrase_prompts=rephrases, rephrase_images=rephrase_images, locality=locality, m_locality=m_locality,
        )
        try:
            out.append(request.validate(open_images=open_images))
        except InvalidRequestError as exc:  # pragma: no cover - the checks above cover every field
            raise _at_index(exc, i) from None
    return out
