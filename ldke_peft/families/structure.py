"""Where things live inside an MLLM, read off the model itself (not its name).

LDKE needs four facts about a model: its language model, that model's decoder layers, each layer's
MLP output projection (the edit target) and the modules that encode the image (which an edit
target must never lie in). transformers' image-text-to-text models share one shape -- a vision
encoder and projector beside a decoder-only language model reached through ``get_decoder()`` or
``language_model`` -- so the facts can be derived from the module tree:

* **language model**: ``model.get_decoder()`` (else ``model.language_model``);
* **decoder layers**: the longest ``nn.ModuleList`` inside the language model whose entries hold
  linear layers (the per-layer blocks; rotary tables and norms are not lists);
* **MLP output projection**: in each layer, the last ``nn.Linear`` of the feed-forward block (the
  child that is not attention: ``mlp`` / ``feed_forward`` / OPT's bare ``fc1``/``fc2``) that maps back
  to the hidden size. Full paths only: the vision tower has modules with the same short names;
* **vision modules**: everything beside the path from the root to the language model, except the
  LM head;
* **final norm**: the norm module next to the decoder layers (applied after the last layer).

Derivation is read-only and cached per model object. Anything that does not fit raises
:class:`~ldke_peft.errors.UnsupportedModelError` saying which part is missing, before the model is
touched.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from torch import nn

from ..errors import UnsupportedModelError

__all__ = ["Structure", "derive_structure", "module_path"]

#: substrings of a module's class or attribute name that mark a sequence mixer (attention and its
#: linear-time replacements), whose linears are never the MLP's
_MIXER_MARKS = ("attention", "attn", "deltanet", "mamba", "conv", "mixer", "ssm")
#: substrings that mark the feed-forward block of a decoder layer
_FFN_MARKS = ("mlp", "feed_forward", "feedforward", "ffn", "moe", "expert")


@dataclass(frozen=True)
class Structure:
    """Module paths (relative to the unwrapped root model) of the parts LDKE uses.

    Attributes:
        language_model_path: the language model (``get_decoder()``); routing hooks enter here when a
            model's ``generate`` calls it directly.
        layers_path: the decoder layers' ``nn.ModuleList``.
        mlp_out: per decoder layer, the path of its MLP output projection *inside the layer*.
        vision_paths: modules that encode the image (vision tower, projector, Q-Former, ...).
        final_norm_path: the norm after the last decoder layer (``""`` when there is none to find).
    """

    language_model_path: str
    layers_path: str
    mlp_out: tuple[str, ...]
    vision_paths: tuple[str, ...]
    final_norm_path: str


_CACHE: "weakref.WeakKeyDictionary[nn.Module, Structure]" = weakref.WeakKeyDictionary()


def derive_structure(root: nn.Module) -> Structure:
    """The :class:`Structure` of an unwrapped transformers model (cached per model object)."""
    cached = _CACHE.get(root)
    if cached is None:
        cached = _derive(root)
        _CACHE[root] = cached
    return cached


def module_path(root: nn.Module, module: nn.Module) -> str:
    """Dotted name of ``module`` inside ``root`` (``""`` for the root itself)."""
    for name, mod in root.named_modules(remove_duplicate=False):
        if mod is module:
            return name
    raise UnsupportedModelError(f"{type(module).__name__} is not a submodule of {type(root).__name__}")


def _derive(root: nn.Module) -> Structure:
    kind = type(root).__name__
    lm = language_model_of(root)
    lm_path = module_path(root, lm)
    layers = _decoder_layers(lm, kind)
    layers_path = module_path(root, layers)
    hidden = _hidden_size(root, lm)
    mlp_out = tuple(_mlp_out(layer, i, hidden, kind) for i, layer in enumerate(layers))
    return Structure(
        language_model_path=lm_path,
        layers_path=layers_path,
        mlp_out=mlp_out,
        vision_paths=_vision_paths(root, lm_path),
        final_norm_path=_final_norm(root, layers_path),
    )


def language_model_of(root: nn.Module) -> nn.Module:
    """``root.get_decoder()`` (the decoder-only language model), else ``root.language_model``."""
    lm = None
    getter = getattr(root, "get_decoder", None)
    if callable(getter):
        try:
            lm = getter()
        except (AttributeError, NotImplementedError, TypeError):
            lm = None
    if not isinstance(lm, nn.Module) or lm is root:
        lm = getattr(root, "language_model", None)
    if not isinstance(lm, nn.Module) or lm is root:
        raise UnsupportedModelError(
            f"{type(root).__name__} exposes no language model (neither get_decoder() nor .language_model): "
            "LDKE edits the decoder layers of the language model inside an MLLM"
        )
    return lm


def _is_tuner_layer(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def _linear_of(module: nn.Module) -> nn.Linear | None:
    """``module`` as a linear layer (a PEFT-wrapped one counts as its base layer)."""
    if _is_tuner_layer(module):
        module = module.get_base_layer()
    return module if isinstance(module, nn.Linear) else None


def _holds_linear(module: nn.Module) -> bool:
    return any(_linear_of(m) is not None for m in module.modules())


def _decoder_layers(lm: nn.Module, kind: str) -> nn.ModuleList:
    best: nn.ModuleList | None = None
    for _, mod in lm.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and all(_holds_linear(m) for m in mod):
            if best is None or len(mod) > len(best):
                best = mod
    if best is None:
        raise UnsupportedModelError(f"{kind}: no stack of decoder layers (an nn.ModuleList of blocks) in its language model")
    return best


def _hidden_size(root: nn.Module, lm: nn.Module) -> int:
    """The decoder's hidden size: ``text_config.hidden_size`` (OPT's embeddings may be narrower),
    else the width of the input embeddings."""
    cfg = getattr(root, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    size = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)
    if isinstance(size, int):
        return size
    emb = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    if emb is None:
        emb = root.get_input_embeddings()
    dim = getattr(emb, "embedding_dim", None)
    if dim is None:
        raise UnsupportedModelError(f"{type(root).__name__}: cannot read the language model's hidden size")
    return int(dim)


def _marked(name: str, module: nn.Module, marks: tuple[str, ...]) -> bool:
    text = f"{name} {type(module).__name__}".lower()
    return any(m in text for m in marks)


def _fused(block: nn.Module) -> bool:
    """Whether ``block`` holds stacked (3-D) expert weights: a mixture of experts with fused experts."""
    return any(p.dim() >= 3 for p in block.parameters())


def _mlp_out(layer: nn.Module, idx: int, hidden: int, kind: str) -> str:
    """Path inside ``layer`` of its MLP output projection (see the module docstring)."""
    where = f"{kind}: decoder layer {idx} ({type(layer).__name__})"
    for name, child in layer.named_children():
        if "cross" in name.lower() or "crossattention" in type(child).__name__.lower():
            raise UnsupportedModelError(
                f"{where} has cross-attention ({name}): the image reaches the language model through "
                "cross-attention, not as tokens of the input sequence, so there are no image positions to route on"
            )
    ffn = [
        (n, c)
        for n, c in layer.named_children()
        if _marked(n, c, _FFN_MARKS) and not _marked(n, c, _MIXER_MARKS + ("norm",)) and (_holds_linear(c) or _fused(c))
    ]
    if ffn:
        name, block = ffn[-1]
        if _fused(block):
            raise UnsupportedModelError(
                f"{where}: its feed-forward block {name} ({type(block).__name__}) is a mixture of experts with fused "
                "expert weights; there is no single linear MLP output projection to edit"
            )
        candidates = [(f"{name}.{n}" if n else name, m) for n, m in block.named_modules() if _linear_of(m) is not None]
    else:  # OPT-style layers hold fc1/fc2 directly
        candidates = [(n, c) for n, c in layer.named_children() if _linear_of(c) is not None and not _marked(n, c, _MIXER_MARKS)]
    candidates = [(n, m) for n, m in candidates if ".base_layer" not in n and _linear_of(m).out_features == hidden]
    if not candidates:
        raise UnsupportedModelError(f"{where} has no linear MLP output projection back to the hidden size {hidden}")
    widening = [(n, m) for n, m in candidates if _linear_of(m).in_features != hidden]
    return (widening or candidates)[-1][0]


def _vision_paths(root: nn.Module, lm_path: str) -> tuple[str, ...]:
    """Modules beside the root-to-LM path that hold parameters, minus the LM head."""
    head = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    on_path = {""} | {".".join(lm_path.split(".")[: i + 1]) for i in range(len(lm_path.split(".")))}
    out = []
    for anc in sorted(on_path, key=len):
        if anc == lm_path:
            continue
        parent = root.get_submodule(anc) if anc else root
        for name, child in parent.named_children():
            path = f"{anc}.{name}" if anc else name
            if path in on_path or child is head or not any(True for _ in child.parameters()):
                continue
            out.append(path)
    return tuple(out)


def _final_norm(root: nn.Module, layers_path: str) -> str:
    parent_path = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
    parent = root.get_submodule(parent_path) if parent_path else root
    norms = [n for n, c in parent.named_children() if "norm" in type(c).__name__.lower() or "norm" in n.lower()]
    norms = [n for n in norms if "emb" not in n.lower()]
    if not norms:
        return ""
    name = norms[-1]
    return f"{parent_path}.{name}" if parent_path else name
