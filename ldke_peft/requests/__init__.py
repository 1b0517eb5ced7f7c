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

Layer: data (README "Architecture"): imports only other data modules.
"""

from __future__ import annotations

from .easyedit import EASYEDIT_RECORD_KEYS, EASYEDIT_REQUEST_KEYS, load_easyedit, parse_easyedit_record, requests_from_easyedit_dicts
from .images import MAX_IMAGE_SIDE, ImageLike, check_image_file, image_fingerprint, load_image
from .jsonl import load_jsonl, load_negatives, save_jsonl, save_negatives
from .types import PROBE_FIELDS, EditRequest, NegativePool, Probe
from .validation import parse_request, validate_requests

__all__ = [
    "NegativePool",
    "EASYEDIT_RECORD_KEYS",
    "EASYEDIT_REQUEST_KEYS",
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
