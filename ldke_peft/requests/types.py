"""The request types: :class:`EditRequest` (one fact to change) and :class:`Probe` (one question to
check it with), with their own validation and their dict form, and :class:`NegativePool` (the caller's
material for hard negatives).

Owns: the fields and their meaning. Must not import the loaders (they import it).

Layer: data (README "Architecture"): imports only other data modules.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


from ..errors import InvalidRequestError
from .images import ImageLike, _check_image, _image_ref, image_fingerprint, load_image
from .records import _short


#: Probe lists of an :class:`EditRequest`, in a fixed order (``consequences`` are edit material, the others
#: are evaluated).
PROBE_FIELDS = ("locality", "m_locality", "coupled", "portability", "consequences")


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
        portability: related questions whose answer must follow from the new fact (evaluated only).
        consequences: what follows from the new fact, stated by the caller and fitted with the edit:
            questions about the edit's own image (``image`` must be ``None``) with the answer each must
            give after the edit ("In which city was this building's architect born?" -> "Reus" after
            ``architect := Antoni Gaudi``). The edit takes them in its scope, other wordings of them included.
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
    consequences: list[Probe] = field(default_factory=list)
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
                if p.image is not None and name == "consequences":
                    raise InvalidRequestError(
                        f"consequences[{i}].image must be None: a consequence is asked about the edit's own image",
                        field=name)
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
        """The edit alone (image, prompt, target, ground truth, consequences, subject, relation): what an
        editor may see when the request's probes are kept for evaluation."""
        return EditRequest(prompt=self.prompt, target=self.target, image=self.image, ground_truth=self.ground_truth,
                           consequences=list(self.consequences), subject=self.subject, relation=self.relation)

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
        out = {
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
        if self.consequences:  # only when given: files without them stay readable by older versions
            out["consequences"] = [p.to_dict(image_root) for p in self.consequences]
        return out


@dataclass
class NegativePool:
    """Material for hard negatives beyond what each request carries.

    ``questions``: ``(question, relation)`` pairs — a bank of questions the model is asked about
    images (same image + another question must not route). ``images``: ``(image, entity)`` pairs —
    other entities' images (same question + another image must not route).
    """

    questions: list[tuple[str, str | None]] = field(default_factory=list)
    images: list[tuple[Any, str | None]] = field(default_factory=list)
    #: router features of the pool's rows, per model state (the same pool serves every edit)
    _features: dict = field(default_factory=dict, init=False, repr=False, compare=False)
