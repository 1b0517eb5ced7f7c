"""Inference overhead of LDKE routing: base model vs the same model with a 1-edit and a 1000-edit pack.

What is timed: ``generate`` (prefill + ``--new-tokens`` greedy tokens, KV cache on) and a bare prefill
forward, at batch 1 and 8, for three models built from the same weights:

* ``base``: the plain transformers model;
* ``ldke-1`` / ``ldke-1000``: the model with an LDKE pack of 1 / 1000 edit slots. Each slot edits one
  decoder layer above the probe layer (chosen at random, as Fast Localization would spread edits);
  keys and deltas are random. Routing is live: slot 0's keys are the exact probe features of the
  first prompt, so those rows route (and get a delta); the other rows route nowhere.

Repetitions of base / ldke-1 / ldke-1000 are interleaved (so drift in a shared machine's speed hits
all three alike) and medians are reported, with the ratio to the base model measured in the same run.
A breakdown times the pieces LDKE adds: feature pooling at the probe layer, the router decision
(``cdist`` against K keys), and one wrapped layer's forward in a decode step.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/inference_overhead.py [--reps 21] [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "inference_overhead.json"


# ---------------------------------------------------------------------- model and inputs


def load_model(kind: str, seed: int) -> tuple[Any, Any, list[Any], list[str], str]:
    """``(model, processor, images, prompts, description)``."""
    if kind == "toy_world":
        from ldke_peft.testing.toy_world import toy_world

        world = toy_world(seed=seed)
        images = [world.render(e, view=v) for v in range(2) for e in world.entities[:4]]
        prompts = [q for r in world.relations for q in world.question_bank(r)[:2]]
        desc = "toy_world (LLaVA, Llama text model)"
        return world.model, world.processor, images, prompts, desc
    if kind == "smol_llava":
        from ldke_peft.bench.countries import RELATIONS
        from ldke_peft.bench.smol_llava import emblems_from_meta, load_smol_llava

        model, proc, meta = load_smol_llava()
        emblems = emblems_from_meta(meta)
        images = [emblems.view_image(i, 0, "eval") for i in range(8)]
        prompts = [r.image_question for r in RELATIONS.values()] * 2
        return model, proc, images, prompts, "smol-llava: the benchmark MLLM (SmolLM2-135M-Instruct in a LLaVA)"
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    from ldke_peft.testing.tiny import TINY_TEXT, tiny_model

    model, proc = tiny_model("llava", seed=seed)
    cfg = copy.deepcopy(model.config)
    if kind == "tiny":
        text = dict(TINY_TEXT, hidden_size=64, intermediate_size=256, num_hidden_layers=6)
        desc = "tiny llava (random weights; text: 6 layers, hidden 64)"
    else:  # the text-model shape of SmolLM2-135M (the realistic benchmark MLLM's LM), random weights
        text = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64)
        desc = "llava with a SmolLM2-135M-shaped text model (random weights; 30 layers, hidden 576, vocab 400)"
    cfg.text_config.update(text)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    images = [Image.new("RGB", (32, 32), (30 * i % 255, 60 * i % 255, 90 * i % 255)) for i in range(8)]
    prompts = ["What is the capital of the country shown in the image?", "Which language is spoken there?"] * 4
    return model, proc, images, prompts, desc


def describe(model: Any) -> dict[str, Any]:
    t = model.config.text_config
    return {
        "model_type": model.config.model_type,
        "text_layers": t.num_hidden_layers,
        "hidden_size": t.hidden_size,
        "intermediate_size": getattr(t, "intermediate_size", None),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def make_pack(base: Any, processor: Any, n_slots: int, anchor: tuple[Any, str], rank: int, seed: int,
              text_anchors: int = 0) -> Any:
    """``base`` (a deep copy) with an ``n_slots`` pack; slot 0 fires exactly on ``anchor``. With
    ``text_anchors``, every slot also keeps that many random textual anchors (half in scope, half out; slot
    0's in-scope ones include ``anchor``'s own textual feature, so it still fires) and an asked-for word: the veto
    and the word match are scored."""
    from peft import get_peft_model

    from ldke_peft import LDKEConfig, family_of
    from ldke_peft.tuner.model import default_probe_layer
    from ldke_peft.tuner.probe_features import collect_probe_features

    model = copy.deepcopy(base)
    n_layers = family_of(model).num_layers(model)
    probe = default_probe_layer(n_layers)
    g = torch.Generator().manual_seed(seed)
    layers = torch.randint(probe + 1, n_layers, (n_slots,), generator=g).tolist()
    cfg = LDKEConfig(slot_layers=[[int(l)] for l in layers], probe_layer=probe, rank=rank)
    if cfg.router_text_encoder:
        from ldke_peft import EditRequest
        from ldke_peft.editing.scope_fit import _prepare_text_key

        # what edit() records: the encoder's width and the chat frame around a question (so the encoder reads
        # the question, not the system prompt)
        _prepare_text_key(cfg, family_of(model), model, processor, EditRequest(image=anchor[0], prompt=anchor[1], target="x"))
    pm = get_peft_model(model, cfg)
    pm.eval()
    router = pm.base_model.router("default")
    v, t, _ = collect_probe_features(pm, processor, probe, [anchor[0]], [anchor[1]])
    zv, zt = router.project(v, t)
    with torch.no_grad():
        # random keys far from anything real, with small radii: they never fire, but are scored
        router.keys_v.copy_(torch.randn(router.keys_v.shape, generator=g) * 10)
        router.keys_t.copy_(torch.randn(router.keys_t.shape, generator=g) * 10)
        router.radius_v.fill_(0.05)
        router.radius_t.fill_(0.05)
        router.set_slot(0, key_v=zv[0], key_t=zt[0], radius_v=0.05, radius_t=0.05)
        if text_anchors:
            half = max(1, text_anchors // 2)
            rows = torch.randn(n_slots * 2 * half, router.proj_dim, generator=g) * 10
            rows[0] = zt[0]
            slot = torch.arange(n_slots).repeat_interleave(2 * half)
            pos = torch.arange(2 * half).repeat(n_slots) < half
            for name, val in (("anchors_t", rows), ("anchors_slot", slot), ("anchors_pos", pos.float())):
                router.register_buffer(name, val)
            assert router.num_anchors == len(rows)
            # every slot asks about a word (router_asked_word), so each routed question is also matched against them
            router.slot_words = [f"w{k}" for k in range(n_slots)]
        for layer in pm.base_model.ldke_layers("default").values():
            if "default" in layer.ldke_B:
                layer.ldke_B["default"].normal_(generator=g)
    return pm


# ---------------------------------------------------------------------- timing


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_both(fn: Callable[[], Any]) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)``. On a shared machine the CPU time is the steadier
    measure (other processes' load inflates wall time, not this process's CPU time)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def _sync() -> None:
    """Wait for queued GPU kernels, so that a timing covers the work and not only its launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def run_generate(model: Any, inputs: dict[str, Any], new_tokens: int) -> None:
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    _sync()


def run_prefill(model: Any, inputs: dict[str, Any]) -> None:
    with torch.no_grad():
        model(**inputs)
    _sync()


def breakdown(pm: Any, batch: int, seq: int, reps: int = 50) -> dict[str, float]:
    """Microseconds per call of the pieces LDKE adds, on synthetic tensors of the real shapes."""
    from ldke_peft.tuner.routing_state import pool_features

    router = pm.base_model.router("default")
    d = router.mu_v.shape[0]
    dev = router.mu_v.device
    h = torch.randn(batch, seq, d, device=dev)
    im = torch.zeros(batch, seq, dtype=torch.bool, device=dev)
    im[:, 2:6] = True
    pm_mask = torch.ones(batch, seq, dtype=torch.bool, device=dev)
    feats = pool_features(h, im, pm_mask)
    d_t = int(router.mu_t.shape[0])
    if feats[1].shape[1] != d_t:  # a sentence-encoder textual key: its width (the question_key_us row times it)
        feats = (feats[0], torch.nn.functional.normalize(torch.randn(batch, d_t, device=dev), dim=-1), feats[2])

    def med(fn):
        for _ in range(5):
            fn()
        return 1e6 * statistics.median(timed(lambda: (fn(), _sync())) for _ in range(reps))

    layers = pm.base_model.ldke_layers("default")
    edited = next(l for l in layers.values() if "default" in l.ldke_A)
    x = torch.randn(batch, 1, edited.in_features, device=dev,
                    dtype=edited.base_layer.weight.dtype)
    state = edited._routing
    saved = dict(state.slots)
    state.slots["default"] = torch.zeros(batch, dtype=torch.long, device=dev)  # every row routed to slot 0 (worst case)
    k0 = edited.hosted_slots("default")
    if 0 not in k0:
        state.slots["default"] = torch.full((batch,), k0[0], dtype=torch.long, device=dev)
    with torch.no_grad():
        out = {
            "pool_features_us": med(lambda: pool_features(h, im, pm_mask)),
            "route_us": med(lambda: router.route(*feats)),
            "decode_layer_base_us": med(lambda: edited.base_layer(x)),
            "decode_layer_ldke_routed_us": med(lambda: edited(x)),
        }
        state.slots["default"] = torch.full((batch,), -1, dtype=torch.long, device=dev)
        out["decode_layer_ldke_unrouted_us"] = med(lambda: edited(x))
    state.slots.clear()
    state.slots.update(saved)
    out["num_slots"] = router.num_slots
    out["wrapped_layers"] = len(layers)
    return out


def question_key_us(pm: Any, fam: Any, inputs: dict[str, Any], reps: int = 20) -> float:
    """Microseconds per prefill of the textual key (decode the questions, strip the frame, encode; no memo)."""
    from ldke_peft.tuner.model import routing_state_of
    from ldke_peft.tuner.question_key import load_encoder, question_texts

    router = pm.base_model.router("default")
    ids = inputs["input_ids"]
    root = pm.base_model.model
    mask = inputs["attention_mask"].bool() & ~fam.image_mask(root, ids)
    tok = routing_state_of(root).tokenizer
    enc = load_encoder(router.text_encoder)
    fn = lambda: enc.encode(question_texts(tok, ids, mask, router.text_frame), device=ids.device)  # noqa: E731
    for _ in range(3):
        fn()
    return 1e6 * statistics.median(timed(fn) for _ in range(reps))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", choices=["toy_world", "tiny", "smollm-shape", "smol_llava"], default=None,
        help="default: toy_world if available (else tiny); smollm-shape = a 30-layer, hidden-576 text model; "
        "smol_llava = the benchmark MLLM (ldke bench --prepare builds it)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 1000])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=21, help="interleaved rounds (the machine's noise is ~1%%)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prefill-reps", type=int, default=3, help="prefill timings per generate timing")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--text-anchors", type=int, default=0,
                    help="random textual anchors per slot (router_neighbour_questions packs keep ~50-150)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    kind = args.model
    if kind is None:
        try:
            import ldke_peft.testing.toy_world  # noqa: F401

            kind = "toy_world"
        except ImportError:
            kind = "tiny"
    import ldke_peft
    from ldke_peft import family_of

    t0 = time.perf_counter()
    base, proc, images, prompts, desc = load_model(kind, args.seed)
    base = base.eval()
    load_s = time.perf_counter() - t0
    fam = family_of(base)
    anchor = (images[0], prompts[0])
    models: dict[str, Any] = {"base": base}
    for n in args.slots:
        # packs are built on the CPU (their random tables come from a CPU generator), then moved
        models[f"ldke-{n}"] = make_pack(base, proc, n, anchor, args.rank, args.seed + n, args.text_anchors).to(args.device)
    models["base"] = base = base.to(args.device)
    text_encoder = models[f"ldke-{args.slots[0]}"].peft_config["default"].router_text_encoder
    if text_encoder:
        from ldke_peft.tuner.question_key import load_encoder

        # the same prompts repeat in every round: without this the question-key memo would answer them all
        # and the encoder's cost would never be timed
        load_encoder(text_encoder).memo_size = 0

    results: dict[str, Any] = {"rows": []}
    for bs in args.batch_sizes:
        # rows alternate: the anchor (routes to slot 0) and other image/question pairs (route nowhere)
        imgs = [images[0] if i % 2 == 0 else images[1 + (i // 2) % (len(images) - 1)] for i in range(bs)]
        prs = [prompts[0] if i % 2 == 0 else prompts[1 + (i // 2) % (len(prompts) - 1)] for i in range(bs)]
        inputs = fam.build_inputs(proc, imgs, prs).to(args.device).inputs
        for name, m in models.items():
            for _ in range(args.warmup):
                run_generate(m, inputs, args.new_tokens)
            if name != "base":
                decided = m.base_model.last_routing("default").tolist()
                assert decided[0] == 0, f"{name}: the anchor row did not route ({decided})"
        kinds = ("generate", "prefill", "generate_cpu", "prefill_cpu")
        times: dict[str, dict[str, list[float]]] = {n: {k: [] for k in kinds} for n in models}
        for _ in range(args.reps):
            for name, m in models.items():  # interleaved
                w, c = timed_both(lambda: run_generate(m, inputs, args.new_tokens))
                times[name]["generate"].append(w)
                times[name]["generate_cpu"].append(c)
                for _ in range(args.prefill_reps):
                    w, c = timed_both(lambda: run_prefill(m, inputs))
                    times[name]["prefill"].append(w)
                    times[name]["prefill_cpu"].append(c)
        med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
        for name in models:
            row = {"batch": bs, "model": name, "prompt_tokens": int(inputs["input_ids"].shape[1])}
            for k in kinds:
                row[f"{k}_s"] = med[name][k]
                row[f"{k}_ratio"] = med[name][k] / med["base"][k]
                row[f"{k}_all_s"] = times[name][k]
            if name != "base":
                # the same ratio per interleaved round (ldke and base timed back to back), whose median
                # and quartiles show how much of a difference is the machine drifting
                for k in ("generate", "generate_cpu"):
                    per_round = sorted(a / b for a, b in zip(times[name][k], times["base"][k]))
                    row[f"{k}_paired_ratio"] = statistics.median(per_round)
                    row[f"{k}_paired_iqr"] = [_quantile(per_round, 0.25), _quantile(per_round, 0.75)]
                row["routing"] = models[name].base_model.last_routing("default").tolist()
                row["breakdown"] = breakdown(models[name], bs, int(inputs["input_ids"].shape[1]))
                if text_encoder:
                    row["breakdown"]["question_key_us"] = question_key_us(models[name], fam, inputs)
            results["rows"].append(row)

    results["config"] = {
        "model": desc,
        **describe(base),
        "slots": args.slots,
        "rank": args.rank,
        "text_anchors_per_slot": args.text_anchors,
        "text_encoder": text_encoder,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "warmup": args.warmup,
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "ldke_peft": ldke_peft.__version__,
        "load_s": load_s,
    }
    if args.device.startswith("cuda"):
        results["config"]["gpu"] = torch.cuda.get_device_name(0)

    print(f"\nLDKE inference overhead — {desc}, {args.device}, {torch.get_num_threads()} thread(s), "
          f"median of {args.reps} interleaved reps, prefill + {args.new_tokens} new tokens\n")
    print("| batch | model | prompt tok | generate wall (ms) | × base | generate CPU (ms) | × base "
          "| prefill wall (ms) | × base | prefill CPU (ms) | × base |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["rows"]:
        cells = " | ".join(f"{1e3 * r[k + '_s']:.2f} | {r[k + '_ratio']:.3f}"
                           for k in ("generate", "generate_cpu", "prefill", "prefill_cpu"))
        print(f"| {r['batch']} | {r['model']} | {r['prompt_tokens']} | {cells} |")
    print("\nPer-round generate ratios (each round times base and LDKE back to back): median [quartiles]\n")
    print("| batch | model | wall × base | CPU × base |")
    print("|---:|---|---|---|")
    for r in results["rows"]:
        if "generate_paired_ratio" in r:
            cells = " | ".join(f"{r[k + '_paired_ratio']:.3f} [{r[k + '_paired_iqr'][0]:.3f}, {r[k + '_paired_iqr'][1]:.3f}]"
                               for k in ("generate", "generate_cpu"))
            print(f"| {r['batch']} | {r['model']} | {cells} |")
    try:
        load = os.getloadavg()
        results["config"]["loadavg_at_end"] = load
        print(f"\nload average at the end: {load[0]:.2f} on {os.cpu_count()} CPUs")
    except OSError:
        pass
    print("\nBreakdown (µs per call; decode layer = one wrapped MLP projection, one decode step):\n")
    print("| batch | pack | pool features | route (cdist) | layer base | layer LDKE routed | layer LDKE unrouted |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in results["rows"]:
        if "breakdown" in r:
            b = r["breakdown"]
            print(f"| {r['batch']} | {r['model']} | {b['pool_features_us']:.0f} | {b['route_us']:.0f} | "
                  f"{b['decode_layer_base_us']:.0f} | {b['decode_layer_ldke_routed_us']:.0f} | "
                  f"{b['decode_layer_ldke_unrouted_us']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
