"""Helpers shared by the merge, distributed and dtype tests: probe rows of toy-world requests and the
routing decision a pack takes on each of them."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from ldke_peft.tuner.context import prompt_mask_context
from ldke_peft.requests import PROBE_FIELDS


def probe_rows(requests: Sequence[Any]) -> list[tuple[Any, str]]:
    """Every ``(image, prompt)`` the metrics ask about: edit prompt, rephrasings, other views, and every
    locality / m_locality / coupled / portability probe."""
    rows: list[tuple[Any, str]] = []
    for r in requests:
        rows.append((r.image, r.prompt))
        rows += [(r.image, p) for p in r.rephrase_prompts]
        rows += [(im, r.prompt) for im in r.rephrase_images]
        for f in PROBE_FIELDS:
            rows += [(p.image, p.prompt) for p in getattr(r, f)]
    return rows


@torch.no_grad()
def decisions(peft_model: Any, processor: Any, rows: Sequence[tuple[Any, str]], adapter: str = "default") -> list[int]:
    """The slot the pack routes each row to (``-1`` = none), one row per forward pass."""
    from ldke_peft.families import family_of

    fam = family_of(peft_model)
    device, dtype = next((p.device, p.dtype) for p in peft_model.parameters() if p.is_floating_point())
    out = []
    for image, prompt in rows:
        built = fam.build_inputs(processor, [image], [prompt]).to(device, dtype)
        with prompt_mask_context(peft_model, built.prompt_mask):
            peft_model(**built.inputs)
        out.append(int(peft_model.base_model.last_routing(adapter)[0]))
    return out


def fresh(world: Any, dtype: torch.dtype | None = None) -> Any:
    """An independent copy of the toy world's base model (the session model stays untouched)."""
    model = copy.deepcopy(world.model)
    return model.to(dtype) if dtype is not None else model


def metric_values(result: dict[str, Any]) -> dict[str, Any]:
    from ldke_peft.metrics import METRIC_KEYS

    return {k: result[k] for k in METRIC_KEYS}


def assert_metrics_close(a: dict[str, Any], b: dict[str, Any], tol: float = 1e-6, what: str = "",
                         keys: Any = None) -> None:
    from ldke_peft.metrics import METRIC_KEYS

    for k in keys or METRIC_KEYS:
        x, y = a[k], b[k]
        assert (x is None) == (y is None), f"{what}{k}: {x} vs {y}"
        if x is not None:
            assert abs(x - y) <= tol, f"{what}{k}: {x} vs {y}\n{metric_values(a)}\n{metric_values(b)}"
