"""Merging edit packs (:mod:`ldke_peft.merge`) on the toy world.

Packs edited separately have different router projections; the merged pack keeps each one, so every
input must route exactly as in the source pack that owns the winning slot, and every metric of a
source's requests must be unchanged by the merge.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

import ldke_peft
from ldke_peft import LDKEConfig
from ldke_peft.metrics import METRIC_KEYS
from ldke_peft.errors import CorruptAdapterError, FingerprintMismatchError
from ldke_peft.cli import merge_main
from ldke_peft.merge import MergeConflictError, MergeError, load_pack, merge_packs, to_peft_model
from ldke_peft.metrics import collect_pre, compute_metrics

from _dist_utils import assert_metrics_close, decisions, fresh, probe_rows

pytestmark = [
    pytest.mark.slow,  # edits four small packs (~15 s together)
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

ROUTER = "base_model.model.model.language_model.layers.1.mlp.down_proj.ldke_router."


@pytest.fixture(scope="module")
def reqs(world):
    return world.edit_requests(4, seed=21)


@pytest.fixture(scope="module")
def packs(world, world_pool, reqs, tmp_path_factory):
    """Two packs edited separately (requests 0, 2 and 1, 3), saved as folders."""
    root = tmp_path_factory.mktemp("merge")
    out = []
    for i, shard in enumerate((reqs[0::2], reqs[1::2])):
        pm = ldke_peft.edit(world.model, world.processor, shard, negatives=world_pool, progress=False)
        pm.save_pretrained(root / f"pack{i}")
        pm.unload()
        out.append(root / f"pack{i}")
    return out


def _source_decisions(world, path, rows):
    pm = PeftModel.from_pretrained(fresh(world), path)
    return decisions(pm, world.processor, rows)


def test_merged_pack_routes_and_scores_like_its_sources(world, reqs, packs, tmp_path):
    res = merge_packs(packs, out=tmp_path / "merged", slot_order=[(0, 0), (1, 0), (0, 1), (1, 1)])
    cfg, sd = res  # unpacks as (config, state_dict)
    assert res.report.groups == 2 and cfg.router_groups == 2, "separately fitted packs keep two projections"
    assert [e["prompt"] for e in cfg.edits] == [r.prompt for r in reqs], "slots follow slot_order"
    assert sd[ROUTER + "proj_group"].tolist() == [0, 1, 0, 1]
    saved = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert saved["router_groups"] == 2 and saved["num_slots"] == 4

    rows = probe_rows(reqs)
    merged = PeftModel.from_pretrained(fresh(world), tmp_path / "merged")
    got = decisions(merged, world.processor, rows)
    # source pack p's slot k is merged slot new[(p, k)]
    new = {s: i for i, s in enumerate(res.report.slot_map)}
    src = [_source_decisions(world, packs[p], rows) for p in range(2)]
    for i, row_decisions in enumerate(zip(*src)):
        routed = [new[(p, k)] for p, k in enumerate(row_decisions) if k >= 0]
        if len(routed) <= 1:
            assert got[i] == (routed[0] if routed else -1), f"row {i} ({rows[i][1]!r}): {got[i]} vs sources {row_decisions}"
        else:  # both sources accept the input: the merged pack picks one of them
            assert got[i] in routed
    assert sum(d >= 0 for d in got) >= len(reqs), "every edit prompt must route somewhere (the router works)"

    # metrics of each source's requests are unchanged by the merge, except on probes the *other* source
    # pack takes (a coupled probe on a look-alike of the other pack's edited entity, asking its relation: the
    # merged pack then applies that edit, as the other pack alone would)
    for p, idx in enumerate(([0, 2], [1, 3])):
        sub = [reqs[i] for i in idx]
        pre = collect_pre(world.model, world.processor, sub)
        source = PeftModel.from_pretrained(fresh(world), packs[p])
        got_m = compute_metrics(merged, world.processor, sub, pre)
        want = compute_metrics(source, world.processor, sub, pre)
        # a probe the other pack takes can move its request's mean by 1 / (its coupled probes), the table's
        # mean by that / (requests)
        bound = sum(
            sum(d >= 0 for d in _source_decisions(world, packs[1 - p], [(c.image, c.prompt) for c in r.coupled]))
            / len(r.coupled) / len(sub) for r in sub if r.coupled)
        keys = [k for k in METRIC_KEYS if k != "coupled_locality"]
        assert_metrics_close(got_m, want, keys=keys, what=f"pack{p}: ")
        assert abs(got_m["coupled_locality"] - want["coupled_locality"]) <= bound + 1e-6, (
            p, bound, got_m["coupled_locality"], want["coupled_locality"])


def test_shared_projection_merges_into_the_plain_layout(world, packs, tmp_path):
    """Packs with the same router calibration (here: a pack and a copy whose edits are relabelled so they
    are new facts) merge into ONE projection: no group buffers, readable by any ldke-peft."""
    cfg, sd = load_pack(packs[0])
    other = copy.deepcopy(cfg)
    for e in other.edits:
        e["prompt"] = e["prompt"] + " (second calibration user)"
    res = merge_packs([(cfg, sd), (other, sd)], out=tmp_path / "m")
    assert res.report.groups == 1 and res.config.router_groups == 1
    assert not [k for k in res.state_dict if "proj_group" in k or "extra_" in k]
    pm = PeftModel.from_pretrained(fresh(world), tmp_path / "m")
    assert pm.base_model.router("default").num_groups == 1
    assert pm.peft_config["default"].num_slots == 2 * cfg.num_slots


def test_conflicting_edits_are_reported_never_overwritten(world, reqs, packs, tmp_path):
    cfg, sd = load_pack(packs[0])
    rival = copy.deepcopy(cfg)
    rival.edits[0]["target"] = "Somewhere Else"  # same image + prompt, another answer
    with pytest.raises(MergeConflictError, match="different targets") as exc:
        merge_packs([(cfg, sd), (rival, sd)], names=["a", "b"])
    (c,) = exc.value.conflicts
    assert c.slots == [(0, 0), (1, 0)] and c.targets == [cfg.edits[0]["target"], "Somewhere Else"]
    assert cfg.edits[0]["prompt"] in str(exc.value)

    first = merge_packs([(cfg, sd), (rival, sd)], on_conflict="keep_first")
    last = merge_packs([(cfg, sd), (rival, sd)], on_conflict="keep_last")
    assert first.report.conflicts[0].kept == (0, 0) and last.report.conflicts[0].kept == (1, 0)
    assert [e["target"] for e in first.config.edits].count("Somewhere Else") == 0
    assert [e["target"] for e in last.config.edits].count("Somewhere Else") == 1
    # rival's slot 1 repeats pack a's slot 1 exactly: a duplicate, kept once
    assert first.report.duplicates == [((1, 1), (0, 1))]
    assert first.config.num_slots == last.config.num_slots == 2
    assert set(first.report.dropped) == {(1, 0), (1, 1)}

    # the kept slot carries its own delta: keep_last routes the fact to pack b's copy
    rows = [(reqs[0].image, reqs[0].prompt)]  # pack a's slot 0
    pm = to_peft_model(fresh(world), *last)
    assert decisions(pm, world.processor, rows) == [last.report.slot_map.index((1, 0))]


def test_fingerprint_and_probe_layer_must_match(world, world_pool, reqs, packs, tmp_path):
    cfg, sd = load_pack(packs[0])
    other = copy.deepcopy(cfg)
    sig = other.base_model_fingerprint["weight_signature"]
    sig["3"] = [v + 0.5 for v in sig["3"]]  # same architecture, other weights
    with pytest.raises(FingerprintMismatchError, match="decoder layer 3"):
        merge_packs([(cfg, sd), (other, sd)])

    from ldke_peft.testing.tiny import tiny_model

    tiny, _ = tiny_model("llava")
    with pytest.raises(FingerprintMismatchError, match="pack0"):
        merge_packs([packs[0]], base_model=tiny)

    pm = ldke_peft.edit(world.model, world.processor, [reqs[3]], LDKEConfig(probe_layer=2), negatives=world_pool,
                        progress=False)
    pm.save_pretrained(tmp_path / "probe2")
    pm.unload()
    with pytest.raises(MergeError, match="probe layer"):
        merge_packs([packs[0], tmp_path / "probe2"])


def test_different_ranks_and_router_widths_merge_exactly(world, world_pool, reqs, packs, tmp_path):
    """Deltas are zero-padded to the larger rank (scaling folded into B), projections to the wider router:
    logits of every probe are those of the source pack."""
    pm = ldke_peft.edit(world.model, world.processor, [reqs[1]], LDKEConfig(rank=2, alpha=8.0, router_dim=16),
                        negatives=world_pool, progress=False)
    pm.save_pretrained(tmp_path / "r2")
    pm.unload()
    res = merge_packs([packs[0], tmp_path / "r2"], out=tmp_path / "m")
    assert res.config.rank == 4 and res.config.router_dim == 32 and res.config.alpha == 4.0
    rows = probe_rows([reqs[1]])
    merged = PeftModel.from_pretrained(fresh(world), tmp_path / "m")
    source = PeftModel.from_pretrained(fresh(world), tmp_path / "r2")
    k = res.report.slot_map.index((1, 0))
    assert decisions(merged, world.processor, rows) == [k if d == 0 else d for d in decisions(source, world.processor, rows)]
    built = world.family.build_inputs(world.processor, [reqs[1].image], [reqs[1].prompt], [reqs[1].target])
    with torch.no_grad():
        a, b = merged(**built.inputs).logits, source(**built.inputs).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_packs_without_group_field_still_load_and_bad_groups_are_refused(world, reqs, packs, tmp_path):
    # a pack written before router_groups existed: no such key in adapter_config.json
    old = tmp_path / "old"
    old.mkdir()
    for f in ("adapter_model.safetensors", "adapter_config.json", "ldke_edits.json"):
        (old / f).write_bytes((packs[0] / f).read_bytes())
    data = json.loads((old / "adapter_config.json").read_text())
    data.pop("router_groups", None)
    (old / "adapter_config.json").write_text(json.dumps(data))
    rows = probe_rows([reqs[0]])
    assert decisions(PeftModel.from_pretrained(fresh(world), old), world.processor, rows) == \
        decisions(PeftModel.from_pretrained(fresh(world), packs[0]), world.processor, rows)

    merge_packs(packs, out=tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "adapter_model.safetensors")
    tensors[ROUTER + "proj_group"] = torch.tensor([0, 0, 5, 1])
    save_file(tensors, tmp_path / "m" / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptAdapterError, match="projection group"):
        LDKEConfig.from_pretrained(tmp_path / "m")
    tensors[ROUTER + "proj_group"] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    save_file(tensors, tmp_path / "m" / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptAdapterError, match="must be integers"):
        LDKEConfig.from_pretrained(tmp_path / "m")


def test_merge_command(packs, tmp_path, capsys):
    assert merge_main([str(packs[0]), str(packs[1]), "--out", str(tmp_path / "m")]) == 0
    assert "4 slot(s), 2 router projection(s)" in capsys.readouterr().out
    assert LDKEConfig.from_pretrained(tmp_path / "m").num_slots == 4
    with pytest.raises(ValueError, match="on_conflict"):
        merge_packs(packs, on_conflict="newest")


def test_textual_anchors_are_merged_with_their_slots(world, world_pool, reqs, tmp_path):
    """Packs whose slots keep textual anchors (``router_neighbour_questions``) merge into a pack whose slots
    keep them under their new index, in their source projection's space: every probe row one source takes
    routes to that slot in the merged pack, every row no source takes routes nowhere."""
    paths = []
    for i, shard in enumerate((reqs[0:1], reqs[1:2])):
        pm = ldke_peft.edit(world.model, world.processor, shard, LDKEConfig(router_neighbour_questions=6),
                            negatives=world_pool, progress=False)
        assert pm.base_model.router("default").num_anchors > 0
        pm.save_pretrained(tmp_path / f"a{i}")
        pm.unload()
        paths.append(tmp_path / f"a{i}")
    res = merge_packs(paths, out=tmp_path / "merged")
    n = [load_pack(p)[0].router_text_anchors for p in paths]
    assert res.config.router_text_anchors == sum(n) > 0
    slots = res.state_dict[ROUTER + "anchors_slot"].tolist()
    new = {s: i for i, s in enumerate(res.report.slot_map)}
    assert sorted(slots) == sorted([new[(0, 0)]] * n[0] + [new[(1, 0)]] * n[1])
    rows = probe_rows(reqs[:2])
    merged = PeftModel.from_pretrained(fresh(world), tmp_path / "merged")
    got = decisions(merged, world.processor, rows)
    src = [_source_decisions(world, paths[p], rows) for p in range(2)]
    for i, row in enumerate(zip(*src)):
        routed = [new[(p, k)] for p, k in enumerate(row) if k >= 0]
        if len(routed) <= 1:
            assert got[i] == (routed[0] if routed else -1), f"row {i} ({rows[i][1]!r}): {got[i]} vs sources {row}"


def test_each_merged_slot_keeps_its_sources_asked_word_in_any_order(world, world_pool, tmp_path):
    """Slots keep the asked-for word (``router_asked_word``) their source routed with, whichever pack comes first: a
    format-1.8 pack (no words) listed first does not switch the words of a 1.9 pack off, and a pack that routed
    without them (the knob off) lends none. The merged pack is written in the current format, and a wording that
    names the word routes to the merged slot as it did in its source."""
    from ldke_peft.bench.mke import editor_view
    from ldke_peft.metrics.routes import which_slots
    from ldke_peft.tuner.config import PACK_FORMAT_VERSION

    r = world.edit_requests(1, seed=3)[0]
    for name, seed in (("new", 3), ("other", 5)):
        pm = ldke_peft.edit(world.model, world.processor, [editor_view(world.edit_requests(1, seed=seed)[0])],
                            LDKEConfig(), negatives=world_pool, progress=False)
        assert pm.peft_config["default"].edits[0]["asked_word"]
        pm.save_pretrained(tmp_path / name)
        pm.unload()
    for name, version, knob in (("old", "1.8", None), ("off", PACK_FORMAT_VERSION, False)):
        folder = tmp_path / name
        folder.mkdir()
        for f in (tmp_path / "other").iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg.pop("router_asked_word")
        (folder / "adapter_config.json").write_text(json.dumps(
            {**cfg, "pack_format_version": version, **({} if knob is None else {"router_asked_word": knob})}))
        if knob is None:  # written before the words existed
            meta = json.loads((folder / "ldke_edits.json").read_text())
            meta["pack_format_version"] = version
            for e in meta["edits"]:
                e.pop("asked_word")
            (folder / "ldke_edits.json").write_text(json.dumps(meta))
    wording = "Which animal is the symbol of this country?"  # vetoed by the proposed neighbours without the word
    for order, want in ((["old", "new"], ("", "animal")), (["new", "off"], ("animal", ""))):
        res = merge_packs([tmp_path / n for n in order], out=tmp_path / "_".join(order))
        assert res.config.pack_format_version == PACK_FORMAT_VERSION and res.config.router_asked_word
        merged = PeftModel.from_pretrained(fresh(world), tmp_path / "_".join(order))
        try:
            assert merged.base_model.router("default").slot_words == want
            got = which_slots(merged, world.processor, [r.image], [wording])[0]["default"]
            assert got == want.index("animal")
        finally:
            merged.unload()
