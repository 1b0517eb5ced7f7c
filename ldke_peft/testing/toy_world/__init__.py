"""A toy world: a tiny real LLaVA that *knows* facts about invented countries.

Every LDKE test and the demo need a multimodal model that answers factual questions correctly, so
that an edit has something to change and locality has something to keep. Pretrained MLLMs are far
too big for CPU tests, so :func:`toy_world` trains one from scratch in well under a minute:

* **Entities** are invented countries with procedural names. Each has an emblem (a flag drawn from
  a layout and colours, see :mod:`._emblems`) and many augmented *views* of it, so "another photo of
  the same entity" is a real generalisation probe. Entities come in **look-alike pairs** whose
  emblems differ only in one recoloured region: the hardest coupled-locality probe.
* **Relations** asked about the image (capital, language, currency, national animal), each with
  three training templates and one template held out for evaluation only.
* **Composed questions** ("Which river flows through the capital of the country shown?") are
  trained for every entity: after editing ``capital(X) := C'`` the portability probe expects
  ``river(C')``.
* **Text-only facts** (no image): "What is the capital of <country>?", "Which river flows through
  <city>?", and one second-hop fact per answer of every relation.

The model is a real ``LlavaForConditionalGeneration`` (Llama text model with 6 decoder layers, a
small CLIP vision tower) with the real ``LlavaProcessor``, and every input is built with
``family_of(model).build_inputs`` -- the same code path the library uses -- so the world matches
what the editor and the metrics see. Built worlds are cached on disk (safetensors + JSON) and load in
about a second.
"""

from __future__ import annotations

from .build import build_world, one_thread
from .cache import cache_key, default_cache_root, load_world, save_world, toy_world
from .spec import (
    ANIMALS,
    CODE_VERSION,
    DEFAULT_N_ENTITIES,
    DIETS,
    EDIT_RELATIONS,
    EOS,
    HELDOUT_RELATION,
    HELDOUT_VIEW_START,
    IMAGE_SIZE,
    IMAGE_TEMPLATES,
    METALS,
    PATCH_SIZE,
    RELATED,
    SPLITS,
    TEXT_TEMPLATES,
    WorldSpec,
    make_spec,
)
from .world import ToyWorld, _render

__all__ = [
    "ToyWorld", "WorldSpec", "toy_world", "build_world", "one_thread", "CODE_VERSION", "DEFAULT_N_ENTITIES",
    "HELDOUT_VIEW_START", "ANIMALS", "DIETS", "EDIT_RELATIONS", "EOS", "HELDOUT_RELATION", "IMAGE_SIZE",
    "IMAGE_TEMPLATES", "METALS", "PATCH_SIZE", "RELATED", "SPLITS", "TEXT_TEMPLATES", "cache_key",
    "default_cache_root", "load_world", "make_spec", "save_world", "_render",
]
