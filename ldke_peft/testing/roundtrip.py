"""One family, end to end: edit -> save -> ``PeftModel.from_pretrained`` -> bitwise routing -> generate.

The checks every family must pass, in one place, so the test suite and the coverage report
(``benchmarks/family_coverage.py``) measure the same thing:

* **edits**: LDKE fits the edit (its own positives reach the target), the edit fires on its own
  input, and inputs out of its scope (another image + another question; a text-only question) give
  the base model's logits bit for bit;
* **reloads**: the saved pack, loaded with ``PeftModel.from_pretrained`` onto a fresh copy of the
  base, gives the edited logits bit for bit in scope and the base logits out of scope; ``generate``
  with the KV cache equals step-by-step decoding without a cache and starts with the new answer.

A failing check ends the round trip with a :class:`RoundTrip` saying which one and why.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["EDIT_CONFIG", "RoundTrip", "round_trip"]

#: small and fast; three edited layers because Gemma 3 normalises each MLP's output (post-FFN norm),
#: which caps what a delta in one layer can move
EDIT_CONFIG = dict(rank=2, probe_layer=0, localization="fixed", fixed_layers=[1, 2, 3], edit_steps=60, edit_lr=3e-2,
                   router_steps=60, router_dim=8, auto_views=2, router_paraphrases=2, router_views=1)

PROMPT = "What is the capital of the country shown in the image?"
OTHER_PROMPT = "What currency is used there?"
TEXT_PROMPT = "Which language is spoken in the country in the picture?"
TARGET = "Paris"


def _image(color: tuple[int, int, int], stripe: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (64, 64), color)
    for x in range(64):
        for y in range(21, 43):
            img.putpixel((x, y), stripe)
    return img


@dataclass
class RoundTrip:
    """How far a family got: ``edits`` / ``reloads`` as defined in the module docstring; ``reason``
    names the first check that failed (empty when everything passed)."""

    edits: bool = False
    reloads: bool = False
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.edits and self.reloads


def round_trip(build: Callable[[], tuple[Any, Any]], config: dict[str, Any] | None = None) -> RoundTrip:
    """Run the round trip on ``build()`` -> ``(model, processor)``; ``build`` must return the same
    weights each call (it is called three times: edited model, reference, fresh base for reloading)."""
    import ldke_peft
    from peft import PeftModel

    from ..families import family_of

    res = RoundTrip()
    red, blue = _image((220, 30, 30), (250, 250, 250)), _image((20, 40, 200), (250, 220, 0))
    model, processor = build()
    reference, _ = build()
    # frozen like any PEFT base model: on some CPUs a convolution whose weight requires grad takes another
    # kernel even under no_grad, and the comparisons below are bit for bit
    reference.requires_grad_(False)
    fam = family_of(model)
    edited = ldke_peft.edit(
        model, processor, [ldke_peft.EditRequest(image=red, prompt=PROMPT, target=TARGET)],
        ldke_peft.LDKEConfig(**(config or EDIT_CONFIG)), progress=False,
    )
    acc = edited.ldke_reports[0].fit_accuracy
    res.details["fit_accuracy"] = acc
    in_scope = fam.build_inputs(processor, [red], [PROMPT])
    out_scope = fam.build_inputs(processor, [blue, None], [OTHER_PROMPT, TEXT_PROMPT])
    routed, base_out = _logits(edited, in_scope), _logits(reference, out_scope)
    if acc < 1.0:
        return _fail(res, f"the edit's positives reach only {acc:.0%} target accuracy")
    if torch.equal(routed, _logits(reference, in_scope)):
        return _fail(res, "the edit does not fire on its own input")
    if not torch.equal(_logits(edited, out_scope), base_out):
        return _fail(res, "out-of-scope logits differ from the base model's")
    res.edits = True

    with tempfile.TemporaryDirectory() as tmp:
        edited.save_pretrained(tmp)
        fresh, _ = build()
        reloaded = PeftModel.from_pretrained(fresh, tmp)
    if not torch.equal(_logits(reloaded, in_scope), routed):
        return _fail(res, "reloaded pack: routed logits differ from the edited model's")
    if not torch.equal(_logits(reloaded, out_scope), base_out):
        return _fail(res, "reloaded pack: out-of-scope logits differ from the base model's")
    with torch.no_grad():
        cached = reloaded.generate(**in_scope.inputs, max_new_tokens=5, do_sample=False)[:, in_scope.input_ids.shape[1] :]
        base_gen = reference.generate(**out_scope.inputs, max_new_tokens=3, do_sample=False)
        out_gen = reloaded.generate(**out_scope.inputs, max_new_tokens=3, do_sample=False)
    stepwise = greedy_without_cache(reloaded, in_scope, int(cached.shape[1]))
    if not torch.equal(cached, stepwise):
        return _fail(res, f"generate with the KV cache {cached.tolist()} != step-by-step decoding {stepwise.tolist()}")
    answer = fam.tokenizer(processor).decode(cached[0], skip_special_tokens=True).strip()
    res.details["answer"] = answer
    if not answer.startswith(TARGET):
        return _fail(res, f"generate answers {answer!r}, not {TARGET!r}")
    if not torch.equal(out_gen, base_gen):
        return _fail(res, "reloaded pack: out-of-scope generation differs from the base model's")
    res.reloads = True
    return res


def greedy_without_cache(model: Any, built: Any, steps: int) -> torch.Tensor:
    """Greedy decoding with a full forward per token (no KV cache), the router pooling over the prompt.

    Every sequence-aligned input (``built.sequence_keys``) is extended over the new tokens with the
    family's fill value, as :meth:`~ldke_peft.families.Family.build_inputs` extends them over
    appended targets. Returns the new tokens.
    """
    from ..tuner.context import prompt_mask_context
    from ..families import family_of

    fam = family_of(model)
    inputs = dict(built.inputs)
    prompt_mask = built.prompt_mask
    B = prompt_mask.shape[0]
    new = []
    with torch.no_grad():
        for _ in range(steps):
            with prompt_mask_context(model, prompt_mask):
                out = model(**inputs, use_cache=False).logits[:, -1]
            tok = out.argmax(-1, keepdim=True)
            new.append(tok)
            for key in built.sequence_keys:
                if key not in inputs:
                    continue
                fill = torch.full((B, 1), fam._target_fill_value(key), dtype=inputs[key].dtype)
                inputs[key] = torch.cat([inputs[key], tok.to(inputs[key].dtype) if key == "input_ids" else fill], dim=1)
            prompt_mask = torch.cat([prompt_mask, torch.zeros(B, 1, dtype=torch.bool)], dim=1)
    return torch.cat(new, dim=1)


def _logits(model: Any, built: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**built.inputs).logits


def _fail(res: RoundTrip, reason: str) -> RoundTrip:
    res.reason = reason
    logger.info("round trip stopped: %s", reason)
    return res
