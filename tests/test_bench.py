"""The MKE benchmark harness: baselines (FT-L, LoRA, GRACE, IKE), the MLLM data builder, the runner,
report bars and plots. Baselines edit the real toy-world LLaVA; the data builder runs on a meta.json
written as the benchmark MLLM's build writes it (no 135M model is loaded here)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict

import pytest
import torch
from PIL import Image

from ldke_peft.bench import run as bench_run
from ldke_peft.bench.baselines import (
    GraceCodebook,
    IKEModel,
    apply_ft_l,
    apply_grace,
    apply_ike,
    apply_lora,
    grace_default_layer,
)
from ldke_peft.bench.countries import COUNTRIES, RELATIONS, answer_matches, country_by_name
from ldke_peft.bench.merge import MergeError, merge_runs
from ldke_peft.bench.mke import (
    PORTABILITY_QUESTIONS,
    build_mke_requests,
    caller_consequences,
    editor_view,
    export_mke,
    negative_pool,
    usable_facts,
)
from ldke_peft.bench.report import METHOD_KEYS, RESULT_KEYS, bars
from ldke_peft.bench.run import model_digest
from ldke_peft.bench.smol_llava import DEFAULT_LOOKALIKE_PAIRS
from ldke_peft.families import family_of
from ldke_peft.metrics import collect_pre, compute_metrics
from ldke_peft.requests import PROBE_FIELDS, load_easyedit, load_jsonl


@pytest.fixture(scope="module")
def edits(world):
    return world.edit_requests(2, seed=1)


def _target_logprob(model, processor, r) -> float:
    fam = family_of(model)
    built = fam.build_inputs(processor, [r.image], [r.prompt], [r.target])
    with torch.no_grad():
        logits = model(**built.inputs).logits[0, :-1].float()
    ids = built.input_ids[0, 1:]
    sel = built.target_mask[0, 1:]
    return float(torch.log_softmax(logits, -1)[sel].gather(1, ids[sel][:, None]).sum())


def _reliability(model, processor, r) -> float:
    return compute_metrics(model, processor, [editor_view(r)], None, generate=False)["reliability"]


# ---------------------------------------------------------------------- baselines


def test_ft_l_recipe_moves_the_target_and_restores_bitwise(world, edits):
    r = edits[0]
    digest = model_digest(world.model)
    before = _target_logprob(world.model, world.processor, r)
    grad_flags = [p.requires_grad for p in world.model.parameters()]
    model, restore = apply_ft_l(world.model, world.processor, [editor_view(r)], layer="mid")
    after = _target_logprob(model, world.processor, r)
    # the published recipe (lr 5e-4, L-inf box 5e-4, 25 steps) barely moves a toy model: it must move it up
    assert after > before
    assert restore.info["layer"] == family_of(world.model).num_layers(world.model) // 2
    restore()
    assert model_digest(world.model) == digest
    assert [p.requires_grad for p in world.model.parameters()] == grad_flags
    # unconstrained and with FT-M's objective it does flip the answer
    assert _reliability(world.model, world.processor, r) == 0.0
    model, restore = apply_ft_l(world.model, world.processor, [editor_view(r)], layer="located", norm_constraint=None,
                                objective="target_new", lr=1e-2)
    assert _reliability(model, world.processor, r) == 1.0
    restore()
    assert model_digest(world.model) == digest


def test_lora_edits_and_unloads_bitwise(world, edits):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    r = edits[0]
    digest = model_digest(world.model)
    assert _reliability(world.model, world.processor, r) == 0.0
    model, restore = apply_lora(world.model, world.processor, [editor_view(r)])
    try:
        assert isinstance(model, PeftModel)
        names = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
        L = family_of(world.model).num_layers(world.model)
        assert len(names) == 2 * L and all(".language_model.layers." in n for n in names)  # never the vision tower
        assert restore.info["loss_last"] < restore.info["loss_first"]
        assert restore.edit_bytes > 0
    finally:
        base = restore()  # the world is shared by the session: a failed assertion must not leave LoRA on it
    assert base is world.model and not isinstance(base, PeftModel)
    assert model_digest(world.model) == digest
    assert not any("lora" in n for n, _ in world.model.named_modules())
    # upstream's 5 SGD steps lower the loss but do not always flip a toy model's answer, and with upstream's
    # decay (0.9 per step: the learning rates sum to 10x lr however many steps) the loss can level off above
    # the flip on a world built on other hardware; 20 steps at a constant rate flip it
    model, restore = apply_lora(world.model, world.processor, [editor_view(r)], num_steps=20, lr_decay=1.0)
    try:
        assert _reliability(model, world.processor, r) == 1.0
    finally:
        restore()
    assert model_digest(world.model) == digest


def test_grace_codebook_edits_sequentially_and_unhooks(world, edits):
    r0, r1 = edits
    digest = model_digest(world.model)
    pre = collect_pre(world.model, world.processor, [r0])
    model, restore = apply_grace(world.model, world.processor, [editor_view(r0)])
    book = model.__dict__["_bench_grace"]
    assert isinstance(book, GraceCodebook) and len(book.keys) == 1
    assert book.layer == grace_default_layer(family_of(world.model).num_layers(world.model))
    m = compute_metrics(model, world.processor, [r0], pre, generate=True)
    assert m["reliability"] == 1.0 and m["exact_match"] == 1.0
    assert m["t_locality"] == 1.0 and m["m_locality"] == 1.0  # other inputs are outside the radius
    # a second edit joins the same codebook; the first still holds
    model, restore = apply_grace(model, world.processor, [editor_view(r1)])
    assert len(book.keys) == 2
    assert _reliability(model, world.processor, r0) == 1.0
    assert _reliability(model, world.processor, r1) == 1.0
    assert "_bench_grace" not in dict(world.model.named_modules())  # a hook, not a submodule
    restore()
    assert model_digest(world.model) == digest
    assert not world.model.__dict__.get("_bench_grace")
    assert _reliability(world.model, world.processor, r0) == 0.0


def test_ike_puts_the_fact_in_context_with_aligned_logits(world, edits):
    r = edits[0]
    fam = family_of(world.model)
    tok = fam.tokenizer(world.processor)
    model, restore = apply_ike(world.model, world.processor, [editor_view(r)])
    assert isinstance(model, IKEModel) and family_of(model) is fam
    assert "New Fact:" in model.demo_text and r.target in model.demo_text
    # two rows of different lengths: left padding is moved in front of the demonstration
    built = fam.build_inputs(world.processor, [r.image, None], [r.prompt, "What is the capital of " + r.subject + "?"],
                             [r.target, r.target])
    with torch.no_grad():
        got = model(**built.inputs).logits
    assert got.shape == built.input_ids.shape + (got.shape[-1],)
    for b in range(2):
        real = built.inputs["attention_mask"][b].bool()
        ids = torch.cat([model.demo_ids[0], built.input_ids[b][real]])[None]
        row = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if b == 0:
            row["pixel_values"] = built.inputs["pixel_values"][:1]
        with torch.no_grad():
            ref = world.model(**row).logits[0, model.demo_ids.shape[1]:]
            plain = world.model(input_ids=built.input_ids[b][real][None]).logits[0] if b == 1 else None
        torch.testing.assert_close(got[b][real], ref, atol=1e-4, rtol=1e-4)
        if plain is not None:
            assert not torch.allclose(got[b][real], plain, atol=1e-3)  # the demonstration is really read
    out = model.generate(**fam.build_inputs(world.processor, [r.image], [r.prompt]).inputs, max_new_tokens=2,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == fam.build_inputs(world.processor, [r.image], [r.prompt]).input_ids.shape[1] + 2
    assert restore() is world.model


# ---------------------------------------------------------------------- MLLM data builder


def _fake_meta(n_entities: int = 30) -> dict:
    """A meta.json as ``build_smol_llava`` writes it (answers made up: no model is run here)."""
    countries = list(COUNTRIES)[:n_entities]
    names = [c.name for c in countries]
    paired = [p for p in DEFAULT_LOOKALIKE_PAIRS if p[0] in names and p[1] in names]
    return {
        "countries": [{"name": c.name, "prompt_name": c.prompt_name, "split": "edit",
                       "facts": {r: list(c.answers(r)) for r in RELATIONS}} for c in countries],
        "relations": {r: asdict(rel) for r, rel in RELATIONS.items()},
        "text_known": {r: names for r in RELATIONS},
        "image_known": {r: names[::2] for r in RELATIONS},
        "answers": {r: {c.name: {"text": f"The {r} of {c.name} is {c.answer(r)}. More text.",
                                 "image": f"It is {c.answer(r)}."} for c in countries} for r in RELATIONS},
        "lookalike_pairs": [list(p) for p in paired],
        "emblems": {"seed": 0, "size": 64},
        "base_lm": {"name": "fake"}, "n_image_tokens": 4, "build_version": "test",
    }


def test_mke_requests_cover_every_probe_kind(tmp_path):
    meta = _fake_meta()
    reqs = build_mke_requests(meta, 12, seed=3)
    assert len(reqs) == 12
    again = build_mke_requests(meta, 12, seed=3)
    assert [(r.subject, r.relation, r.target) for r in reqs] == [(r.subject, r.relation, r.target) for r in again]
    assert len({r.subject for r in reqs}) >= 10  # round robin over entities
    for r in reqs:
        truth = dict((c["name"], c["facts"]) for c in meta["countries"])[r.subject][r.relation]
        assert r.subject in meta["image_known"][r.relation]
        assert not answer_matches(r.target, tuple(truth)) and r.ground_truth == truth[0]
        assert len(r.rephrase_prompts) >= 2 and r.prompt not in r.rephrase_prompts
        assert len(r.rephrase_images) >= 2 and isinstance(r.image, Image.Image)
        assert len(r.locality) == 2 and all(p.image is None for p in r.locality)
        assert len(r.m_locality) == 2 and all(p.image is not None for p in r.m_locality)
        kinds = [p.kind for p in r.coupled]
        assert kinds.count("same_image_other_question") == len(RELATIONS) - 1
        # coupled "other question" probes use a wording that is not in the editors' negative pool
        pool_qs = {q for q, _ in negative_pool(meta, n_images=2).questions}
        assert not {p.prompt for p in r.coupled if p.kind == "same_image_other_question"} & pool_qs
        if r.relation in PORTABILITY_QUESTIONS and r.portability:
            owner = r.portability[0].answer
            assert dict((c["name"], c["facts"]) for c in meta["countries"])[owner][r.relation][0] == r.target
        view = editor_view(r)
        assert not (view.rephrase_prompts or view.rephrase_images or view.locality or view.coupled or view.portability)
    assert any(p.kind == "lookalike_same_question" for r in reqs for p in r.coupled)
    assert any(r.portability for r in reqs)

    paths = export_mke(reqs, tmp_path / "mke")
    back = load_jsonl(paths["jsonl"])
    assert [(b.prompt, b.target, len(b.coupled), len(b.portability)) for b in back] == [
        (r.prompt, r.target, len(r.coupled), len(r.portability)) for r in reqs]
    ee = load_easyedit(paths["easyedit"], image_root=tmp_path / "mke")
    assert [(e.prompt, e.target, e.ground_truth) for e in ee] == [(r.prompt, r.target, r.ground_truth) for r in reqs]
    assert all(e.locality and e.m_locality and e.rephrase_images for e in ee)
    with pytest.raises(ValueError, match="n must be"):
        build_mke_requests(meta, 0)
    # a build that recorded the facts answered right from every view restricts the edits to those
    robust = dict(meta, editable={"capital": ["France", "Germany"], "currency": ["Japan"]})
    assert usable_facts(robust) == [("France", "capital"), ("Germany", "capital"), ("Japan", "currency")]


def test_a_callers_consequences_follow_from_the_new_fact_in_wordings_no_probe_uses():
    """``ldke_consequences`` hands the editor what follows from the edit as more edits of the same call; they
    must be the world's consequences of the *new* answer and never a wording a probe is scored on."""
    meta = _fake_meta(len(COUNTRIES))  # the built MLLM knows every country: owners are the world's
    facts = {c["name"]: c["facts"] for c in meta["countries"]}
    reqs = build_mke_requests(meta, 12, seed=3)
    seen = 0
    for r in reqs:
        edits = caller_consequences(r)
        assert (edits[0].prompt, edits[0].target, edits[0].image) == (r.prompt, r.target, r.image)
        assert not (edits[0].rephrase_prompts or edits[0].coupled or edits[0].portability)  # no probe
        stated = [c.prompt for c in edits[0].consequences] + [e.prompt for e in edits[1:]]
        probed = {r.prompt, *r.rephrase_prompts} | {p.prompt for f in PROBE_FIELDS for p in getattr(r, f)}
        assert not set(stated) & probed
        owners = [n for n, f in facts.items() if f[r.relation][0] == r.target]
        if r.relation not in PORTABILITY_QUESTIONS or len(owners) != 1:
            assert len(edits) == 1 and not edits[0].consequences
            continue
        (two_hop,), reverse = edits[0].consequences, edits[1]
        assert two_hop.image is None and two_hop.answer == owners[0]  # asked on the edit's own image
        assert reverse.image is None and r.target in reverse.prompt and len(edits) == 2
        assert reverse.target == country_by_name(r.subject).prompt_name
        assert len(caller_consequences(r, ("two_hop",))) == 1
        # the probes of the same kinds ask the same facts in other words
        kinds = {p.kind.split(":")[0]: p for p in r.portability}
        assert kinds["two_hop"].answer == two_hop.answer and kinds["presupposed"].answer == two_hop.answer
        assert kinds["presupposed"].image is r.image and r.target in kinds["presupposed"].prompt
        seen += 1
    assert seen >= 3
    assert [e.consequences for e in caller_consequences(dataclasses.replace(reqs[0], relation="continent"))] == [[]]


def test_a_text_only_consequence_can_go_into_a_pack_of_its_own(world, world_pool):
    """``ldke_consequences_own_pack``: the text-only edits of a call go into a second pack beside the image
    edit's; both answer, and the bench's restore gives the base model back bit for bit."""
    from ldke_peft import EditRequest

    r = editor_view(world.edit_requests(1, seed=4)[0])
    q = world.text_prompt("capital_of", r.subject)
    target = next(c for c in world.answer_vocab("capital_of") if c != world.ask(None, q))
    digest = model_digest(world.model)
    pm, restore = bench_run.apply_ldke(world.model, world.processor, [r, EditRequest(prompt=q, target=target)],
                                       overrides=bench_run.LDKE_VARIANTS["ldke_consequences_own_pack"],
                                       pool=world_pool)
    try:
        assert {a: c.num_slots for a, c in pm.peft_config.items()} == {"default": 1, "text": 1}
        assert pm.peft_config["text"].edits[0]["prompt"] == q and pm.base_model.active_adapters == ["default", "text"]
        fam = family_of(pm)
        tok = fam.tokenizer(world.processor)
        for image, prompt, want in ((r.image, r.prompt, r.target), (None, q, target)):
            built = fam.build_inputs(world.processor, [image], [prompt]).to(world.model.device)
            out = pm.generate(**built.inputs, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            assert tok.decode(out[0, built.input_ids.shape[1]:], skip_special_tokens=True).strip() == want
        assert restore.edit_bytes > 0
    finally:
        restore()
    assert model_digest(world.model) == digest


# ---------------------------------------------------------------------- runner, report, plots


def test_runner_writes_the_schema_report_and_plots(tmp_path, world):
    out = tmp_path / "bench"
    # routed-inference overhead as benchmarks/inference_overhead.py writes it (worst batch size is reported)
    overhead = tmp_path / "inference_overhead.json"
    overhead.write_text(json.dumps({"rows": [
        {"batch": 1, "model": "base", "generate_ratio": 1.0}, {"batch": 1, "model": "ldke-1", "generate_ratio": 1.02},
        {"batch": 8, "model": "ldke-1", "generate_ratio": 1.04}, {"batch": 1, "model": "ldke-1000", "generate_ratio": 1.2},
    ], "config": {"model": "tiny"}}))
    rc = bench_run.main(["--suite", "toy", "--n-edits", "1", "--methods", "ldke,ft_l,lora,grace,ike", "--sequential", "1",
                         "--localization", "1", "--positions", "1", "--speed", "1", "--overhead-file", str(overhead),
                         "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert tuple(res) == RESULT_KEYS
    assert res["suite"] == "toy" and res["n_edits"] == 1
    assert list(res["methods"]) == ["ldke", "ft_l", "lora", "grace", "ike"]
    for m in res["methods"].values():
        assert tuple(m) == METHOD_KEYS
    assert set(res["sequential"]) == {"ldke", "grace", "lora"} and all(list(v) == ["1"] for v in res["sequential"].values())
    assert set(res["localization"]) == {"top1_agreement", "spearman", "speedup"}
    assert set(res["edit_speed"]) == {"cached_vs_full_speedup"}
    assert res["inference_overhead"] == {"1": 1.04, "1000": 1.2}
    assert res["methods"]["ldke"]["reliability"] == 1.0
    for png in ("metrics.png", "sequential.png", "localization_heatmap.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    report = (out / "report.md").read_text()
    assert "| bar | value | status | detail |" in report
    # portability per kind of related question: the toy world's composed questions are one kind
    det = json.loads((out / "details.json").read_text())
    kinds = det["methods"]["ldke"]["summary"]["portability_by_kind"]
    assert set(kinds) == {"composed"} and kinds["composed"] == res["methods"]["ldke"]["portability"]
    assert "## Portability by kind" in report and "| method | composed |" in report
    for b in bars(res):
        assert f"| {b['bar']} |" in report
    assert "| routed inference overhead (1000 edits) <= 1.05x | 1.200 | MISS |" in report
    # edit time per phase: LDKE's four phases add up to (at most) its edit time; a baseline is one phase
    details = json.loads((out / "details.json").read_text())
    t = details["methods"]["ldke"]["timing"]
    phases = t["phase_seconds_median"]
    assert set(phases) == {"localize", "capture", "delta_fit", "router_fit"} and all(v >= 0 for v in phases.values())
    assert sum(phases.values()) <= t["edit_seconds_median"] * 1.01
    assert t["edit_seconds_p90"] >= t["edit_seconds_median"] > 0
    assert t["fit_tflop_7b_median"] > t["fit_tflop_median"] > 0 and t["projected_7b_edit_seconds_median"] > t["edit_seconds_median"]
    assert set(details["methods"]["grace"]["timing"]["phase_seconds_median"]) == {"edit"}
    assert "## Edit time (wall seconds per single edit, this run)" in report
    assert f"| ldke | {t['edit_seconds_median']:.2f} |" in report

    # a later overhead measurement (idle machine) refreshes the report without rerunning anything
    overhead.write_text(json.dumps({"rows": [{"batch": 1, "model": "ldke-1", "generate_ratio": 1.01},
                                             {"batch": 8, "model": "ldke-1000", "generate_ratio": 1.03}]}))
    before = {k: v for k, v in res.items() if k != "inference_overhead"}
    assert bench_run.main(["--refresh-overhead", str(out), "--overhead-file", str(overhead), "--no-plots"]) == 0
    res2 = json.loads((out / "results.json").read_text())
    assert res2["inference_overhead"] == {"1": 1.01, "1000": 1.03}
    assert {k: v for k, v in res2.items() if k != "inference_overhead"} == before
    assert "| routed inference overhead (1000 edits) <= 1.05x | 1.030 | PASS |" in (out / "report.md").read_text()


def test_runs_made_in_parallel_merge_into_one_report(tmp_path):
    """`--methods` split over processes, then `--merge`: one table, the same cases, nothing counted twice."""
    common = ["--suite", "toy", "--localization", "0", "--speed", "0", "--no-overhead", "--no-plots", "--no-generate"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert bench_run.main([*common, "--n-edits", "2", "--methods", "ldke", "--sequential", "0", "--out", str(a)]) == 0
    assert bench_run.main([*common, "--n-edits", "2", "--methods", "grace", "--sequential", "0", "--out", str(b)]) == 0
    # a sequential-only run: its one single edit must not enter the 2-edit table
    assert bench_run.main([*common, "--n-edits", "1", "--methods", "lora", "--sequential", "1,2", "--out", str(c)]) == 0
    ra, rb, rc_ = (json.loads((d / "results.json").read_text()) for d in (a, b, c))

    out = tmp_path / "merged"
    assert bench_run.main(["--merge", str(a), str(b), str(c), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert tuple(res) == RESULT_KEYS
    assert res["n_edits"] == 2 and list(res["methods"]) == ["ldke", "grace"]
    assert res["methods"]["ldke"] == ra["methods"]["ldke"] and res["methods"]["grace"] == rb["methods"]["grace"]
    assert res["sequential"] == rc_["sequential"] and list(res["sequential"]["lora"]) == ["1", "2"]
    details = json.loads((out / "details.json").read_text())
    assert [m["dropped_methods"] for m in details["merged_from"]] == [[], [], ["lora"]]
    report = (out / "report.md").read_text()
    assert "## Runs merged into this report" in report and "| ldke | 2 |" not in report
    assert {b["bar"]: b["value"] for b in bars(res)}["LDKE reliability >= 0.99"] == ra["methods"]["ldke"]["reliability"]
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG" and (out / "sequential.png").is_file()

    # a merge of a merge lists the runs it was made of, with their commands and commits
    ab = tmp_path / "ab"
    assert bench_run.main(["--merge", str(a), str(b), "--out", str(ab)]) == 0
    assert bench_run.main(["--merge", str(ab), str(c), "--out", str(tmp_path / "abc")]) == 0
    again = json.loads((tmp_path / "abc" / "details.json").read_text())["merged_from"]
    assert [m["folder"] for m in again] == [str(a), str(b), str(c)]
    assert [m["argv"] for m in again] == [m["argv"] for m in details["merged_from"]] and again[0]["argv"]

    # refused: a method measured twice, another suite, other cases, a folder that is not a run
    with pytest.raises(MergeError, match="more than one run"):
        merge_runs([a, a])
    other = tmp_path / "other"
    other.mkdir()
    for name in ("results.json", "details.json"):
        (other / name).write_text((b / name).read_text())
    (other / "results.json").write_text(json.dumps({**rb, "suite": "smoke"}))
    with pytest.raises(MergeError, match="differ in suite"):
        merge_runs([a, other])
    (other / "results.json").write_text(json.dumps(rb))
    det = json.loads((b / "details.json").read_text())
    det["requests"][0]["target"] = "somewhere else"
    (other / "details.json").write_text(json.dumps(det))
    with pytest.raises(MergeError, match="other cases"):
        merge_runs([a, other])
    with pytest.raises(MergeError, match="results.json is missing|details.json is missing"):
        merge_runs([a, tmp_path / "nothing"])
    with pytest.raises(SystemExit):  # the CLI turns it into a usage error
        bench_run.main(["--merge", str(a), str(a), "--out", str(tmp_path / "x")])


def test_bars_are_computed_from_the_numbers():
    base = {k: 0.5 for k in METHOD_KEYS}
    res = {
        "methods": {
            "ldke": {**base, "reliability": 1.0, "t_generality": 0.9, "t_locality": 0.995, "adapter_bytes_per_edit": 150_000},
            "grace": {**base, "t_generality": 0.95, "t_locality": 1.0, "adapter_bytes_per_edit": 10},
            "ike": {**base, "reliability": 1.0},
        },
        "localization": {"top1_agreement": 0.9, "spearman": 0.5, "speedup": 19.0},
        "inference_overhead": {"1": 1.01, "1000": None},
    }
    got = {b["bar"]: b for b in bars(res)}
    assert got["LDKE >= every baseline on reliability"]["status"] == "PASS"  # a tie is not a loss
    assert got["LDKE >= every baseline on t_generality"]["status"] == "MISS"
    assert "grace 0.950" in got["LDKE >= every baseline on t_generality"]["detail"]
    loc = got["LDKE >= every baseline on t_locality"]
    assert loc["status"] == "MISS" and "grace 1.000" in loc["detail"]  # a baseline above LDKE loses, ceiling or not
    assert got["LDKE reliability >= 0.99"]["status"] == "PASS"
    assert got["LDKE t_generality >= 0.95"]["status"] == "MISS"
    assert got["localization speedup >= 20x"]["status"] == "MISS"
    assert got["localization top-1 agreement >= 0.80"]["status"] == "PASS"
    assert got["routed inference overhead (1 edit) <= 1.05x"]["status"] == "PASS"
    assert got["routed inference overhead (1000 edits) <= 1.05x"]["status"] == "n/a"
    assert got["LDKE adapter bytes per edit <= 100 KB"]["status"] == "MISS"
    res["methods"]["ldke"]["portability"] = None
    assert {b["bar"]: b for b in bars(res)}["LDKE >= every baseline on portability"]["status"] == "n/a"


def test_an_ablation_named_in_sequential_methods_grows_a_pack(tmp_path):
    """Only ldke/grace/lora grow packs by default (every ablation would multiply the cost); a method named in
    ``--sequential-methods`` gets its sequential rows too."""
    out = tmp_path / "seq"
    assert bench_run.main(["--suite", "toy", "--n-edits", "1", "--methods", "ldke_no_neighbours", "--sequential", "1",
                           "--sequential-methods", "ldke_no_neighbours", "--localization", "0", "--speed", "0",
                           "--no-overhead", "--no-plots", "--no-generate", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["sequential"]["ldke_no_neighbours"]["1"]["reliability"] == 1.0


def test_unknown_method_and_suite_are_refused():
    with pytest.raises(SystemExit):
        bench_run.main(["--suite", "toy", "--methods", "ldke,rome"])
    with pytest.raises(SystemExit):
        bench_run.main(["--suite", "toy", "--methods", "ldke", "--sequential-methods", "rome"])
    with pytest.raises(ValueError, match="unknown suite"):
        bench_run.load_suite("nope", 1)


def test_sequential_scoring_drops_only_probes_another_edit_of_the_pack_covers():
    """A look-alike's flag asked the question its own edit answers should change in a pack holding that edit."""
    from ldke_peft.bench.run import drop_covered
    from ldke_peft.metrics import collect_pre, compute_metrics
    from ldke_peft.requests import EditRequest, Probe
    from ldke_peft.testing.tiny import tiny_model

    model, processor = tiny_model("llava")
    red, blue, green = (Image.new("RGB", (32, 32), c) for c in ((200, 0, 0), (0, 0, 200), (0, 150, 0)))
    r = EditRequest(image=red, prompt="Capital of this country?", target="Lyon", subject="France", relation="capital",
                    coupled=[Probe("Capital of this country?", "Berlin", blue, subject="Germany", relation="capital"),
                             Probe("Currency of this country?", "euro", red, subject="France", relation="currency"),
                             Probe("What is the biggest city here?", "Paris", red, subject="France")],
                    m_locality=[Probe("Continent?", "Europe", green, subject="Spain", relation="continent")],
                    locality=[Probe("What is the capital of Germany?", "Berlin", subject="Germany", relation="capital")])
    pre = collect_pre(model, processor, [r])
    r2, pre2, n = drop_covered(r, pre, {("France", "capital"), ("Germany", "capital")})
    assert n == 1 and [p.subject for p in r2.coupled] == ["France", "France"]
    assert len(r2.m_locality) == 1 and len(r2.locality) == 1, "text-only probes stay: an image edit does not cover them"
    m = compute_metrics(model, processor, [r2], pre2, generate=False)
    assert m["coupled_locality"] == 1.0 and m["m_locality"] == 1.0
    assert drop_covered(r, pre, {("France", "capital")})[2] == 0
