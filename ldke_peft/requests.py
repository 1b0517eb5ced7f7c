"""Edit requests: what a user asks to change, and every probe used to check the change.

An :class:`EditRequest` is the unit the editor, the metrics and the loaders share. Validation happens
here, before any model is touched, so a bad request can never leave a model half-edited.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Union

from PIL import Image, UnidentifiedImageError

from .errors import ImageError, InvalidRequestError

ImageLike = Union[Image.Image, str, os.PathLike]

#: Largest image side we accept (pixels). Larger inputs are almost always a mistake (a raw scan, a
#: decompression bomb) and would only be downscaled by the processor anyway.
MAX_IMAGE_SIDE = 8192


@dataclass
class Probe:
    """One evaluation question: an optional image, a prompt and the answer expected from it.

    For locality probes ``answer`` is the *original* model's answer (or ground truth); for generality
    and portability probes it is the answer expected *after* the edit.
    """

    prompt: str
    answer: str
    image: ImageLike | None = None
    kind: str = ""

    def to_dict(self, image_root: str | None = None) -> dict[str, Any]:
        return {"prompt": self.prompt, "answer": self.answer, "image": _image_ref(self.image, image_root), "kind": self.kind}


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
    def validate(self, tokenizer: Any | None = None) -> "EditRequest":
        """Check every field; return ``self`` with images opened and converted to RGB.

        Raises :class:`InvalidRequestError` (or :class:`ImageError`) naming the field. When a tokenizer
        is given, also checks that the target tokenizes to at least one token.
        """
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidRequestError("EditRequest.prompt must be a non-empty string", field="prompt")
        if not isinstance(self.target, str) or not self.target.strip():
            raise InvalidRequestError(
                f"EditRequest.target must be a non-empty string, got {self.target!r}", field="target"
            )
        if self.image is not None:
            self.image = load_image(self.image, field="image")
        if isinstance(self.rephrase_prompts, str):
            self.rephrase_prompts = [self.rephrase_prompts]
        if not isinstance(self.rephrase_prompts, list) or not all(
            isinstance(p, str) and p.strip() for p in self.rephrase_prompts
        ):
            raise InvalidRequestError("rephrase_prompts must be a list of non-empty strings", field="rephrase_prompts")
        if not isinstance(self.rephrase_images, (list, tuple)):
            self.rephrase_images = [self.rephrase_images]
        self.rephrase_images = [
            load_image(im, field=f"rephrase_images[{i}]") for i, im in enumerate(self.rephrase_images)
        ]
        for name in ("locality", "m_locality", "coupled", "portability"):
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
                if p.image is not None:
                    p.image = load_image(p.image, field=f"{name}[{i}].image")
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
        """JSON-ready dict (our JSONL format). Images are written as paths when they are paths."""
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
        return os.fspath(image)
    fn = getattr(image, "filename", "")
    if fn:
        return fn
    return f"<PIL {image.size[0]}x{image.size[1]} sha={image_fingerprint(image)}>"


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
        path = os.fspath(image)
        if not os.path.exists(path):
            raise ImageError(f"{field}: image file not found: {path}", field=field)
        if os.path.isdir(path):
            raise ImageError(f"{field}: expected an image file, got a directory: {path}", field=field)
        if os.path.getsize(path) == 0:
            raise ImageError(f"{field}: image file is empty (0 bytes): {path}", field=field)
        try:
            with Image.open(path) as im:
                _check_size(im, field, path)
                im.load()
                out = im.convert("RGB")
        except ImageError:
            raise
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
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


def _check_size(im: Image.Image, field: str, where: str) -> None:
    w, h = im.size
    if w == 0 or h == 0:
        raise ImageError(f"{field}: image {where} has zero size {w}x{h}", field=field)
    if max(w, h) > MAX_IMAGE_SIDE:
        raise ImageError(
            f"{field}: image {where} is {w}x{h}, larger than the {MAX_IMAGE_SIDE}px limit; downscale it first",
            field=field,
        )
