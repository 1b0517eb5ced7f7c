"""Half-precision models on CPU: the router and the deltas keep fp32 where precision matters.

* A pack made in fp32 and loaded onto a bf16 / fp16 copy of the base routes every toy-world probe
  exactly as on the fp32 model.
* Router state stays fp32 through ``model.to(half)`` (radii sit a few percent from the nearest
  negative; bf16 keys would move them).
* Editing a half-precision model works, including growing a pack (sequential editing), where PEFT's
  move-to-base-dtype used to train the new slots in fp16 (Adam's updates underflow there).
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

import ldke_peft
from ldke_peft import LDKEConfig
from ldke_peft.metrics import collect_pre, compute_metrics
from ldke_peft.tuner.routing import RouterState

from _dist_utils import decisions, fresh, probe_rows

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

HALF = (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_router_state_keeps_fp32_through_dtype_casts(dtype):
    r = RouterState(16, 4, 3, groups=2)
    with torch.no_grad():
        for name, buf in r.named_buffers():
            if buf.is_floating_point():
                buf.copy_(torch.randn(buf.shape) * 1.000123)
    before = {k: v.clone() for k, v in r.state_dict().items()}
    r.to(dtype)
    r.to("cpu", dtype=dtype)
    after = r.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype, k
        assert torch.equal(after[k], v), k
    assert after["proj_group"].dtype == torch.long


def test_tuner_on_half_model_keeps_router_and_deltas_fp32(world):
    model = fresh(world, torch.float16)
    cfg = LDKEConfig(slot_layers=[[3]], probe_layer=1)
    pm = get_peft_model(model, cfg)
    pm.base_model.grow_adapter("default", [[3], [4]])  # re-injection, as sequential editing does
    layers = pm.base_model.ldke_layers("default")
    assert {layers[i].ldke_A["default"].dtype for i in (3, 4)} == {torch.float32}
    assert {layers[i].ldke_B["default"].dtype for i in (3, 4)} == {torch.float32}
    router = pm.base_model.router("default")
    # projections stay int8 (router_storage), every floating router buffer stays fp32
    assert {n: b.dtype for n, b in router.named_buffers() if not b.is_floating_point()} == {
        "proj_v": torch.int8, "proj_t": torch.int8}
    assert {b.dtype for b in router.buffers() if b.is_floating_point()} == {torch.float32}
    assert layers[3].get_base_layer().weight.dtype == torch.float16  # the base is untouched
    pm.unload()


@pytest.fixture(scope="module")
def fp32_pack(world, world_pool, tmp_path_factory):
    reqs = world.edit_requests(3, seed=44)
    pm = ldke_peft.edit(world.model, world.processor, reqs, negatives=world_pool, progress=False)
    path = tmp_path_factory.mktemp("dtype") / "pack"
    pm.save_pretrained(path)
    pm.unload()
    return reqs, path


@pytest.mark.slow
def test_half_precision_routing_equals_fp32(world, fp32_pack):
    reqs, path = fp32_pack
    rows = probe_rows(reqs)
    ref = decisions(PeftModel.from_pretrained(fresh(world), path), world.processor, rows)
    assert sum(d >= 0 for d in ref) >= 3 * len(reqs), "edit prompts, rephrasings and views route in fp32"
    assert sum(d < 0 for d in ref) >= 3 * len(reqs), "locality and coupled probes do not"
    for dtype in HALF:
        pm = PeftModel.from_pretrained(fresh(world, dtype), path)
        assert next(pm.base_model.router("default").buffers()).dtype == torch.float32
        assert decisions(pm, world.processor, rows) == ref, f"routing differs in {dtype}"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_editing_a_half_precision_model_including_a_grown_pack(world, world_pool, dtype):
    reqs = world.edit_requests(2, seed=55)
    model = fresh(world, dtype)
    pre = collect_pre(model, world.processor, reqs)
    pm = ldke_peft.edit(model, world.processor, reqs[:1], negatives=world_pool, progress=False)
    pm = ldke_peft.edit(pm, world.processor, reqs[1:], pack=pm, negatives=world_pool, progress=False)
    assert [r.fit_accuracy for r in pm.ldke_reports] == [1.0, 1.0], pm.ldke_reports
    for m in pm.base_model.ldke_layers("default").values():
        if "default" in m.ldke_A:
            assert m.ldke_A["default"].dtype == torch.float32
    metrics = compute_metrics(pm, world.processor, reqs, pre)
    assert metrics["reliability"] == 1.0 and metrics["exact_match"] == 1.0, metrics
    assert metrics["t_locality"] == 1.0 and metrics["coupled_locality"] >= 0.95, metrics
