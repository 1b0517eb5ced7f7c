"""The benchmark's suites: the toy world and the benchmark MLLM (smoke/full), their request lists and the
checks that keep only probes the unedited model passes (:func:`load_suite`). :mod:`ldke_peft.bench.run`
runs methods on a suite; :mod:`ldke_peft.bench.report` writes what it measured.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..editing.scope import NegativePool
from ..requests import EditRequest

logger = logging.getLogger(__name__)

#: Defaults per suite (overridable on the command line).
SUITES: dict[str, dict[str, Any]] = {
    "smoke": {"n_edits": 10, "sequential": [1, 10], "localization": 10, "positions": 1, "speed": 1},
    "full": {"n_edits": None, "sequential": [1, 10, 100], "localization": 20, "positions": 3, "speed": 3},
    "toy": {"n_edits": 8, "sequential": [1, 10], "localization": 8, "positions": 2, "speed": 2},
}


# ---------------------------------------------------------------------- suites


@dataclass
class Suite:
    """A model, its processor, evaluation requests and the editors' negative pool."""

    name: str
    model: Any
    processor: Any
    model_name: str
    requests: list[EditRequest]
    pool: NegativePool
    info: dict[str, Any] = field(default_factory=dict)
    #: the single-edit table uses the first ``n_single`` requests (the sequential study may use more)
    n_single: int | None = None

    def __post_init__(self) -> None:
        if self.n_single is None:
            self.n_single = len(self.requests)


def load_suite(name: str, n_edits: int | None, *, device: str = "cpu", cache_dir: str | None = None,
               seed: int = 0, toy_entities: int | None = None, n_sequential: int = 0, split: str = "test") -> Suite:
    """Load the suite's model and build the requests of ``split`` (``"dev"`` or ``"test"``): ``n_edits`` for
    the single-edit table (``None`` = every usable fact) and, when ``n_sequential`` is larger, that many for
    the sequential study (as many as there are usable facts). The editors' negative pool is the same for
    both splits and disjoint from every probe of either."""
    if name == "toy":
        from ..testing.toy_world import toy_world

        world = toy_world(seed=seed, **({"n_entities": toy_entities} if toy_entities else {}))
        n = n_edits if n_edits is not None else len(world.entities)
        total = max(n, n_sequential)
        reqs = None
        while reqs is None:  # a world answers only so many facts of a split correctly: take what there is
            try:
                reqs = world.edit_requests(total, seed=seed + 1, split=split)
            except ValueError:
                if total <= 1:
                    raise
                total = max(1, min(total - 1, int(total * 0.8)))
                logger.info("toy world, %s split: trying %d edit requests", split, total)
        model = world.model.to(device)
        return Suite("toy", model, world.processor, f"toy_world(seed={seed}, entities={len(world.entities)})", reqs,
                     world.negative_pool(), {"entities": len(world.entities), "split": split},
                     n_single=min(n, len(reqs)))
    if name in ("smoke", "full"):
        from .mke import build_mke_requests, negative_pool, split_facts
        from .smol_llava import generate_answers, load_smol_llava

        model, processor, meta = load_smol_llava(cache_dir)
        model = model.to(device)

        def answer(images: list[Any], prompts: list[str]) -> list[str]:
            with torch.no_grad():
                return generate_answers(model, processor, images, prompts, max_new_tokens=16, batch_size=16)

        total = None if n_edits is None else max(n_edits, n_sequential)
        usable = len(split_facts(meta, split))
        reqs = build_mke_requests(meta, min(total, usable) if total else None, seed=seed, split=split, answer_fn=answer)
        reqs = _verified_views(reqs, answer)
        reqs, port = _verified_portability(reqs, answer)
        desc = (f"smol-llava: {meta['base_lm']['name']} in a LlavaForConditionalGeneration "
                f"({meta['n_image_tokens']} image tokens, build {meta['build_version']})")
        return Suite(name, model, processor, desc, reqs, negative_pool(meta),
                     {"usable_facts": usable, "split": split, "build": meta.get("code_version"),
                      "recognition": meta.get("recognition", {}).get("heldout_accuracy"),
                      "portability_probes": port},
                     n_single=len(reqs) if n_edits is None else min(n_edits, len(reqs)))
    raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")


def _verified_views(reqs: list[EditRequest], answer: Callable[[list[Any], list[str]], list[str]]) -> list[EditRequest]:
    """Keep the requests whose every probe view (the edit image and each rephrase image) the unedited
    model answers correctly with the edit question: an M-Generality probe the model got wrong before
    the edit measures the model, not the edit."""
    from .countries import answer_matches, country_by_name

    rows = [(i, im) for i, r in enumerate(reqs) for im in [r.image, *r.rephrase_images]]
    got = answer([im for _, im in rows], [reqs[i].prompt for i, _ in rows])
    bad = {i for (i, _), a in zip(rows, got)
           if not answer_matches(a, country_by_name(reqs[i].subject).answers(reqs[i].relation))}
    if bad:
        logger.info("dropped %d of %d requests: the unedited model misses one of their probe views", len(bad), len(reqs))
    return [r for i, r in enumerate(reqs) if i not in bad]


def _verified_portability(reqs: list[EditRequest], answer: Callable[[list[Any], list[str]], list[str]]
                          ) -> tuple[list[EditRequest], dict[str, Any]]:
    """Keep the portability probes the unedited model passes *for the original fact*; a probe it fails before
    any edit measures whether the model can reason in two hops (or back from an answer), not whether the edit
    propagates. Two-hop ("In which country is the capital of this country located?", on the edit image): the
    unedited model must name the entity shown. Reverse ("Which country has <answer> as its capital?", text
    only) and presupposed ("In which country is <answer>, the capital of this country?"): asked with the
    *original* answer, it must name the entity. Returns the requests and
    ``{"kept": n, "dropped": m, "by_kind": {kind: {"kept", "dropped"}}}``."""
    from .countries import answer_matches, country_by_name
    from .mke import PRESUPPOSED_QUESTIONS, REVERSE_QUESTIONS

    def asked(r: EditRequest, p: Any) -> tuple[Any, str]:
        kind, _, rel = (p.kind or "").partition(":")
        if kind == "reverse" and r.ground_truth:
            return None, REVERSE_QUESTIONS[rel].format(x=r.ground_truth)
        if kind == "presupposed" and r.ground_truth:
            return p.image, PRESUPPOSED_QUESTIONS[rel].format(x=r.ground_truth)
        return p.image, p.prompt

    rows = [(i, j) for i, r in enumerate(reqs) for j, p in enumerate(r.portability)]
    if not rows:
        return reqs, {"kept": 0, "dropped": 0, "by_kind": {}}
    questions = [asked(reqs[i], reqs[i].portability[j]) for i, j in rows]
    got: list[str] = [""] * len(rows)
    for text_only in (False, True):  # image rows and text-only rows in separate batches
        idx = [k for k, (im, _) in enumerate(questions) if (im is None) == text_only]
        if idx:
            for k, a in zip(idx, answer([questions[k][0] for k in idx], [questions[k][1] for k in idx])):
                got[k] = a
    keep: dict[int, list[int]] = {}
    by_kind: dict[str, dict[str, int]] = {}
    for (i, j), a in zip(rows, got):
        c = country_by_name(reqs[i].subject)
        ok = answer_matches(a, (c.name, c.prompt_name, *c.aliases))
        kind = (reqs[i].portability[j].kind or "portability").split(":")[0]
        by_kind.setdefault(kind, {"kept": 0, "dropped": 0})["kept" if ok else "dropped"] += 1
        if ok:
            keep.setdefault(i, []).append(j)
    kept = sum(len(v) for v in keep.values())
    logger.info("portability: the unedited model passes %d of %d probes for the original fact (%s); the others "
                "are not scored", kept, len(rows), by_kind)
    out = [dataclasses.replace(r, portability=[r.portability[j] for j in keep.get(i, [])]) if r.portability else r
           for i, r in enumerate(reqs)]
    return out, {"kept": kept, "dropped": len(rows) - kept, "by_kind": by_kind}
