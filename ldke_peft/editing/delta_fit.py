"""The localized update: fit one slot's low-rank delta so the edit's positives answer the target.

Owns: :func:`fit_delta` (two phases: confident stop, then argmax on every target token within a bound that
grows with the target), its step bound and :class:`EditDivergedError`. The rows come from
:mod:`ldke_peft.editing.scope`; layers below the edited span are replayed from a capture
(:mod:`ldke_peft.tuner.layer_replay`). Knows nothing of routing.

Layer: editing (README "Architecture"): imports data, tuner and editing modules, never the product code.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ..tuner.config import LDKEConfig
from ..tuner.context import routing_inputs
from ..errors import LDKEError
from ..families import family_of
from ..tuner.layer_replay import capture_replay
from ..tuner.model import LDKEModel, _root_model
from ..requests import EditRequest
from .scope import positive_views

logger = logging.getLogger(__name__)


class EditDivergedError(LDKEError, RuntimeError):
    """The delta fit produced non-finite values (learning rate far too high, or a half-precision overflow).

    Raised instead of returning a pack that would answer garbage (and that the loader would refuse);
    :func:`edit` rolls the model back first.
    """


def fit_delta(
    peft_model: Any,
    processor: Any,
    request: EditRequest,
    slot: int,
    *,
    adapter_name: str = "default",
    cache_hidden: bool = True,
    steps: int | None = None,
    stop_early: bool = True,
    seed: int = 0,
    stats: dict[str, float] | None = None,
) -> tuple[int, float]:
    """Fit slot ``slot``'s low-rank deltas so every positive answers ``request.target``.

    Returns ``(steps taken, final teacher-forced accuracy on the positives)``. With ``cache_hidden``
    the hidden states entering the lowest edited layer are computed once; each step runs only the
    edited span (forward and backward). ``stats``, when given, receives the seconds of ``capture``
    (building the rows and the replay) and ``delta_fit`` (the steps), and the ``tokens`` each step runs
    through each of ``span`` decoder layers.
    """
    t_start = time.perf_counter()
    cfg: LDKEConfig = peft_model.peft_config[adapter_name]
    tuner: LDKEModel = peft_model.base_model
    root = _root_model(peft_model)
    family = family_of(root)
    device = next(root.parameters()).device
    slot_layers = cfg.slot_layers[slot]
    lo = min(slot_layers)

    imgs, prompts = positive_views(request, seed=seed, n_views=cfg.auto_views)
    rows_img, rows_q = _positive_rows(imgs, prompts, request.image is not None)
    # fit the answer *and* the end of the answer: without the EOS the old answer's tail can carry on
    # after a shorter new target ("puro" -> "puro puet")
    tok = family.tokenizer(processor)
    eos = getattr(tok, "eos_token", None)
    fit_target = request.target.strip() + (eos if isinstance(eos, str) and eos else "")
    # right-aligned: each row at the positions it has when run alone, and rows that share a prefix
    # share its positions too (the replay computes a shared prefix once)
    built = family.build_inputs(processor, rows_img, rows_q, [fit_target] * len(rows_q)).right_aligned().to(device)
    B = len(built)
    tgt_mask = built.target_mask
    # logits at t-1 predict token t
    pred_pos = torch.zeros_like(tgt_mask)
    pred_pos[:, :-1] = tgt_mask[:, 1:]
    tgt_ids = built.input_ids[tgt_mask]
    # the answer tokens proper (the appended EOS is trained but does not gate early stopping or the
    # reported accuracy: it only stops the old answer's tail from carrying on)
    core = torch.ones_like(tgt_ids, dtype=torch.bool)
    eos_id = getattr(tok, "eos_token_id", None)
    if fit_target != request.target.strip() and eos_id is not None:
        last = tgt_mask & ~torch.cat([tgt_mask[:, 1:], torch.zeros_like(tgt_mask[:, :1])], dim=1)
        core = ~(last[tgt_mask] & (tgt_ids == eos_id))

    ldke_layers = tuner.ldke_layers(adapter_name)
    params = []
    for l in slot_layers:
        m = ldke_layers[l]
        params += [m.ldke_A[adapter_name], m.ldke_B[adapter_name]]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.edit_lr)
    n_steps = steps if steps is not None else cfg.edit_steps
    slot_vec = torch.full((B,), slot, dtype=torch.long)

    replay = None
    if cache_hidden:
        row_images = [next(k for k, im in enumerate(imgs) if im is x) if x is not None else -1 for x in rows_img]
        probe = None
        if B > 2:
            # the first and last rows (another image and another wording) run alone to check the replay
            pick = [0, B - 1]
            pb = family.build_inputs(processor, [rows_img[i] for i in pick], [rows_q[i] for i in pick],
                                     [fit_target] * 2).right_aligned().to(device)
            pp = torch.zeros_like(pb.target_mask)
            pp[:, :-1] = pb.target_mask[:, 1:]
            probe = (pb, pp, pick)
        replay = capture_replay(root, family, lo, built, pred_pos, row_images=row_images, probe=probe)
    if replay is not None:
        slot_vec = torch.full((replay.rows,), slot, dtype=torch.long)
    step_mask = built.prompt_mask if replay is None or replay.prompt_mask is None else replay.prompt_mask
    t_steps = time.perf_counter()

    def logits_at_targets() -> torch.Tensor:
        with routing_inputs(root, slots=slot_vec, prompt_mask=step_mask):
            if replay is not None:
                return family.logits_from_hidden(root, replay.run_at(pred_pos))
            out = root(**built.inputs, use_cache=False)
            return out.logits[pred_pos]

    # an explicit ``steps`` (timing studies), no early stop, or edit_steps=0 (no fit) keep the exact step count
    exact = steps is not None or not stop_early or n_steps == 0
    bound = n_steps if exact else fit_step_bound(n_steps, int(tgt_mask.sum(1).max()))
    taken, acc, reached = 0, 0.0, False
    best: tuple[int, list[torch.Tensor]] | None = None  # (targets hit, parameters) of the best step after phase 1
    stale = 0
    was_training = root.training
    root.eval()  # no dropout: the fit must see what inference sees
    try:
        for step in range(bound):
            logits = logits_at_targets()
            ce = torch.nn.functional.cross_entropy(logits.float(), tgt_ids, reduction="none")
            loss = ce[core].mean() + (0.25 * ce[~core].mean() if bool((~core).any()) else 0.0)
            if not bool(torch.isfinite(loss)):
                raise EditDivergedError(
                    f"edit {request.prompt!r} -> {request.target!r} diverged at step {step}: the loss is "
                    f"{float(loss.detach())} (edit_lr={cfg.edit_lr}); lower edit_lr"
                )
            with torch.no_grad():
                hit_all = logits.argmax(-1) == tgt_ids
                hit = hit_all[core]
                acc = float(hit.float().mean())
                p_min = float(torch.softmax(logits.float(), -1).gather(1, tgt_ids[:, None])[core].min())
            # stop once the answer is confidently the target AND is followed by its end (else the old
            # answer's tail can carry on in generation: "puro" -> "puro puet")
            if stop_early and bool(hit.all()) and p_min > 0.5 and bool(hit_all.all()):
                reached = True
                break
            if step >= n_steps:
                # phase 2 (past the configured steps, up to a bound that grows with the target): keep going
                # until every target token of every positive is the argmax, and keep the best step seen.
                # Where the model cannot reach p > 0.5 at all (a tiny random model whose final norm bounds
                # every logit), this is what ends the fit.
                n_hit = int(hit_all.sum())
                if bool(hit_all.all()):
                    reached = True
                    break
                if best is None or n_hit > best[0]:
                    best, stale = (n_hit, [p.detach().clone() for p in params]), 0
                else:
                    stale += 1
                    if stale >= FIT_PATIENCE:
                        reached = False
                        break
                    if stale % FIT_STALL_STEPS == 0:
                        for g in opt.param_groups:
                            g["lr"] = min(g["lr"] * 2, cfg.edit_lr * FIT_LR_CAP)
                loss = loss + _argmax_hinge(logits.float(), tgt_ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            taken = step + 1
        else:
            reached = False
        if not reached:
            # the loop ran out (or gave up) after a step: score the deltas it ends with, or the best ones seen
            with torch.no_grad():
                hit_all = logits_at_targets().argmax(-1) == tgt_ids
                if best is not None and int(hit_all.sum()) < best[0]:
                    for p, v in zip(params, best[1]):
                        p.copy_(v)
                    hit_all = logits_at_targets().argmax(-1) == tgt_ids
                acc = float(hit_all[core].float().mean())
        if cfg.delta_storage == "float16":
            # the pack stores the factors in float16: round them now and check the edit on what will be saved
            with torch.no_grad():
                for p in params:
                    p.copy_(p.half().float())
                hit_all = logits_at_targets().argmax(-1) == tgt_ids
            rounded = float(hit_all[core].float().mean())
            if rounded < acc:
                logger.info("edit %r -> %r: rounding the factors to float16 lowered target accuracy %.3f -> %.3f",
                            request.prompt, request.target, acc, rounded)
            acc = rounded
    finally:
        root.train(was_training)
        for p in params:
            p.grad = None
    if stats is not None:
        stats["capture"] = t_steps - t_start
        stats["delta_fit"] = time.perf_counter() - t_steps
        stats["tokens"] = replay.rows * int(replay.hidden.shape[1]) if replay is not None else int(built.input_ids.numel())
        stats["span"] = len(replay.layers) if replay is not None else len(family.decoder_layers(root))
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise EditDivergedError(
            f"edit {request.prompt!r} -> {request.target!r} diverged: slot {slot}'s delta has non-finite values "
            f"after {taken} steps (edit_lr={cfg.edit_lr}); lower edit_lr"
        )
    if acc < 1.0:
        logger.warning("edit %r -> %r: NOT REACHED: positives reach %.1f%% target accuracy after %d steps (bound %d); "
                       "the edit will not always answer its target (a larger rank or more edited layers gives the "
                       "delta more room)", request.prompt, request.target, 100 * acc, taken, bound)
    return taken, acc


#: Steps without a new best (more target tokens right) before phase 2 of :func:`fit_delta` gives up.
FIT_PATIENCE = 300

#: Phase 2 doubles the learning rate after this many steps without a new best (up to 16x ``edit_lr``):
#: a fit that stalls is usually one whose delta must grow large to tell nearly equal inputs apart.
FIT_STALL_STEPS = 50

#: The most phase 2 multiplies ``edit_lr`` by.
FIT_LR_CAP = 16

#: Phase 2 of :func:`fit_delta` may run this many extra steps per target token (answer + end token).
FIT_STEPS_PER_TOKEN = 200


def fit_step_bound(edit_steps: int, target_tokens: int) -> int:
    """The most steps :func:`fit_delta` takes: ``edit_steps`` (phase 1, stops once every target token is
    confidently right), then up to :data:`FIT_STEPS_PER_TOKEN` per target token more (phase 2, until every
    target token is the argmax): a 16-token answer needs many more steps than one word."""
    return int(edit_steps) + FIT_STEPS_PER_TOKEN * max(1, int(target_tokens))


def _argmax_hinge(logits: torch.Tensor, tgt_ids: torch.Tensor) -> torch.Tensor:
    """Mean hinge on (best other logit - target logit + margin): pushes exactly the tokens that are not yet
    the argmax. The margin is a tenth of each position's logit spread, so it means the same on a model
    whose logits span 1 (a tiny random one) as on one whose logits span 30."""
    z_t = logits.gather(1, tgt_ids[:, None]).squeeze(1)
    other = logits.scatter(1, tgt_ids[:, None], float("-inf")).amax(-1)
    margin = 0.1 * logits.detach().std(-1)
    return torch.relu(other - z_t + margin).mean()


def _positive_rows(imgs: list[Any], prompts: list[str], has_image: bool) -> tuple[list[Any], list[str]]:
    if not has_image:
        return [None] * len(prompts), list(prompts)
    rows_i, rows_q = [], []
    for i, im in enumerate(imgs):
        for j, q in enumerate(prompts):
            rows_i.append(im)
            rows_q.append(q)
    return rows_i, rows_q
