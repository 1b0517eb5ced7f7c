"""``LDKEConfig``: the PEFT config of an LDKE edit pack.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from peft.config import PeftConfig
from peft.utils import CONFIG_NAME

from ..errors import AdapterLoadError, UnsafeAdapterError
from .pack_meta import has_edits_file, write_edits
from .peft_type import LDKEPeftType
from .load_check import install_generic_loader_check
from .question_key import DEFAULT_TEXT_ENCODER

#: Format version of the saved pack. Bumped on incompatible changes; a pack with a newer major
#: version than this library understands is refused with a clear error.
PACK_FORMAT_VERSION = "1.9"
#: Subject corruptions Fast Localization and exact tracing know (``LDKEConfig.corruption``).
CORRUPTIONS = ("mean", "noise")
#: Format 1.1 added ``router_storage``; packs of format 1.0 stored their router projections in fp32.
_FORMAT_WITHOUT_ROUTER_STORAGE = ("1.0",)
#: Format 1.2 added the sentence-encoder textual key; older packs route on probe-layer text features.
_FORMAT_WITHOUT_TEXT_ENCODER = ("1.0", "1.1")
#: Format 1.3 added ``delta_storage``; older packs stored the slot factors in fp32.
_FORMAT_WITHOUT_DELTA_STORAGE = ("1.0", "1.1", "1.2")
#: Format 1.4 moved the per-edit metadata (``edits``) out of ``adapter_config.json`` into its own file
#: (:mod:`ldke_peft.tuner.pack_meta`).
#: Format 1.5 added the fit options ``edit_fit_stages`` and ``edit_fit_dtype`` (they act when an edit is made;
#: a 1.4 pack grown with new edits fits them with the defaults).
#: Format 1.6 added ``delta_bank_wordings``; an older pack grown with new edits fits them as it was made.
_FORMAT_WITHOUT_BANK_WORDINGS = ("1.0", "1.1", "1.2", "1.3", "1.4", "1.5")
#: Format 1.7 added ``router_neighbour_questions`` and the textual anchors; an older pack grown with new edits
#: fits them without anchors, as it was made.
_FORMAT_WITHOUT_NEIGHBOURS = _FORMAT_WITHOUT_BANK_WORDINGS + ("1.6",)
#: Format 1.8 added ``router_anchor_clearance``; an older pack grown with new edits keeps every anchor, as it was made.
_FORMAT_WITHOUT_CLEARANCE = _FORMAT_WITHOUT_NEIGHBOURS + ("1.7",)
#: Format 1.9 added ``router_asked_word`` (each slot's asked-for word, kept in its edit metadata); an older pack grown
#: with new edits vetoes as it was made.
_FORMAT_WITHOUT_ASKED_WORD = _FORMAT_WITHOUT_CLEARANCE + ("1.8",)
#: How a pack may store its slot factors (``LDKEConfig.delta_storage``).
DELTA_STORAGE = ("float16", "float32")
#: Precisions the delta fit's steps may run in (``LDKEConfig.edit_fit_dtype``).
FIT_DTYPES = ("auto", "bfloat16", "float32")


@dataclass
class LDKEConfig(PeftConfig):
    """Configuration of an LDKE adapter ("edit pack").

    An edit pack holds ``K`` edit slots. Slot ``k`` owns a rank-``rank`` delta on the MLP output
    projection of each decoder layer in ``slot_layers[k]`` (chosen by Fast Localization) and a routing
    key in the pack's Disentanglement Classifier, which lives on the ``probe_layer`` (below every edited
    layer). The adapter's target modules are the union of the slots' layers plus the probe layer.

    Most users never build this by hand: :func:`ldke_peft.edit` creates it from the model's family
    defaults and the localization results.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Full module names of the MLP output projections LDKE wraps (edited layers + probe layer). "
            "Filled from the model family and `layers_to_transform` when None."
        },
    )
    layers_to_transform: Optional[list[int]] = field(
        default=None,
        metadata={"help": "Decoder-layer indices wrapped by the pack (union of the slots' layers and the probe layer)."},
    )
    layers_pattern: Optional[str] = field(
        default=None,
        metadata={"help": "Dotted path of the language model's decoder ModuleList (from the model family)."},
    )
    rank: int = field(default=4, metadata={"help": "Rank of each slot's low-rank delta."})
    alpha: float = field(default=4.0, metadata={"help": "Delta scaling numerator: delta = (alpha / rank) * B(A(x))."})
    probe_layer: Optional[int] = field(
        default=None,
        metadata={
            "help": "Decoder layer whose output hidden states the router reads. Must be below every edited layer, "
            "so routing happens before any edited weight runs. Default: the family's choice (about L/8, >= 1)."
        },
    )
    slot_layers: list[list[int]] = field(
        default_factory=list, metadata={"help": "Per edit slot, the decoder layers whose MLP output it edits."}
    )
    num_slots: int = field(default=0, metadata={"help": "Number of edit slots; must equal len(slot_layers)."})
    router_dim: int = field(default=32, metadata={"help": "Width of the router's learned projection (per pack)."})
    router_storage: str = field(
        default="int8",
        metadata={
            "help": "How the router projections are stored: 'int8' (per-column scales; 4x smaller, most of a "
            "single-edit pack's bytes) or 'float32'. Exact either way: keys and radii are fitted against the "
            "stored projection, and routing uses exactly that."
        },
    )
    delta_storage: str = field(
        default="float16",
        metadata={
            "help": "How each slot's low-rank factors are stored: 'float16' (half the bytes of the delta) or "
            "'float32'. Exact either way: with 'float16' the fit ends by rounding the factors to float16 and "
            "checks the edit on them, so what was checked is what is saved and what runs."
        },
    )
    router_groups: int = field(
        default=1,
        metadata={
            "help": "Number of router projections. 1 for a pack made by edit(); a pack merged from packs fitted "
            "separately keeps each source's projection (ldke_peft.merge.merge_packs) and records how many here."
        },
    )
    router_neighbour_questions: int = field(
        default=8,
        metadata={
            "help": "Questions the edited model proposes per edit by swapping the word the edit question asks about "
            "(0 = none). With them each slot keeps textual anchors, and a question inside the textual radius whose "
            "nearest anchor is out of scope (a proposed neighbour or another question on the same image) does not "
            "route: questions about a neighbouring fact stay out that no radius can keep out without losing the "
            "edit's farthest rewordings. Costs a few seconds per edit and a few KB per slot."
        },
    )
    router_anchor_clearance: float = field(
        default=0.85,
        metadata={"help": "For an edit whose only in-scope wordings are rewrites of its question (no rephrase_prompts, "
                  "no labelled wording in the negatives): no out-of-scope anchor nearer the key than this fraction of "
                  "its farthest in-scope anchor is kept (they veto the edit's other wordings). 0 = keep them all."},
    )
    router_asked_word: bool = field(
        default=True,
        metadata={"help": "Record the word each edit question asks about (the word whose removal moves its sentence "
                  "embedding most, as the proposed neighbours swap it) and let only out-of-scope anchors that name it "
                  "too veto a question that names it: the proposed neighbours swap that word out, so a question that "
                  "keeps it is a wording of the edit, not a neighbour. The caller's out-of-scope questions naming the "
                  "word still veto. Needs router_neighbour_questions > 0."},
    )
    router_text_anchors: int = field(
        default=0,
        metadata={
            "help": "Number of textual anchor rows the pack's router holds (set by edit() when "
            "router_neighbour_questions > 0; read by the loader)."
        },
    )
    router_margin: float = field(
        default=0.5,
        metadata={
            "help": "Radius placement between the farthest positive (0.0) and the nearest negative (1.0); "
            "0.5 = midpoint."
        },
    )
    router_text_margin: Optional[float] = field(
        default=None,
        metadata={
            "help": "router_margin for the textual part alone (None = router_margin). A sentence-encoder key puts "
            "other questions on the same topic (asking another fact) between the edit's rephrasings and the "
            "caller's negatives: a smaller value keeps more of them out, at the cost of the rephrasings farthest "
            "from the edit question."
        },
    )
    auto_views: int = field(
        default=4,
        metadata={
            "help": "Augmented views of the edit image (crops, shifts, small rotations, colour jitter, flips) "
            "the delta is fitted on when a request brings fewer rephrase images: the delta then answers for "
            "other pictures of the entity, not for one picture (M-Generality), at some edit time."
        },
    )
    router_views: int = field(
        default=1,
        metadata={
            "help": "Augmented (never mirrored) views of the edit image among the router's visual positives. Fewer "
            "than auto_views on purpose: each one widens the slot's visual radius, and in a pack of many slots "
            "wide radii add up to other entities' images (M-Locality)."
        },
    )
    router_paraphrases: int = field(
        default=6,
        metadata={
            "help": "Rule-based rephrasings of each edit question added to the router's textual positives "
            "(0 = only the request's own wordings). They widen the edit's scope to other ways of asking "
            "the same question (T-Generality); the delta itself is fitted on the request's wordings."
        },
    )
    router_text_encoder: Optional[str] = field(
        default=DEFAULT_TEXT_ENCODER,
        metadata={
            "help": "Sentence encoder whose embedding of the question is the router's textual key (a Hub id "
            "resolved offline, a package-bundled model or a local folder). It reads what a question asks, "
            "however it is worded; None = pool the probe layer's hidden states instead (wording-bound: the "
            "layers below every edited layer carry wording more than meaning)."
        },
    )
    router_text_probe: bool = field(
        default=True,
        metadata={
            "help": "With a router_text_encoder: the textual feature is [the probe layer's pooled text features ; the "
            "encoder's embedding]. The encoder reads what a question asks however it is worded; the model's own "
            "early layers tell apart questions the model itself learned as different."
        },
    )
    router_text_dim: int = field(
        default=0, metadata={"help": "Width of the sentence encoder's embedding (filled by the editor; 0 without an encoder)."}
    )
    router_text_frame: list[str] = field(
        default_factory=list,
        metadata={
            "help": "[prefix, suffix] the model's chat template puts around a question (recorded by the editor); "
            "stripped from the decoded prompt before the encoder reads it."
        },
    )
    router_pack_guard: bool = field(
        default=True,
        metadata={
            "help": "When a pack grows (sequential editing), treat the images of every other entity it was edited "
            "with as visual negatives of each slot: a new slot's visual radius is placed again against earlier "
            "slots' images, earlier slots' against the new one's (radii only shrink; in memory, per editing "
            "session). False = each slot is calibrated against its own request and the negative pool only."
        },
    )
    router_steps: int = field(default=300, metadata={"help": "Adam steps when learning the router projection."})
    router_text_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": "Adam steps of the textual projection (0 = its PCA start only). None = 0 with a "
            "router_text_encoder, router_steps without. A sentence encoder's space is already organised by "
            "meaning; fitted to the few wordings of a question bank, the projection learns their form instead."
        },
    )
    router_lr: float = field(default=1e-2, metadata={"help": "Learning rate of the router projection."})
    num_edit_layers: int = field(default=1, metadata={"help": "How many localized layers each edit updates."})
    edit_steps: int = field(default=40, metadata={"help": "Maximum optimisation steps per edit (early stop on argmax)."})
    edit_lr: float = field(default=1e-2, metadata={"help": "Learning rate of the delta fit."})
    delta_bank_wordings: bool = field(
        default=True,
        metadata={
            "help": "Fit the delta on the caller's own wordings of the edited relation (questions of the negatives "
            "pool labelled with the request's relation) before templated rephrasings of the edit question, when the "
            "request brings fewer rephrasings than the fit uses: the delta then answers other ways of asking, not "
            "only the edit question in other frames (T-Generality). Same number of rows, same cost."
        },
    )
    edit_fit_stages: bool = field(
        default=True,
        metadata={
            "help": "Fit on the edit image's rows first and add the other positive rows (its automatic views) once "
            "those answer the target; the fit still ends only when every row does. Fewer tokens per step."
        },
    )
    edit_fit_dtype: str = field(
        default="auto",
        metadata={
            "help": "Precision of the delta fit's steps: 'float32', 'bfloat16' (the stop is re-checked, and any "
            "remaining steps taken, in the model's own precision), or 'auto' (bfloat16 where its matmuls are "
            "native: CUDA with bf16, a CPU with AVX-512 BF16 or AMX). The factors and the optimiser stay float32."
        },
    )
    max_delta_norm: float = field(
        default=0.0,
        metadata={
            "help": "Norm bound on each slot's delta output relative to the base layer output norm "
            "(0 = no bound). Keeps an edit from overwriting everything the layer computes."
        },
    )
    localization: str = field(
        default="attribution",
        metadata={"help": "'attribution' (Fast Localization, constant passes), 'tracing' (exact), or 'fixed'."},
    )
    fixed_layers: Optional[list[int]] = field(
        default=None, metadata={"help": "Layers used when localization='fixed'."}
    )
    corruption: str = field(
        default="mean",
        metadata={
            "help": "How localization corrupts the subject (the image tokens; the question for a text-only edit): "
            "'mean' replaces each subject embedding by the mean of the subject's embeddings (deterministic: the "
            "entity is gone, the input stays in distribution; a one-token subject falls back to 'noise'), "
            "'noise' adds Gaussian noise of noise_scale x the embedding std (ROME)."
        },
    )
    noise_scale: float = field(
        default=3.0, metadata={"help": "Std multiplier of the Gaussian corruption of the subject (image) embeddings."}
    )
    hard_negatives: bool = field(
        default=True,
        metadata={"help": "Generate hard negatives (same image/other question, look-alike/same question) for the router."},
    )
    use_router: bool = field(
        default=True, metadata={"help": "False = the delta is always on (ablation; not recommended)."}
    )
    base_model_fingerprint: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "model_type, hidden size, number of layers and a weight signature of the base model; "
            "loading onto a different base fails with FingerprintMismatchError."
        },
    )
    edits: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={"help": "Per slot: prompt, target, subject, relation, image fingerprint, edit-time metrics. Saved "
                  "in its own file beside the adapter (ldke_edits.json), not in adapter_config.json."},
    )
    pack_format_version: str = field(default=PACK_FORMAT_VERSION, metadata={"help": "Saved pack format version."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LDKEPeftType.LDKE
        if self.rank <= 0:
            raise ValueError(f"rank must be positive, got {self.rank}")
        if not 0 <= self.router_anchor_clearance < 1:
            raise ValueError(f"router_anchor_clearance must be in [0, 1), got {self.router_anchor_clearance}")
        if self.edit_fit_dtype not in FIT_DTYPES:
            raise ValueError(f"edit_fit_dtype must be one of {FIT_DTYPES}, got {self.edit_fit_dtype!r}")
        if str(self.pack_format_version) in _FORMAT_WITHOUT_ROUTER_STORAGE:
            self.router_storage = "float32"  # written before the field existed: always fp32
        if str(self.pack_format_version) in _FORMAT_WITHOUT_DELTA_STORAGE:
            self.delta_storage = "float32"  # written before the field existed: fp32 factors
        if self.delta_storage not in DELTA_STORAGE:
            raise AdapterLoadError(f"LDKEConfig: delta_storage must be one of {DELTA_STORAGE}, got {self.delta_storage!r}")
        if str(self.pack_format_version) in _FORMAT_WITHOUT_BANK_WORDINGS:
            self.delta_bank_wordings = False
        if str(self.pack_format_version) in _FORMAT_WITHOUT_NEIGHBOURS:
            self.router_neighbour_questions = 0
        if str(self.pack_format_version) in _FORMAT_WITHOUT_CLEARANCE:
            self.router_anchor_clearance = 0.0
        if str(self.pack_format_version) in _FORMAT_WITHOUT_ASKED_WORD:
            self.router_asked_word = False
        if str(self.pack_format_version) in _FORMAT_WITHOUT_TEXT_ENCODER:
            self.router_text_encoder = None  # written before the field existed: probe-layer text features
            self.router_text_margin = None  # and one margin for both parts
            self.router_text_probe = False
        if self.corruption not in CORRUPTIONS:
            raise AdapterLoadError(f"LDKEConfig: corruption must be one of {CORRUPTIONS}, got {self.corruption!r}")
        if self.router_storage not in ("int8", "float32"):
            raise AdapterLoadError(f"LDKEConfig: router_storage must be 'int8' or 'float32', got {self.router_storage!r}")
        if int(self.router_neighbour_questions) < 0 or int(self.router_text_anchors) < 0:
            raise AdapterLoadError("LDKEConfig: router_neighbour_questions and router_text_anchors must be >= 0")
        if int(self.router_groups) < 1:
            raise AdapterLoadError(f"LDKEConfig: router_groups must be >= 1, got {self.router_groups}")
        if self.num_slots == 0 and self.slot_layers:
            self.num_slots = len(self.slot_layers)
        if self.num_slots != len(self.slot_layers):
            raise AdapterLoadError(
                f"LDKEConfig: num_slots={self.num_slots} disagrees with slot_layers ({len(self.slot_layers)} entries)"
            )
        major = str(self.pack_format_version).split(".")[0]
        if major != PACK_FORMAT_VERSION.split(".")[0]:
            raise AdapterLoadError(
                f"LDKE pack format {self.pack_format_version!r} is not supported by this ldke-peft "
                f"(understands {PACK_FORMAT_VERSION}); upgrade ldke-peft"
            )
        for k, layers in enumerate(self.slot_layers):
            if not layers or not all(isinstance(i, int) and i >= 0 for i in layers):
                raise AdapterLoadError(f"LDKEConfig: slot_layers[{k}] must be a non-empty list of layer indices")
            if self.probe_layer is not None and min(layers) <= self.probe_layer:
                raise AdapterLoadError(
                    f"LDKEConfig: slot {k} edits layer {min(layers)} at or below the probe layer {self.probe_layer}; "
                    "routing must be decided before any edited layer runs"
                )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load the config and validate the pack's files *before* any model is touched.

        ``PeftModel.from_pretrained`` loads the config first and injects layers second; checking the
        weights file here (safetensors header, tensor names/shapes against the config, finite values, no
        pickle files) is what guarantees a corrupt or foreign pack leaves the base model unmodified.
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if isinstance(config, LDKEConfig):
            from .safety import validate_pack

            hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
            validate_pack(pretrained_model_name_or_path, config, subfolder=subfolder, **hub_kwargs)
        return config

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` (the settings) and, beside it, ``ldke_edits.json`` (the edits).

        PEFT calls this from ``PeftModel.save_pretrained``; a config of an older pack format keeps that
        format's layout (edits inside ``adapter_config.json``) so its version keeps describing its files.
        """
        if not has_edits_file(self):
            super().save_pretrained(save_directory, **kwargs)
            return
        edits = self.edits
        self.edits = []
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.edits = edits
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        data.pop("edits", None)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=2, sort_keys=True))
        write_edits(save_directory, self)

    @classmethod
    def check_kwargs(cls, **kwargs):
        _reject_unknown(kwargs)
        return super().check_kwargs(**kwargs)

    def edit_layers(self) -> list[int]:
        """Sorted union of the slots' layers."""
        return sorted({i for layers in self.slot_layers for i in layers})


_FIELDS: set[str] | None = None


def _reject_unknown(kwargs: dict[str, Any]) -> None:
    global _FIELDS
    if _FIELDS is None:
        _FIELDS = {f.name for f in dataclasses.fields(LDKEConfig)}
    unknown = sorted(set(kwargs) - _FIELDS)
    if unknown:
        raise UnsafeAdapterError(
            f"adapter_config.json has fields LDKE does not know: {unknown}. Refusing to load: the file was not "
            "written by this ldke-peft version, or it was tampered with."
        )


_dataclass_init = LDKEConfig.__init__


def _strict_init(self, *args, **kwargs):  # noqa: D401 - thin wrapper
    """Unknown fields are an error, not a warning: peft would drop them silently (forward compat), but an
    LDKE pack's fields decide which inputs an edit fires on, so a field we cannot honour is a refusal."""
    _reject_unknown(kwargs)
    _dataclass_init(self, *args, **kwargs)


_strict_init.__wrapped__ = _dataclass_init
LDKEConfig.__init__ = _strict_init


LDKEConfig._validates_on_load = True
install_generic_loader_check()
