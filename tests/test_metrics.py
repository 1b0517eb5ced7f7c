"""Metrics: hand-computed tensor cases, and the full pipeline on a tiny real LLaVA."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from PIL import Image

from ldke_peft.metrics import (
    METRIC_KEYS,
    PreState,
    answer_logit_mask,
    collect_pre,
    compute_metrics,
    evaluate,
    normalize_answer,
    token_accuracy,
    topk_agreement,
    topk_id_agreement,
)
from ldke_peft.requests import EditRequest, Probe
from ldke_peft.testing.tiny import tiny_model


def _one_hot_logits(pred_ids: list[list[int]], vocab: int) -> torch.Tensor:
    """Logits whose argmax at (b, t) is pred_ids[b][t]."""
    out = torch.zeros(len(pred_ids), len(pred_ids[0]), vocab)
    for b, row in enumerate(pred_ids):
        for t, tok in enumerate(row):
            out[b, t, tok] = 5.0
    return out


# ---------------------------------------------------------------------- token_accuracy


def test_token_accuracy_multi_token_and_padding():
    V = 6
    # row 0: prompt 0..2, target tokens at t=3,4 (ids 4, 5); logits[2] -> 4 (right), logits[3] -> 1 (wrong)
    # row 1: left padding at t=0,1 (garbage everywhere), prompt t=2,3, target at t=4 (id 2); logits[3] -> 2
    input_ids = torch.tensor([[1, 2, 3, 4, 5], [0, 0, 3, 1, 2]])
    target_mask = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    logits = _one_hot_logits([[0, 0, 4, 1, 0], [5, 5, 5, 2, 3]], V)
    acc = token_accuracy(logits, input_ids, target_mask)
    assert acc.tolist() == [0.5, 1.0]
    # fixing row 0's second token gives 1.0; breaking a prompt/padding prediction changes nothing
    logits2 = _one_hot_logits([[3, 3, 4, 5, 0], [1, 1, 1, 2, 3]], V)
    assert token_accuracy(logits2, input_ids, target_mask).tolist() == [1.0, 1.0]
    # the prediction of token t is read at t-1, not at t
    shifted = _one_hot_logits([[0, 0, 0, 4, 5], [0, 0, 0, 0, 2]], V)
    assert token_accuracy(shifted, input_ids, target_mask).tolist() == [0.0, 0.0]


def test_token_accuracy_three_tokens_and_errors():
    input_ids = torch.tensor([[7, 1, 2, 3]])
    mask = torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)
    logits = _one_hot_logits([[1, 9, 3, 0]], 10)  # right, wrong, right
    assert token_accuracy(logits, input_ids, mask).item() == pytest.approx(2 / 3)
    assert math.isnan(token_accuracy(logits, input_ids, torch.zeros_like(mask)).item())
    with pytest.raises(ValueError, match="shape"):
        token_accuracy(logits, input_ids[:, :3], mask)


def test_answer_logit_mask_shifts_left():
    tm = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    assert answer_logit_mask(tm).int().tolist() == [[0, 1, 1, 0], [0, 0, 1, 0]]


# ---------------------------------------------------------------------- topk_agreement


def test_topk_agreement_top1_masked_positions():
    V = 5
    pre = _one_hot_logits([[1, 2, 3, 4], [1, 1, 1, 1]], V)
    post = _one_hot_logits([[1, 2, 0, 0], [1, 1, 1, 3]], V)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)  # row 1's change is at a padded position
    assert topk_agreement(pre, post, mask, k=1).tolist() == pytest.approx([1 / 3, 1.0])
    full = torch.ones(2, 4, dtype=torch.bool)
    assert topk_agreement(pre, post, full, k=1).tolist() == pytest.approx([0.5, 0.75])


def test_topk_agreement_top_k_is_rank_by_rank():
    """As upstream's topk_token_match: equal ids at equal ranks, not set overlap."""
    pre = torch.tensor([[[4.0, 3.0, 2.0, 1.0, 0.0]]])  # ranks: 0,1,2,3,4
    same_set_swapped = torch.tensor([[[3.0, 4.0, 2.0, 1.0, 0.0]]])  # ranks: 1,0,2,3,4
    m = torch.ones(1, 1, dtype=torch.bool)
    assert topk_agreement(pre, same_set_swapped, m, k=2).item() == 0.0
    assert topk_agreement(pre, same_set_swapped, m, k=3).item() == pytest.approx(1 / 3)
    assert topk_agreement(pre, same_set_swapped, m, k=5).item() == pytest.approx(3 / 5)
    assert topk_agreement(pre, same_set_swapped, m, k=10).item() == pytest.approx(3 / 5)  # k clipped to V
    assert topk_agreement(pre, pre.clone(), m, k=10).item() == 1.0


def test_topk_agreement_errors_and_empty_rows():
    a = torch.randn(2, 3, 4)
    assert math.isnan(topk_agreement(a, a, torch.zeros(2, 3, dtype=torch.bool), k=1)[0].item())
    with pytest.raises(ValueError):
        topk_agreement(a, torch.randn(2, 4, 4), torch.ones(2, 3, dtype=torch.bool), k=1)
    with pytest.raises(ValueError):
        topk_id_agreement(a.argmax(-1, keepdim=True), a.argmax(-1, keepdim=True), torch.ones(2, 2, dtype=torch.bool))


def test_normalize_answer():
    assert normalize_answer("  The  Eiffel\nTOWER ") == "the eiffel tower"


# ---------------------------------------------------------------------- pipeline on a tiny LLaVA


@pytest.fixture(scope="module")
def llava():
    model, processor = tiny_model("llava")
    return model, processor


def _img(color, size=(32, 32)):
    return Image.new("RGB", size, color)


def _requests():
    red, red2, blue, green = _img((200, 10, 10)), _img((190, 20, 10), (40, 30)), _img((10, 10, 200)), _img((10, 200, 10))
    full = EditRequest(
        prompt="What is the capital of the country shown?",
        target="the",
        image=red,
        rephrase_prompts=["Which city is the capital?", "Name the capital."],
        rephrase_images=[red2],
        locality=[Probe("Which language is spoken?", "euro"), Probe("Describe the image.", "A red flag")],
        m_locality=[Probe("Describe the image.", "A blue flag", image=blue)],
        coupled=[Probe("What currency is used there?", "pound", image=red),
                 Probe("What is the capital of the country shown?", "London", image=green),
                 Probe("Which city is the largest?", "Lyon", image=red, kind="near_miss:capital")],
        portability=[Probe("What currency is used in the capital?", "the euro", image=red)],
    )
    multi = EditRequest(
        prompt="Which language is spoken in the country in the picture?",
        target="the capital",  # three tokens
        image=green,
        m_locality=[Probe("What is the capital?", "Rome", image=blue)],
    )
    text_only = EditRequest(prompt="What currency is used there?", target="the yen", locality=[Probe("The answer is", "Paris")])
    return [full, multi, text_only]


def _bias_lm_head(model, token_id: int, bias: float = 100.0):
    """An 'edit' for tests: a copy whose lm_head always predicts ``token_id``."""
    edited = copy.deepcopy(model)
    old = edited.lm_head
    new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.zero_()
        new.bias[token_id] = bias
    edited.lm_head = new
    return edited


def test_unedited_model_scores_locality_exactly_one(llava):
    model, processor = llava
    reqs = _requests()
    pre = collect_pre(model, processor, reqs, batch_size=4)
    assert isinstance(pre, PreState) and pre.n_requests == 3
    assert [len(x) for x in pre.probes["m_locality"]] == [1, 1, 0]
    assert pre.probes["m_locality"][0][0].ids.shape[1] == 10 and pre.probes["locality"][0][0].ids.shape[1] == 1
    # another batch size for the accuracy passes: locality still reuses pre's batches -> exactly 1.0
    res = compute_metrics(model, processor, reqs, pre, batch_size=2)
    assert set(METRIC_KEYS) <= set(res) and res["n"] == 3
    for key in ("t_locality", "m_locality", "coupled_locality", "near_miss_locality"):
        assert res[key] == 1.0, key
    assert res["counts"] == {"reliability": 3, "t_generality": 1, "m_generality": 1, "t_locality": 2,
                             "m_locality": 2, "coupled_locality": 1, "near_miss_locality": 1, "portability": 1,
                             "exact_match": 3}
    per = res["per_request"]
    assert per[1]["t_generality"] is None and per[2]["m_locality"] is None and per[2]["coupled_locality"] is None
    assert all(0.0 <= res[k] <= 1.0 for k in METRIC_KEYS)
    ans = compute_metrics(model, processor, reqs, pre, generate=False, locality_positions="answer")
    assert ans["t_locality"] == ans["m_locality"] == ans["coupled_locality"] == 1.0
    assert ans["exact_match"] is None and ans["counts"]["exact_match"] == 0
    # accuracies do not depend on batching (left padding is masked out)
    one = compute_metrics(model, processor, reqs, pre, batch_size=1, generate=False)
    for key in ("reliability", "t_generality", "m_generality", "portability"):
        assert one[key] == pytest.approx(res[key]), key


def test_edit_raises_reliability_and_breaks_locality(llava):
    model, processor = llava
    reqs = _requests()
    pre = collect_pre(model, processor, reqs)
    the = processor.tokenizer.convert_tokens_to_ids("Ġthe")
    edited = _bias_lm_head(model, the)
    res = compute_metrics(edited, processor, reqs, pre)
    per = res["per_request"]
    assert per[0]["reliability"] == 1.0 and per[0]["t_generality"] == 1.0 and per[0]["m_generality"] == 1.0
    assert per[1]["reliability"] == pytest.approx(1 / 3)  # "the capital": only the first of three tokens
    assert per[2]["reliability"] == pytest.approx(1 / 3)  # "the yen" -> Ġthe, Ġy, en
    assert per[0]["portability"] == pytest.approx(1 / 3)  # "the euro" -> Ġthe, Ġeur, o
    assert [p["exact_match"] for p in per] == [1.0, 0.0, 0.0]  # "the the the" starts with "the" only
    for key in ("t_locality", "m_locality", "coupled_locality", "near_miss_locality"):
        assert res[key] < 0.5, key
    ans = compute_metrics(edited, processor, reqs, pre, generate=False, locality_positions="answer")
    assert ans["t_locality"] < 1 and ans["m_locality"] < 1 and ans["coupled_locality"] < 1
    # the original model is untouched
    assert compute_metrics(model, processor, reqs, pre, generate=False)["t_locality"] == 1.0


def test_pre_state_must_match_requests(llava):
    model, processor = llava
    reqs = _requests()
    pre = collect_pre(model, processor, reqs)
    with pytest.raises(ValueError, match="collected for 3 requests"):
        compute_metrics(model, processor, reqs[:2], pre)
    other = _requests()
    other[1].m_locality[0] = Probe("What is the capital?", "Madrid", image=other[1].m_locality[0].image)
    with pytest.raises(ValueError, match="request 1's m_locality"):
        compute_metrics(model, processor, other, pre)
    with pytest.raises(ValueError, match="collect_pre"):
        compute_metrics(model, processor, reqs, None)
    # no locality probes: no pre-edit state needed
    bare = [EditRequest(prompt="What is the capital?", target="Paris", image=_img((1, 2, 3)))]
    assert compute_metrics(model, processor, bare, None, generate=False)["t_locality"] is None


def test_evaluate_peft_model_uses_disable_adapter(llava):
    from peft import LoraConfig, get_peft_model

    model, processor = llava
    reqs = _requests()
    base = copy.deepcopy(model)
    pre_true = collect_pre(base, processor, reqs)
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,  # random B: the adapter changes outputs
                     target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)")
    peft_model = get_peft_model(base, cfg)
    res = evaluate(peft_model, processor, reqs, generate=False)
    ref = compute_metrics(peft_model, processor, reqs, pre_true, generate=False)
    for key in METRIC_KEYS:
        assert res[key] == ref[key], key
    assert res["t_locality"] < 1.0  # pre really was the adapter-free model, not the adapted one
    # the adapter is active again afterwards
    assert evaluate(peft_model, processor, reqs, generate=False)["t_locality"] == res["t_locality"]
    with peft_model.disable_adapter():
        assert compute_metrics(peft_model, processor, reqs, pre_true, generate=False)["t_locality"] == 1.0


def test_evaluate_plain_model_without_pre_raises(llava):
    model, processor = llava
    with pytest.raises(ValueError, match="collect_pre"):
        evaluate(model, processor, _requests())
    pre = collect_pre(model, processor, _requests())
    assert evaluate(model, processor, _requests(), pre=pre, generate=False)["m_locality"] == 1.0


def test_metrics_restore_training_mode_and_validate(llava):
    model, processor = llava
    model.train()
    try:
        collect_pre(model, processor, _requests()[:1])
        assert model.training
    finally:
        model.eval()
    from ldke_peft.errors import InvalidRequestError

    bad = [EditRequest(prompt="q?", target="a"), EditRequest(prompt="q?", target="")]
    with pytest.raises(InvalidRequestError, match="request 1"):
        collect_pre(model, processor, bad)
    with pytest.raises(ValueError, match="batch_size"):
        compute_metrics(model, processor, bad[:1], None, batch_size=0)
