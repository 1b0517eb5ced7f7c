"""Resource bounds of an edit pack: size linear in the number of edits, routing memory O(B x K).

Bytes per edit (fp32, one edited layer per edit, rank ``r``, router width ``p``), from the layout in
:mod:`ldke_peft.tuner.layer` and :mod:`ldke_peft.tuner.routing`::

    4 * (in * r + r * out)    the slot's delta A (in x r) and B (r x out) on its MLP output projection
  + 8                         its entry in the layer's ldke_slot_ids (int64)
  + 4 * (2 * p + 3)           router: keys_v, keys_t (p each), radius_v, radius_t, needs_image

plus, per pack, the router's projections ``4 * (3 * d + 3 * d * p)`` and the safetensors header.
Each further edited layer of an edit adds ``4 * (in * r + r * out) + 8``.

* tiny LLaVA of the tests (hidden 32, MLP 64), r=4, p=32: 1812 bytes per edit;
* toy world (hidden 64, MLP 128), r=4, p=32: 3348 bytes per edit;
* a SmolLM2-135M-shaped layer (hidden 576, MLP 1536), r=4, p=32: 34068 bytes (33.3 KiB) per edit.

Every number is checked here against the ``adapter_model.safetensors`` of a real pack.
"""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

import ldke_peft  # noqa: F401 - registers the LDKE PEFT type
from ldke_peft import LDKEConfig
from ldke_peft.tuner.model import routing_state_of
from ldke_peft.tuner.routing import NO_SLOT, RouterState
from ldke_peft.testing.tiny import tiny_model

RANK, P = 4, 32


def bytes_per_edit(d_in: int, d_out: int, rank: int = RANK, p: int = P) -> int:
    return 4 * (d_in * rank + rank * d_out) + 8 + 4 * (2 * p + 3)


def llava(hidden: int, intermediate: int, layers: int = 3, heads: int = 4, kv_heads: int = 2):
    """A LLaVA whose language model has the given MLP shape (random weights: only shapes matter here)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    _, proc = tiny_model("llava")
    tok = proc.tokenizer
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=32, patch_size=16)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval(), proc


def random_pack(model, num_slots: int, layers: list[int], seed: int = 0):
    """A pack with ``num_slots`` slots spread over ``layers``, every delta, key and radius set at random."""
    cfg = LDKEConfig(slot_layers=[[layers[k % len(layers)]] for k in range(num_slots)], probe_layer=1,
                     rank=RANK, router_dim=P)
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in pm.named_parameters():
            if "ldke_" in name:
                t.copy_(torch.randn(t.shape, generator=g) * 0.01)
        router = pm.base_model.router("default")
        router.keys_v.copy_(torch.randn(router.keys_v.shape, generator=g))
        router.keys_t.copy_(torch.randn(router.keys_t.shape, generator=g))
        router.radius_v.uniform_(0.5, 1.0, generator=g)
        router.radius_t.uniform_(0.5, 1.0, generator=g)
    return pm


def pack_size(model, num_slots, layers, folder) -> int:
    pm = random_pack(model, num_slots, layers)
    pm.save_pretrained(folder)
    return os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))


def test_pack_size_is_linear_in_edits_tiny(tmp_path):
    """10, 100, 1000 slots on the tiny LLaVA: the marginal cost of an edit is constant and equals the formula,
    and the 1000-slot pack loads (validation included) and routes a batch."""
    sizes = {}
    for k in (10, 100, 1000):
        model, _ = tiny_model("llava")
        sizes[k] = pack_size(model, k, [2, 3], tmp_path / f"k{k}")
    per_edit = bytes_per_edit(64, 32)
    assert per_edit == 1812
    low = (sizes[100] - sizes[10]) / 90
    high = (sizes[1000] - sizes[100]) / 900
    assert abs(low - per_edit) / per_edit < 0.01, (low, per_edit)
    assert abs(high - per_edit) / per_edit < 0.01, (high, per_edit)
    # fixed part: router projections (visual d=32, textual = the sentence encoder's width, p=32) + header,
    # independent of the slot count
    t = LDKEConfig.from_pretrained(str(tmp_path / "k10")).router_text_dim
    assert t > 0
    fixed = sizes[1000] - 1000 * per_edit
    assert 0 < fixed < 4 * ((32 + t) + (32 + t) * P) + 4096, fixed

    base, proc = tiny_model("llava")
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "k1000"))
    assert loaded.peft_config["default"].num_slots == 1000
    fam = ldke_peft.family_of(base)
    from PIL import Image

    images = [Image.new("RGB", (32, 32), (i * 30 % 255, 40, 200)) for i in range(8)]
    built = fam.build_inputs(proc, images, ["What is the capital of the country shown?"] * 8)
    with torch.no_grad():
        loaded(**built.inputs)
    decision = routing_state_of(base).slots["default"]
    assert decision.shape == (8,) and bool(((decision >= NO_SLOT) & (decision < 1000)).all())


@pytest.mark.parametrize("name,hidden,intermediate,heads,kv,expected", [
    ("toy world", 64, 128, 4, 2, 3348),
    ("SmolLM2-135M layer", 576, 1536, 9, 3, 34068),
])
def test_bytes_per_edit_of_real_shapes(tmp_path, name, hidden, intermediate, heads, kv, expected):
    per_edit = bytes_per_edit(intermediate, hidden)
    assert per_edit == expected
    sizes = {}
    for k in (10, 60):
        model, _ = llava(hidden, intermediate, heads=heads, kv_heads=kv)
        sizes[k] = pack_size(model, k, [2], tmp_path / f"k{k}")
    measured = (sizes[60] - sizes[10]) / 50
    assert abs(measured - per_edit) / per_edit < 0.005, (name, measured, per_edit)


class _Allocations(TorchDispatchMode):
    """Records the size of every tensor an op creates (views of existing storage excluded)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {a.untyped_storage().data_ptr() for a in _tensors((args, kwargs))}
        for t in _tensors(out):
            if t.untyped_storage().data_ptr() not in seen:
                self.sizes.append((str(func), tuple(t.shape), t.untyped_storage().nbytes()))
        return out


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _route_allocations(B: int, K: int, d: int) -> tuple[int, int]:
    g = torch.Generator().manual_seed(0)
    router = RouterState(d, P, K)
    router.keys_v.copy_(torch.randn(K, P, generator=g))
    router.keys_t.copy_(torch.randn(K, P, generator=g))
    router.radius_v.fill_(1.0)
    router.radius_t.fill_(1.0)
    v, t = torch.randn(B, d, generator=g), torch.randn(B, 2 * d, generator=g)
    has = torch.ones(B, dtype=torch.bool)
    with _Allocations() as rec:
        out = router.route(v, t, has)
    assert out.shape == (B,)
    return sum(s for _, _, s in rec.sizes), max(s for _, _, s in rec.sizes)


def test_routing_memory_is_o_batch_times_slots():
    """route() on B=8 rows and K=1000 slots (SmolLM2 width d=576): every intermediate is at most B x K, no
    (B, K, p) difference tensor, and the total grows linearly in B x K (plus O(B x d) for the projection)."""
    B, K, d = 8, 1000, 576
    total, largest = _route_allocations(B, K, d)
    # the largest intermediate is a B x K fp32 matrix or the centred B x 2d textual features
    assert largest <= 4 * max(B * K, B * 2 * d), largest
    # measured (torch 2.13, CPU): 344,584 bytes, about ten B x K fp32/bool intermediates (distances, ratios,
    # max, masks) + O(K) + O(B x d)
    bound = 12 * 4 * B * K + 8 * 4 * K + 4 * 4 * B * 3 * d
    assert total <= bound, (total, bound)
    # linear: doubling K adds at most the B x K part again; doubling d adds only O(B x d)
    total_2k, _ = _route_allocations(B, 2 * K, d)
    total_2d, _ = _route_allocations(B, K, 2 * d)
    assert total_2k - total <= 12 * 4 * B * K + 8 * 4 * K
    assert total_2d - total <= 4 * 4 * B * 3 * d + 4 * (3 * d) * 4
