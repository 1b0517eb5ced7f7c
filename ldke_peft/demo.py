"""``ldke demo``: one knowledge edit, end to end, fully offline, in under a minute once cached.

The demo runs on the *toy world* (:mod:`ldke_peft.testing.toy_world`): a tiny real LLaVA trained on
invented entities, so it answers questions about their emblems correctly and an edit has something
to change. The edit sees only the edit itself and the world's negative pool; every question and image
the demo then asks about is one the editor never saw. It shows what LDKE promises on concrete questions:

1. the model's answer to an image question before the edit;
2. the edit (:func:`ldke_peft.edit`): Fast Localization picks a layer, a low-rank delta is fitted,
   the router is calibrated;
3. the new answer, and the answers to a rephrased question (a wording never trained), another view
   of the image, unrelated questions and *coupled* ones (same image + other relation, look-alike
   emblem + same question) that must keep their old answers;
4. the edit pack saved (safetensors + model card) and reloaded with plain
   ``PeftModel.from_pretrained`` on a freshly loaded base model, which must give the same answers;
5. the EasyEdit-style metrics table.

Everything runs on one torch thread (:func:`~ldke_peft.testing.toy_world.one_thread`; the caller's
setting is restored): the toy model is so small that more threads only add overhead.

This module is the CLI's user interface, so it prints; the library underneath logs.

Layer: product (README "Architecture"): may import every layer; no library layer imports it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence, TextIO

import torch

from .testing.toy_world import one_thread

__all__ = ["DemoResult", "ask", "run_demo", "save_demo_model"]


@dataclass
class _Row:
    label: str
    image_desc: str
    image: Any
    prompt: str
    expected: str
    changes: bool  # the edit should change this answer (True) or keep it (False)
    before: str = ""
    after: str = ""
    reloaded: str = ""


@dataclass
class DemoResult:
    """What the demo measured (returned for tests and scripts)."""

    out_dir: str
    rows: list[_Row]
    metrics: dict[str, Any]
    timings: dict[str, float]
    reload_matches: bool
    max_logit_diff: float
    world_cached: bool
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.reload_matches


@torch.no_grad()
def ask(model: Any, processor: Any, image: Any, prompt: str, max_new_tokens: int = 4) -> str:
    """Greedy answer of ``model`` (a transformers model or a ``PeftModel``) to one question."""
    from .families import family_of

    family = family_of(model)
    tok = family.tokenizer(processor)
    built = family.build_inputs(processor, [image], [prompt])
    device = next(model.parameters()).device
    built = built.to(device)
    out = model.generate(
        **built.inputs,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return tok.decode(out[0, built.input_ids.shape[1] :], skip_special_tokens=True).strip()


def _negative_pool(world: Any) -> Any:
    """Questions and images of the world for the router's hard negatives."""
    if hasattr(world, "negative_pool"):
        return world.negative_pool()
    from .editing.scope import NegativePool

    return NegativePool(
        questions=[(q, r) for r in world.relations for q in world.question_bank(r)],
        images=[(world.render(e, 0), e) for e in world.entities],
    )


def _rows(world: Any, req: Any) -> list[_Row]:
    from .requests import image_fingerprint

    owner = {image_fingerprint(world.render(e, 0)): e for e in world.entities}

    def who(image: Any) -> str:
        return owner.get(image_fingerprint(image), "?") if image is not None else "(no image)"

    subject = req.subject or who(req.image)
    rows = [_Row("edit question", f"{subject} emblem", req.image, req.prompt, req.target, True)]
    heldout = [p for p in req.rephrase_prompts if p in set(world.templates.get(req.relation, {}).get("eval", []))]
    rephrase = (heldout or req.rephrase_prompts or [None])[-1]
    if rephrase:
        rows.append(_Row("rephrased question", f"{subject} emblem", req.image, rephrase, req.target, True))
    if req.rephrase_images:
        rows.append(_Row("another view of the emblem", f"{subject}, unseen view", req.rephrase_images[0], req.prompt, req.target, True))
    same = [p for p in req.coupled if p.kind == "same_image_other_question"]
    look = [p for p in req.coupled if p.kind == "lookalike_same_question"]
    if same:
        rows.append(_Row("coupled: same image, other relation", f"{subject} emblem", same[0].image, same[0].prompt, same[0].answer, False))
    if look:
        rows.append(_Row("coupled: look-alike emblem, same question", f"{who(look[0].image)} emblem", look[0].image, look[0].prompt, look[0].answer, False))
    if req.m_locality:
        p = req.m_locality[0]
        rows.append(_Row("unrelated: other entity", f"{who(p.image)} emblem", p.image, p.prompt, p.answer, False))
    if req.locality:
        p = req.locality[0]
        rows.append(_Row("unrelated: text-only fact", "(no image)", None, p.prompt, p.answer, False))
    if req.portability:
        p = req.portability[0]
        rows.append(_Row("multi-hop (portability)", f"{subject} emblem", p.image, p.prompt, p.answer, True))
    return rows


def _table(rows: Sequence[Sequence[str]], out: TextIO, indent: str = "  ") -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        print(indent + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)
        if k == 0:
            print(indent + "  ".join("-" * w for w in widths), file=out)


def _short(text: str, n: int = 44) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def metrics_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """``[["metric", "value", "what it checks"], ...]`` for a :func:`ldke_peft.evaluate` result."""
    from .metrics import METRIC_KEYS

    meaning = {
        "reliability": "edit question answers the new target",
        "t_generality": "rephrased questions answer it too",
        "m_generality": "other views of the image answer it too",
        "t_locality": "text-only facts unchanged (top-1 agreement)",
        "m_locality": "other images unchanged (top-10 agreement)",
        "coupled_locality": "same image/other question, look-alike image: unchanged",
        "near_miss_locality": "same image, a question on a neighbouring fact: unchanged",
        "portability": "multi-hop questions follow the new fact",
        "exact_match": "greedy generation starts with the target",
    }
    rows = [["metric", "value", "what it checks"]]
    for k in METRIC_KEYS:
        v = metrics.get(k)
        rows.append([k, "n/a" if v is None else f"{v:.3f}", meaning.get(k, "")])
    return rows


@one_thread()  # the toy model is tiny: more threads only add overhead (2 busy cores: 56 s -> 14 s warm)
def run_demo(
    out: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    n_edits: int = 1,
    stream: TextIO | None = None,
) -> DemoResult:
    """Run the demo, printing to ``stream`` (default stdout). See the module docstring."""
    from . import edit
    from .families import family_of

    o = stream or sys.stdout
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    print("LDKE demo: edit one fact inside a (tiny) multimodal LLM, offline, and check what else changed.\n", file=o)
    t0 = time.perf_counter()
    world, cached = _load_world(seed, cache_dir, o)
    timings["world"] = time.perf_counter() - t0
    model, processor = world.model, world.processor
    n_layers = family_of(model).num_layers(model)
    print(
        f"[1/6] Toy world: a {n_layers}-layer LLaVA that knows {len(world.relations)} facts ({', '.join(world.relations)}) "
        f"about each of {len(world.entities)} invented entities from their emblems "
        f"({'loaded' if cached else 'built'} in {timings['world']:.1f} s).",
        file=o,
    )

    requests = world.edit_requests(n_edits, seed=seed)
    req = requests[0]
    rows = _rows(world, req)
    print(f'[2/6] Edit request: on the emblem of {req.subject}, "{req.prompt}"  {req.ground_truth} -> {req.target}', file=o)
    for r in rows:
        r.before = ask(model, processor, r.image, r.prompt)

    t0 = time.perf_counter()
    # the editor gets the edit alone (held out: every rephrasing, view and coupled question shown below is new to it)
    peft_model = edit(model, processor, [r.without_probes() for r in requests], negatives=_negative_pool(world),
                      progress=n_edits > 1)
    timings["edit"] = time.perf_counter() - t0
    rep = peft_model.ldke_reports[0]
    router = "router separates positives from negatives" if rep.router.get("separable") else "router NOT separable"
    print(
        f"[3/6] ldke_peft.edit: {len(requests)} edit(s) in {timings['edit']:.1f} s; edit 0 changes decoder layer(s) "
        f"{', '.join(map(str, rep.layers))} ({rep.fit_steps} steps, {router}).",
        file=o,
    )
    for r in rows:
        r.after = ask(peft_model, processor, r.image, r.prompt)

    print("[4/6] Answers before and after the edit (OK = as expected: changed where it should, unchanged elsewhere):\n", file=o)
    table = [["probe", "image", "question", "before", "after", "expected", ""]]
    for r in rows:
        table.append([r.label, r.image_desc, _short(r.prompt), r.before, r.after, r.expected,
                      "OK" if r.after == r.expected else "MISS"])
    _table(table, o)
    if any(r.label.startswith("multi-hop") and r.after != r.expected for r in rows):
        print("\n  (multi-hop questions are not among the edit's training questions: portability measures how far the\n"
              "   new fact propagates by itself through the model's other knowledge, and here it does not.)", file=o)
    print(file=o)

    with contextlib.ExitStack() as stack:
        if out is None:  # a temporary pack folder, removed when the demo ends
            out_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ldke-demo-"))
        else:
            out_dir = os.fspath(out)
        result = _save_reload_report(peft_model, processor, requests, rows, out_dir, seed, cache_dir, o, timings,
                                     temporary=out is None)
    timings["total"] = time.perf_counter() - t_all
    print(f"\nDone in {timings['total']:.1f} s.", file=o)
    result.world_cached = cached
    return result


def _save_reload_report(peft_model: Any, processor: Any, requests: list[Any], rows: list[_Row], out_dir: str, seed: int,
                        cache_dir: Any, o: TextIO, timings: dict[str, float], *, temporary: bool) -> DemoResult:
    """Steps 5 and 6: save the pack, reload it on a fresh base, compare; the metrics table."""
    from peft import PeftModel

    from . import evaluate
    from .families import family_of
    from .hub import save_edits
    from .testing import toy_world_module as tw

    t0 = time.perf_counter()
    metrics = evaluate(peft_model, processor, requests)
    timings["metrics"] = time.perf_counter() - t0
    save_edits(peft_model, out_dir, metrics=metrics)

    # a fresh base model from disk + plain PEFT loading (``import ldke_peft`` registered the type)
    t0 = time.perf_counter()
    fresh = tw.toy_world(seed, cache_dir=cache_dir)
    reloaded = PeftModel.from_pretrained(fresh.model, out_dir)
    reloaded.eval()
    for r in rows:
        r.reloaded = ask(reloaded, processor, r.image, r.prompt)
    family = family_of(peft_model)
    built = family.build_inputs(processor, [r.image for r in rows if r.image is not None],
                                [r.prompt for r in rows if r.image is not None])
    with torch.no_grad():  # teacher-forced: each call routes on the prompt positions it is given
        diff = (peft_model(**built.inputs, ldke_prompt_mask=built.prompt_mask).logits
                - reloaded(**built.inputs, ldke_prompt_mask=built.prompt_mask).logits).abs().max().item()
    timings["reload"] = time.perf_counter() - t0
    matches = all(r.reloaded == r.after for r in rows)
    files = ", ".join(sorted(os.listdir(out_dir)))
    where = f"a temporary folder, {out_dir}, removed at the end (--out DIR keeps it)" if temporary else out_dir
    print(f"[5/6] Saved the edit pack to {where} ({files}).", file=o)
    print(
        f"      Reloaded it with PeftModel.from_pretrained on a freshly loaded base: "
        f"{sum(r.reloaded == r.after for r in rows)}/{len(rows)} answers identical, max logit difference {diff:.2e}"
        f"{'' if matches else '  <-- MISMATCH'}.",
        file=o,
    )
    print(f"[6/6] Metrics over {len(requests)} edit(s) (EasyEdit definitions; pre-edit state from the disabled adapter):\n", file=o)
    _table(metrics_rows(metrics), o)
    return DemoResult(out_dir=out_dir, rows=rows, metrics=metrics, timings=timings, reload_matches=matches,
                      max_logit_diff=float(diff), world_cached=True)


#: Measured: the default toy world trains in ~55 s on one idle core (one torch thread, whatever the machine).
_BUILD_ESTIMATE = "about a minute on an idle CPU core"


def _load_world(seed: int, cache_dir: Any, o: TextIO) -> tuple[Any, bool]:
    """``(toy world, was it cached)``; a first build says so and shows its progress (a bar on a terminal,
    else a log line every 10% of the training steps)."""
    import logging

    from .testing import toy_world_module as tw

    root = tw.default_cache_root() if cache_dir is None else os.fspath(cache_dir)
    cached = os.path.isdir(os.path.join(os.fspath(root), tw.cache_key(seed, tw.DEFAULT_N_ENTITIES)))
    if cached:
        return tw.toy_world(seed, cache_dir=cache_dir), True
    print(f"[1/6] Training the toy world (first run only, {_BUILD_ESTIMATE}; cached in {root})...", file=o, flush=True)
    build_logger = logging.getLogger(tw.__name__)
    level = build_logger.level
    if not build_logger.isEnabledFor(logging.INFO):
        build_logger.setLevel(logging.INFO)  # the progress lines; the CLI's handler prints them to stderr
    try:
        return tw.toy_world(seed, cache_dir=cache_dir), False
    finally:
        build_logger.setLevel(level)


@one_thread()
def save_demo_model(
    directory: str | os.PathLike, *, seed: int = 0, cache_dir: str | os.PathLike | None = None, n_edits: int = 1,
    stream: TextIO | None = None,
) -> str:
    """``ldke demo --save DIR``: the toy world's model and processor in one folder (what ``ldke edit``,
    ``eval`` and ``locate`` take), with ``n_edits`` example requests (``requests.jsonl``, images under
    ``images/``) and the world's negative pool (``negatives.jsonl``). Returns the folder."""
    from .tuner.io import atomic_dir
    from .requests import save_jsonl, save_negatives

    o = stream or sys.stdout
    world, _ = _load_world(seed, cache_dir, o)
    directory = os.fspath(directory)
    with atomic_dir(directory) as stage:
        world.model.save_pretrained(stage)
        world.processor.save_pretrained(stage)
        save_jsonl(world.edit_requests(n_edits, seed=seed), os.path.join(stage, "requests.jsonl"))
        save_negatives(world.negative_pool(), os.path.join(stage, "negatives.jsonl"))
    print(f"Saved the toy model and its processor to {directory}, with {n_edits} example edit request(s) "
          f"(requests.jsonl) and the router's negatives (negatives.jsonl). Try:\n"
          f"  ldke edit {directory} {os.path.join(directory, 'requests.jsonl')} "
          f"--negatives {os.path.join(directory, 'negatives.jsonl')} --out pack\n"
          f"  ldke eval {directory} pack {os.path.join(directory, 'requests.jsonl')}", file=o)
    return directory
