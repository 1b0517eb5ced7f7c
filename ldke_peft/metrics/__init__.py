"""Knowledge-editing metrics, defined as EasyEdit's multimodal evaluation defines them.

Per request (an :class:`~ldke_peft.requests.EditRequest`), all on the model's own chat format:

* **reliability**: teacher-forced accuracy of the target tokens given (image, prompt).
* **t_generality**: the same for each rephrased prompt with the edit image (mean over rephrases).
* **m_generality**: the same for the edit prompt with each rephrase image (mean over images).
* **portability**: teacher-forced accuracy of each portability probe's expected (new) answer.
* **t_locality**: top-1 agreement, pre-edit vs post-edit model, on each text-only locality probe
  (prompt + answer teacher-forced).
* **m_locality**: top-10 agreement on each multimodal locality probe.
* **coupled_locality**: top-1 agreement on each coupled probe (same image / other question,
  look-alike image / same question): the entanglement test EasyEdit does not have.
* **near_miss_locality**: the same, on coupled probes whose ``kind`` starts with ``"near_miss"``: a
  question on the same image that shares topic or words with the edited one but asks another fact
  (the hardest coupled input, so it gets its own column instead of being averaged away).
* **exact_match**: greedy generation (``max_new_tokens`` = target tokens + 2) whose decoded text,
  stripped and casefolded, starts with the target, stripped and casefolded.

"Teacher-forced accuracy" (EasyEdit's ``compute_multimodal_hf_edit_quality``): the logits at position
``t - 1`` predict token ``t``; the score is the fraction of target tokens whose argmax is the token.

"Top-k agreement" is what upstream's ``topk_token_match`` (``easyeditor/util/vl_utils.py``, used by
``attach_topk_locality_metrics`` in ``editors/multimodal_editor.py``) computes: take ``topk(k).indices``
of the pre-edit and post-edit logits at every position of the probe sequence (chat-formatted prompt,
image tokens and the teacher-forced answer, i.e. the *whole* sequence, unshifted), and count the
fraction of (position, rank) pairs where the two token ids are equal — a rank-by-rank match, not a
set overlap. That is ``locality_positions="sequence"`` (the default, for numbers comparable with
EasyEdit). ``locality_positions="answer"`` compares only the positions whose logits predict the answer
tokens, a stricter score that prompt/image positions cannot dilute.

A request with no probes of a kind contributes nothing to that key; the reported value is the mean
over the requests that have them, or ``None`` when none has.

Pre-edit state is collected *before* editing with :func:`collect_pre` (EasyEdit's single-edit mode
gets this wrong for in-place methods: it computes "pre" after the edit). For a ``peft.PeftModel``,
:func:`evaluate` computes it inside ``model.disable_adapter()``, which for LDKE is the true pre-edit
model because edits never touch the base weights.

Layer: product (README "Architecture"): may import every layer; no library layer imports it.
"""

from __future__ import annotations

from .compute import compute_metrics, evaluate
from .pre import PreState, ProbeTopK, collect_pre
from .scores import (
    LOCALITY_K,
    METRIC_KEYS,
    NEAR_MISS_KIND,
    answer_logit_mask,
    mean_by_kind,
    normalize_answer,
    portability_kind,
    token_accuracy,
    topk_agreement,
    topk_id_agreement,
)


__all__ = [
    "METRIC_KEYS",
    "NEAR_MISS_KIND",
    "LOCALITY_K",
    "PreState",
    "ProbeTopK",
    "answer_logit_mask",
    "collect_pre",
    "compute_metrics",
    "evaluate",
    "mean_by_kind",
    "normalize_answer",
    "portability_kind",
    "token_accuracy",
    "topk_agreement",
    "topk_id_agreement",
]
