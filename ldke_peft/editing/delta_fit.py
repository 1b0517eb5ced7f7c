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
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from ..tuner.config import LDKEConfig
from ..tuner.context import routing_inputs
from ..errors import LDKEError
from ..families import family_of
from ..tuner.layer_replay import LayerReplay, capture_replay
from ..tuner.model import LDKEModel, _root_model
from ..requests import EditRequest
from .scope import NegativePool, delta_borrowed_wordings, positive_views

logger = logging.getLogger(__name__)


class EditDivergedError(LDKEError, RuntimeError):
    """The delta fit produced non-finite values (learning rate far too high, or a half-precision overflow).

    Raised instead of returning a pack that would answer garbage (and that the loader would refuse);
    :func:`edit` rolls the model back first.
    """


@dataclass
class _Rows:
    """Positive rows built for the fit: what the steps feed the model and what they score."""

    built: Any  # None for rows cut from another set's replay (the replay stands for them)
    pred_pos: torch.Tensor  # (B, T): the positions whose logits predict a target token
    tgt_ids: torch.Tensor
    core: torch.Tensor  # which target tokens are the answer proper (not the appended end token)
    replay: LayerReplay | None
    slot_vec: torch.Tensor
    step_mask: torch.Tensor

    def select(self, rows: list[int]) -> "_Rows | None":
        """These rows alone, cut from a packed replay (no second capture); ``None`` when not packed."""
        if self.replay is None or self.replay.packing is None:
            return None
        replay = self.replay.select(rows)
        tgt_mask = self.built.target_mask
        core_at = torch.zeros_like(tgt_mask)
        core_at[tgt_mask] = self.core
        return _Rows(None, self.pred_pos[rows], self.built.input_ids[rows][tgt_mask[rows]], core_at[rows][tgt_mask[rows]],
                     replay, self.slot_vec[:1], replay.prompt_mask)

    @property
    def tokens(self) -> int:
        """Tokens one step runs through each replayed layer."""
        if self.replay is not None:
            return self.replay.rows * int(self.replay.hidden.shape[1])
        return int(self.built.input_ids.numel())

    def logits(self, root: Any, family: Any, fast: LayerReplay | None = None) -> torch.Tensor:
        """Logits at the target positions (``fast``: this rows' replay cast to bfloat16)."""
        with routing_inputs(root, slots=self.slot_vec, prompt_mask=self.step_mask):
            if fast is not None:
                with _attention_for(fast.hidden):
                    h = fast.run_at(self.pred_pos)
                return family.logits_from_hidden(root, h.to(self.replay.hidden.dtype))
            if self.replay is not None:
                return family.logits_from_hidden(root, self.replay.run_at(self.pred_pos))
            return root(**self.built.inputs, use_cache=False).logits[self.pred_pos]


def _build_rows(root: Any, family: Any, processor: Any, rows_img: list[Any], rows_q: list[str], imgs: list[Any],
                rows_t: list[str], eos_appended: bool, eos_id: int | None, slot: int, lo: int,
                cache_hidden: bool) -> _Rows:
    device = next(root.parameters()).device
    # right-aligned: each row at the positions it has when run alone, and rows that share a prefix
    # share its positions too (the replay computes a shared prefix once)
    built = family.build_inputs(processor, rows_img, rows_q, rows_t).right_aligned().to(device)
    B = len(built)
    tgt_mask = built.target_mask
    # logits at t-1 predict token t
    pred_pos = torch.zeros_like(tgt_mask)
    pred_pos[:, :-1] = tgt_mask[:, 1:]
    tgt_ids = built.input_ids[tgt_mask]
    # the answer tokens proper (the appended EOS is trained but does not gate early stopping or the
    # reported accuracy: it only stops the old answer's tail from carrying on)
    core = torch.ones_like(tgt_ids, dtype=torch.bool)
    if eos_appended and eos_id is not None:
        last = tgt_mask & ~torch.cat([tgt_mask[:, 1:], torch.zeros_like(tgt_mask[:, :1])], dim=1)
        core = ~(last[tgt_mask] & (tgt_ids == eos_id))
    replay = None
    if cache_hidden:
        row_images = [next(k for k, im in enumerate(imgs) if im is x) if x is not None else -1 for x in rows_img]
        probe = None
        if B > 2:
            # the first and last rows (another image and another wording) run alone to check the replay
            pick = [0, B - 1]
            pb = family.build_inputs(processor, [rows_img[i] for i in pick], [rows_q[i] for i in pick],
                                     [rows_t[i] for i in pick]).right_aligned().to(device)
            pp = torch.zeros_like(pb.target_mask)
            pp[:, :-1] = pb.target_mask[:, 1:]
            probe = (pb, pp, pick)
        replay = capture_replay(root, family, lo, built, pred_pos, row_images=row_images, probe=probe)
    n = replay.rows if replay is not None else B
    step_mask = built.prompt_mask if replay is None or replay.prompt_mask is None else replay.prompt_mask
    return _Rows(built, pred_pos, tgt_ids, core, replay, torch.full((n,), slot, dtype=torch.long), step_mask)


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
    pool: NegativePool | None = None,
) -> tuple[int, float]:
    """Fit slot ``slot``'s low-rank deltas so every positive answers ``request.target`` (and each of the
    request's ``consequences``, asked on the edit image, answers its own answer).

    Returns ``(steps taken, final teacher-forced accuracy on the positives)``. ``pool`` (the caller's
    negatives) lends its wordings of the edited relation to the positives (``delta_bank_wordings``).
    With ``cache_hidden`` the hidden states entering the lowest edited layer are computed once; each step
    runs only the edited span (forward and backward).

    Two savings that leave the stop exact (``edit_fit_stages``, ``edit_fit_dtype``): the steps first
    train on the edit image's rows alone and move to every positive row once those are done (the other
    rows are views of the same picture, which a delta that answers it mostly answers already); and the
    steps may run in bfloat16, after which the model's own precision re-checks the stop (and takes
    any steps still needed). Either way the fit ends only when every positive row passes the stop
    test in the model's own precision.

    ``stats``, when given, receives the seconds of ``capture`` (building the rows and the replays) and
    ``delta_fit`` (the steps), the mean ``tokens`` a step runs through each of ``span`` decoder layers.
    """
    t_start = time.perf_counter()
    cfg: LDKEConfig = peft_model.peft_config[adapter_name]
    tuner: LDKEModel = peft_model.base_model
    root = _root_model(peft_model)
    family = family_of(root)
    device = next(root.parameters()).device
    slot_layers = cfg.slot_layers[slot]
    lo = min(slot_layers)

    borrowed = delta_borrowed_wordings(request, pool, cfg.delta_bank_wordings)
    imgs, prompts = positive_views(request, seed=seed, n_views=cfg.auto_views, borrowed=borrowed)
    # fit the answer *and* the end of the answer: without the EOS the old answer's tail can carry on
    # after a shorter new target ("puro" -> "puro puet")
    tok = family.tokenizer(processor)
    eos = getattr(tok, "eos_token", None)
    end = eos if isinstance(eos, str) and eos else ""
    rows_img, rows_q, rows_t = delta_rows(request, imgs, prompts)
    rows_t = [t + end for t in rows_t]
    eos_id = getattr(tok, "eos_token_id", None)

    n_steps = steps if steps is not None else cfg.edit_steps
    # an explicit ``steps`` (timing studies), no early stop, or edit_steps=0 (no fit) keep the exact step count
    exact = steps is not None or not stop_early or n_steps == 0

    def rows_of(which: list[int]) -> _Rows:
        return _build_rows(root, family, processor, [rows_img[i] for i in which], [rows_q[i] for i in which], imgs,
                           [rows_t[i] for i in which], bool(end), eos_id, slot, lo, cache_hidden)

    every = list(range(len(rows_q)))
    head = [i for i in every if rows_img[i] is rows_img[0]]
    stages = [rows_of(every)]
    if cfg.edit_fit_stages and not exact and len(head) < len(every):
        stages.insert(0, stages[0].select(head) or rows_of(head))
    full = stages[-1]
    # bfloat16 steps only speed up a float32 model (a half-precision one already runs in its own precision)
    # whose replayed weights are plain tensors (a quantized layer keeps its own compute dtype)
    low = (full.replay is not None and full.replay.hidden.dtype == torch.float32
           and resolve_fit_dtype(cfg.edit_fit_dtype, device) == torch.bfloat16
           and all(p.is_floating_point() for layer in full.replay.layers for p in layer.parameters()))

    ldke_layers = tuner.ldke_layers(adapter_name)
    params = []
    for l in slot_layers:
        m = ldke_layers[l]
        params += [m.ldke_A[adapter_name], m.ldke_B[adapter_name]]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.edit_lr)
    t_steps = time.perf_counter()

    bound = n_steps if exact else fit_step_bound(n_steps, int(full.built.target_mask.sum(1).max()))
    taken, acc, reached, token_steps = 0, 0.0, False, 0
    best: tuple[int, list[torch.Tensor]] | None = None  # (targets hit, parameters) of the best step after phase 1
    stale = 0
    stage = 0
    casts = ExitStack()
    fast: LayerReplay | None = None
    was_training = root.training
    root.eval()  # no dropout: the fit must see what inference sees
    try:
        if low and stages[0].replay is not None:
            fast = casts.enter_context(stages[0].replay.cast(torch.bfloat16))
        check = False  # the next pass only checks the stop (no graph): the first after a switch usually stops
        rounded = False  # the factors were rounded to their stored precision and have not moved since
        must_step = False
        while taken < bound:
            rows = stages[stage]
            last_stage = stage == len(stages) - 1
            try:
                with torch.set_grad_enabled(not check):
                    logits = rows.logits(root, family, fast)
            except (RuntimeError, TypeError) as exc:
                if fast is None:
                    raise
                # a layer that does not run in bfloat16: the fit goes on in the model's own precision
                logger.info("bfloat16 fit steps unavailable (%s); fitting in the model's precision", exc)
                casts.close()
                fast, low = None, False
                continue
            tgt_ids, core = rows.tgt_ids, rows.core
            ce = torch.nn.functional.cross_entropy(logits.float(), tgt_ids, reduction="none")
            loss = ce[core].mean() + (0.25 * ce[~core].mean() if bool((~core).any()) else 0.0)
            if not bool(torch.isfinite(loss)):
                raise EditDivergedError(
                    f"edit {request.prompt!r} -> {request.target!r} diverged at step {taken}: the loss is "
                    f"{float(loss.detach())} (edit_lr={cfg.edit_lr}); lower edit_lr"
                )
            with torch.no_grad():
                hit_all = logits.argmax(-1) == tgt_ids
                hit = hit_all[core]
                acc = float(hit.float().mean())
                p_min = float(torch.exp(-ce[core]).min())  # p(target) = exp(-cross-entropy)
            # stop once the answer is confidently the target AND is followed by its end (else the old
            # answer's tail can carry on in generation: "puro" -> "puro puet")
            done = stop_early and bool(hit.all()) and p_min > 0.5 and bool(hit_all.all())
            if taken >= n_steps and last_stage and bool(hit_all.all()):
                done = True  # phase 2 ends at the argmax on every target token
            if must_step:
                done, must_step = False, False  # the model's own precision said not yet: step before asking again
            if not last_stage and (done or taken >= n_steps):
                # the edit image's rows are done (or phase 1 is over): every positive row from here on
                stage += 1
                if fast is not None:
                    fast = casts.enter_context(stages[stage].replay.cast(torch.bfloat16))
                check = True
                continue
            if done and fast is not None:
                # done in bfloat16: the next pass checks it (and any step after it runs) in the model's own
                # precision, on the factors as the pack will store them, so the stop is the float32 fit's
                casts.close()
                fast = None
                rounded = _round_to_storage(params, cfg.delta_storage)
                check = True
                continue
            if done:
                reached = True
                break
            if check:
                # not done: the same rows again, with a graph, and a step (back in bfloat16 if the check was
                # the model's own precision: the steps stay cheap, and the next stop is checked again)
                check, must_step = False, True
                if low and fast is None and rows.replay is not None:
                    fast = casts.enter_context(rows.replay.cast(torch.bfloat16))
                continue
            rounded = False
            if taken >= n_steps:
                # phase 2 (past the configured steps, up to a bound that grows with the target): keep going
                # until every target token of every positive is the argmax, and keep the best step seen.
                # Where the model cannot reach p > 0.5 at all (a tiny random model whose final norm bounds
                # every logit), this is what ends the fit.
                n_hit = int(hit_all.sum())
                if best is None or n_hit > best[0]:
                    best, stale = (n_hit, [p.detach().clone() for p in params]), 0
                else:
                    stale += 1
                    if stale >= FIT_PATIENCE:
                        break
                    if stale % FIT_STALL_STEPS == 0:
                        for g in opt.param_groups:
                            g["lr"] = min(g["lr"] * 2, cfg.edit_lr * FIT_LR_CAP)
                loss = loss + _argmax_hinge(logits.float(), tgt_ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            taken += 1
            token_steps += rows.tokens
        casts.close()
        fast = None
        if not reached:
            # the loop ran out (or gave up) after a step: score the deltas it ends with, or the best ones seen
            with torch.no_grad():
                hit_all = full.logits(root, family).argmax(-1) == full.tgt_ids
                if best is not None and int(hit_all.sum()) < best[0]:
                    for p, v in zip(params, best[1]):
                        p.copy_(v)
                    hit_all = full.logits(root, family).argmax(-1) == full.tgt_ids
                acc = float(hit_all[full.core].float().mean())
            rounded = False
        if not rounded and _round_to_storage(params, cfg.delta_storage):
            # the pack stores the factors in float16: check the edit on what will be saved
            with torch.no_grad():
                hit_all = full.logits(root, family).argmax(-1) == full.tgt_ids
            after = float(hit_all[full.core].float().mean())
            if after < acc:
                logger.info("edit %r -> %r: rounding the factors to float16 lowered target accuracy %.3f -> %.3f",
                            request.prompt, request.target, acc, after)
            acc = after
    finally:
        casts.close()
        root.train(was_training)
        for p in params:
            p.grad = None
    if stats is not None:
        stats["capture"] = t_steps - t_start
        stats["delta_fit"] = time.perf_counter() - t_steps
        stats["tokens"] = token_steps / taken if taken else full.tokens
        stats["span"] = len(full.replay.layers) if full.replay is not None else len(family.decoder_layers(root))
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


def _attention_for(hidden: torch.Tensor) -> Any:
    """The attention kernel for bfloat16 steps: on a CPU the plain matmul-softmax kernel, which runs a fit's
    short packed sequences (forward and backward) about twice as fast as the fused one in bfloat16."""
    if hidden.device.type != "cpu" or hidden.dtype != torch.bfloat16:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _round_to_storage(params: list[torch.Tensor], storage: str) -> bool:
    """Round the factors to the precision the pack stores them in; whether that is a rounding at all."""
    if storage != "float16":
        return False
    with torch.no_grad():
        for p in params:
            p.copy_(p.half().float())
    return True


def resolve_fit_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The dtype the fit's steps run in for ``edit_fit_dtype`` on ``device``.

    ``"auto"`` picks bfloat16 only where its matmuls are native (a CUDA device that supports it, a CPU
    with AVX-512 BF16 or AMX): elsewhere bfloat16 is emulated and slower than float32.
    """
    if choice == "float32":
        return torch.float32
    if choice == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        native = any(bool(getattr(cpu, f, lambda: False)()) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return torch.bfloat16 if native else torch.float32
    return torch.float32


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


def delta_rows(request: EditRequest, imgs: list[Any], prompts: list[str]) -> tuple[list[Any], list[str], list[str]]:
    """``(images, questions, answers)`` of every row the delta is fitted on: each view with each wording
    answers the target, and each of the request's ``consequences`` answers its own answer.

    A consequence is fitted in the edit's own slot (the router already takes these questions on the edit's
    image: they ask about the edited entity) and on the edit image alone: every further view of it pulls the
    delta away from the edit's own answer on its unseen wordings, and the other views answer it anyway."""
    has_image = request.image is not None
    rows_img, rows_q = _positive_rows(imgs, prompts, has_image)
    rows_t = [request.target.strip()] * len(rows_q)
    for c in request.consequences:
        c_img, c_q = _positive_rows(imgs[:1], [c.prompt], has_image)
        rows_img, rows_q, rows_t = rows_img + c_img, rows_q + c_q, rows_t + [c.answer.strip()] * len(c_q)
    return rows_img, rows_q, rows_t


def _positive_rows(imgs: list[Any], prompts: list[str], has_image: bool) -> tuple[list[Any], list[str]]:
    if not has_image:
        return [None] * len(prompts), list(prompts)
    rows_i, rows_q = [], []
    for i, im in enumerate(imgs):
        for j, q in enumerate(prompts):
            rows_i.append(im)
            rows_q.append(q)
    return rows_i, rows_q
