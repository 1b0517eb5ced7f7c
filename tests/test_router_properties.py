"""Property tests of the Disentanglement Classifier's decision (:class:`ldke_peft.tuner.routing.RouterState`).

Random routers (keys, radii, projections, text-only and image slots, dead slots with radius 0, merged
packs with several projection groups) and random batches, checked against a float64 reference written
from the documented rule, not from the implementation:

* a row is routed to slot ``k`` only if it is inside ``k``'s scope: the textual distance within the
  textual radius and, for an image slot, the visual distance within the visual radius too; an image
  slot only takes rows with an image, a text-only slot only rows without one;
* a row inside some slot's scope is routed, and to the best-scoring in-scope slot (score
  ``max(d_v / r_v, d_t / r_t)`` for image slots, ``d_t / r_t`` for text-only ones);
* rows are independent: permuting the batch permutes the decisions, and each row decides alone as
  it does in the batch.

The router computes in float32, the reference in float64: decisions within ``TOL`` of a radius or of a
tie are not asserted either way.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ldke_peft.tuner.routing import NO_SLOT, RouterState

TOL = 1e-3

finite = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32)
radius = st.one_of(st.just(0.0), st.floats(0.0625, 4.0, width=32))


@st.composite
def routers(draw):
    d = draw(st.integers(1, 4))  # d_model: visual features d, textual 2d
    p = draw(st.integers(1, d))  # proj_dim <= d_model (the default projection is a QR of a d x p matrix)
    K = draw(st.integers(1, 6))
    G = draw(st.integers(1, 3))
    router = RouterState(d, p, K, groups=G, storage=draw(st.sampled_from(["float32", "int8"])))

    def tensor(*shape):
        n = 1
        for s in shape:
            n *= s
        return torch.tensor(draw(st.lists(finite, min_size=n, max_size=n)), dtype=torch.float32).reshape(shape)

    router.set_projection(mu_v=tensor(d), proj_v=tensor(d, p), mu_t=tensor(2 * d), proj_t=tensor(2 * d, p))
    for k in range(K):
        router.set_slot(k, key_v=tensor(p), key_t=tensor(p), radius_v=draw(radius), radius_t=draw(radius),
                        needs_image=draw(st.booleans()))
    if G > 1:
        router.proj_group.copy_(torch.tensor(draw(st.lists(st.integers(0, G - 1), min_size=K, max_size=K))))
        router.extra_mu_v.copy_(tensor(G - 1, d))
        router.extra_proj_v.copy_(tensor(G - 1, d, p))
        router.extra_mu_t.copy_(tensor(G - 1, 2 * d))
        router.extra_proj_t.copy_(tensor(G - 1, 2 * d, p))
    B = draw(st.integers(1, 7))
    visual = tensor(B, d)
    textual = tensor(B, 2 * d)
    has_image = torch.tensor(draw(st.lists(st.booleans(), min_size=B, max_size=B)))
    # some rows sit exactly on a slot's keys (in projected space that is hard to hit by chance): pull a
    # row towards slot k by solving for features that project onto its keys, when the projection allows
    for b in range(B):
        k = draw(st.integers(-1, K - 1))
        if k >= 0:
            g = int(router.proj_group[k]) if G > 1 else 0
            mu_v, P_v, mu_t, P_t = _projection(router, g)
            sol_v = torch.linalg.lstsq(P_v.T.double(), (router.keys_v[k]).double().unsqueeze(1)).solution.squeeze(1)
            sol_t = torch.linalg.lstsq(P_t.T.double(), (router.keys_t[k]).double().unsqueeze(1)).solution.squeeze(1)
            visual[b] = (sol_v + mu_v.double()).float()
            textual[b] = (sol_t + mu_t.double()).float()
    return router, visual, textual, has_image


def _projection(router: RouterState, g: int):
    if g == 0:
        if router.proj_v.dtype == torch.int8:  # documented: int8 entries times their column's scale
            return (router.mu_v, router.proj_v.double() * router.proj_v_scale.double(),
                    router.mu_t, router.proj_t.double() * router.proj_t_scale.double())
        return router.mu_v, router.proj_v, router.mu_t, router.proj_t
    return router.extra_mu_v[g - 1], router.extra_proj_v[g - 1], router.extra_mu_t[g - 1], router.extra_proj_t[g - 1]


def reference_scores(router: RouterState, visual, textual, has_image) -> torch.Tensor:
    """``(B, K)`` float64 scores from the documented rule; ``inf`` where the slot cannot take the row."""
    B, K = visual.shape[0], router.num_slots
    out = torch.full((B, K), float("inf"), dtype=torch.float64)
    for k in range(K):
        g = int(router.proj_group[k]) if router.num_groups > 1 else 0
        mu_v, P_v, mu_t, P_t = (t.double() for t in _projection(router, g))
        rv, rt = float(router.radius_v[k]), float(router.radius_t[k])
        needs = bool(router.needs_image[k])
        for b in range(B):
            if needs != bool(has_image[b]) or rt <= 0 or (needs and rv <= 0):
                continue
            dt = torch.linalg.vector_norm((textual[b].double() - mu_t) @ P_t - router.keys_t[k].double())
            score = float(dt) / rt
            if needs:
                dv = torch.linalg.vector_norm((visual[b].double() - mu_v) @ P_v - router.keys_v[k].double())
                score = max(score, float(dv) / rv)
            out[b, k] = score
    return out


@settings(max_examples=150, deadline=None)
@given(case=routers())
def test_routes_only_inside_scope_and_to_the_best_slot(case):
    router, visual, textual, has_image = case
    got = router.route(visual, textual, has_image)
    ref = reference_scores(router, visual, textual, has_image)
    assert got.shape == (visual.shape[0],) and got.dtype == torch.long
    for b in range(visual.shape[0]):
        k = int(got[b])
        best = float(ref[b].min())
        if k != NO_SLOT:
            # never outside every radius: the chosen slot's own test passes (both parts for an image slot)
            assert ref[b, k] <= 1.0 + TOL, (b, k, ref[b])
            # compatible with the row's modality (text-only rows never reach image slots)
            assert bool(router.needs_image[k]) == bool(has_image[b])
            # and it is the best in-scope slot
            assert ref[b, k] <= best + TOL, (b, k, ref[b])
        else:
            assert best >= 1.0 - TOL, (b, ref[b])


@settings(max_examples=80, deadline=None)
@given(case=routers(), data=st.data())
def test_rows_are_independent(case, data):
    router, visual, textual, has_image = case
    B = visual.shape[0]
    perm = torch.tensor(data.draw(st.permutations(list(range(B)))))
    full = router.route(visual, textual, has_image)
    permuted = router.route(visual[perm], textual[perm], has_image[perm])
    assert torch.equal(permuted, full[perm])
    for b in range(B):
        alone = router.route(visual[b : b + 1], textual[b : b + 1], has_image[b : b + 1])
        assert int(alone) == int(full[b])


@settings(max_examples=50, deadline=None)
@given(case=routers())
def test_text_only_rows_never_reach_image_slots(case):
    router, visual, textual, _ = case
    B = visual.shape[0]
    got = router.route(visual, textual, torch.zeros(B, dtype=torch.bool))
    for k in got.tolist():
        assert k == NO_SLOT or not bool(router.needs_image[k])
    # and image rows never reach text-only slots
    got = router.route(visual, textual, torch.ones(B, dtype=torch.bool))
    for k in got.tolist():
        assert k == NO_SLOT or bool(router.needs_image[k])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_int8_projection_is_what_routing_uses(d, p, seed):
    """``set_projection`` on an int8 router stores each column to within half its scale, and routing
    projects with exactly the stored bytes (so keys fitted after ``set_projection`` stay exact); a
    router loaded from that state_dict projects identically."""
    p = min(p, d)  # the default projection is a QR of a d x p matrix
    g = torch.Generator().manual_seed(seed)
    P_v, P_t = torch.randn(d, p, generator=g), torch.randn(2 * d, p, generator=g)
    router = RouterState(d, p, 2, storage="int8")
    router.set_projection(mu_v=torch.zeros(d), proj_v=P_v, mu_t=torch.zeros(2 * d), proj_t=P_t)
    assert router.proj_v.dtype == torch.int8 and router.storage == "int8"
    for q, scale, full in ((router.proj_v, router.proj_v_scale, P_v), (router.proj_t, router.proj_t_scale, P_t)):
        assert int(q.abs().max()) == 127
        assert bool(((q.float() * scale - full).abs() <= scale / 2 + 1e-7).all())
    v, t = torch.randn(3, d, generator=g), torch.randn(3, 2 * d, generator=g)
    zv, zt = router.project(v, t)
    assert torch.equal(zv, v @ (router.proj_v.float() * router.proj_v_scale))
    assert torch.equal(zt, t @ (router.proj_t.float() * router.proj_t_scale))
    fresh = RouterState(d, p, 2, storage="int8")
    fresh.load_state_dict(router.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.project(v, t), (zv, zt)))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["float32", "int8"]))
def test_projection_of_features_with_a_small_spread_is_exact_enough_for_their_radii(seed, storage):
    """Features of a tiny model sit close together around their mean; the projection fitted to separate
    them has large entries. A row must still project to where the float64 arithmetic puts it (to well
    within a radius fitted on that spread), whatever rows share its batch."""
    g = torch.Generator().manual_seed(seed)
    d, p = 32, 8
    mu = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    x = mu + 1e-5 * torch.randn(5, d, generator=g)
    P = 1e4 * torch.randn(d, p, generator=g)
    router = RouterState(d, p, 1, storage=storage)
    router.set_projection(mu_v=mu, proj_v=P, mu_t=torch.zeros(2 * d), proj_t=torch.randn(2 * d, p, generator=g))
    proj = router.projections()[0].double()
    want = (x.double() - router.mu_v.double()) @ proj
    got = router.project(x, torch.zeros(5, 2 * d))[0].double()
    spread = float(want.std(dim=0).norm())
    assert float((got - want).norm(dim=1).max()) < 1e-4 * spread
    one = router.project(x[:1], torch.zeros(1, 2 * d))[0].double()
    assert float((one - got[:1]).norm()) < 1e-4 * spread


def test_empty_router_routes_nothing():
    router = RouterState(4, 2, 0)
    out = router.route(torch.zeros(3, 4), torch.zeros(3, 8), torch.tensor([True, False, True]))
    assert out.tolist() == [NO_SLOT] * 3


def test_a_slot_is_dead_until_its_radii_are_set():
    """A fresh slot (radius 0) never fires, even for a row exactly on its keys."""
    router = RouterState(2, 2, 1)
    router.set_projection(mu_v=torch.zeros(2), proj_v=torch.eye(2), mu_t=torch.zeros(4), proj_t=torch.eye(4)[:, :2])
    v, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    router.set_slot(0, key_v=[1.0, 0.0], key_t=[0.0, 1.0], radius_v=0.0, radius_t=0.0)
    assert router.route(v, t, torch.tensor([True])).tolist() == [NO_SLOT]
    router.set_slot(0, key_v=[1.0, 0.0], key_t=[0.0, 1.0], radius_v=0.1, radius_t=0.1)
    assert router.route(v, t, torch.tensor([True])).tolist() == [0]
    # both parts must match: the right image with a question outside the textual radius does not route
    assert router.route(v, torch.tensor([[0.0, 1.5, 0.0, 0.0]]), torch.tensor([True])).tolist() == [NO_SLOT]
    assert router.route(torch.tensor([[1.5, 0.0]]), t, torch.tensor([True])).tolist() == [NO_SLOT]


@st.composite
def pooling_cases(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 7))
    d = draw(st.integers(1, 5))
    h = torch.tensor(draw(st.lists(finite, min_size=B * T * d, max_size=B * T * d))).view(B, T, d)
    bits = st.lists(st.booleans(), min_size=B * T, max_size=B * T)
    image = torch.tensor(draw(bits)).view(B, T)
    prompt = torch.tensor(draw(bits)).view(B, T)
    return h, image, prompt


@given(pooling_cases())
@settings(max_examples=150, deadline=None)
def test_pool_features_match_the_documented_rule(case):
    """Visual = mean over image tokens, textual = [mean over prompt text tokens ; last prompt token],
    each L2-normalised (zeros where a row has no such token); float64 reference."""
    from ldke_peft.tuner.routing_state import pool_features

    h, image, prompt = case
    v, t, has = pool_features(h, image, prompt)
    B, T, d = h.shape
    for b in range(B):
        hb = h[b].double()

        def unit(x):
            n = x.norm()
            return x / n if n > 1e-6 else torch.zeros_like(x)

        img = [i for i in range(T) if image[b, i]]
        txt = [i for i in range(T) if prompt[b, i] and not image[b, i]]
        last = max([i for i in range(T) if prompt[b, i]], default=0)
        ref_v = unit(hb[img].mean(0)) if img else torch.zeros(d, dtype=torch.float64)
        ref_m = unit(hb[txt].mean(0)) if txt else torch.zeros(d, dtype=torch.float64)
        ref_l = unit(hb[last])
        assert bool(has[b]) == bool(img)
        # near-zero vectors normalise unstably in float32: only compare well-conditioned parts
        for got, ref, src in ((v[b], ref_v, hb[img].mean(0) if img else None),
                              (t[b, :d], ref_m, hb[txt].mean(0) if txt else None),
                              (t[b, d:], ref_l, hb[last])):
            if src is None or src.norm() > 1e-3:
                assert torch.allclose(got.double(), ref, atol=1e-4), (got, ref)


@settings(max_examples=150, deadline=None)
@given(case=routers())
def test_rows_the_visual_gate_turns_away_route_nowhere(case):
    """``may_route`` (which spares the question encoder for inputs showing no edited entity) never turns
    away a row that ``route`` would send to a slot."""
    router, visual, textual, has_image = case
    gate = router.may_route(visual, has_image)
    got = router.route(visual, textual, has_image)
    assert gate.shape == got.shape and gate.dtype == torch.bool
    assert bool((gate | (got == NO_SLOT)).all()), (gate, got)


def test_textual_anchors_veto_rows_nearest_to_an_out_of_scope_anchor():
    """Inside the textual radius, a row routes when its nearest anchor of the slot is in scope and not when
    it is out of scope; a slot without anchors (slot 1) decides by its radii alone, as before."""
    router = RouterState(2, 2, 2)
    eye = torch.eye(2)
    router.set_projection(mu_v=torch.zeros(2), proj_v=eye, mu_t=torch.zeros(4), proj_t=torch.cat([eye, eye * 0]))
    for k in (0, 1):
        router.set_slot(k, key_v=torch.zeros(2), key_t=torch.zeros(2) + 10 * k, radius_v=1.0, radius_t=1.0)
    router.set_text_anchors(0, pos=torch.tensor([[0.0, 0.0], [0.0, 0.8]]), neg=torch.tensor([[0.8, 0.0]]))
    assert router.num_anchors == 3
    # textual rows (projection keeps the first two coordinates): near the edit's own wordings / near the neighbour
    textual = torch.tensor([[0.1, 0.7, 0, 0], [0.7, 0.1, 0, 0], [10.6, 10.1, 0, 0], [10.1, 10.6, 0, 0]])
    got = router.route(torch.zeros(4, 2), textual, torch.ones(4, dtype=torch.bool)).tolist()
    assert got == [0, NO_SLOT, 1, 1]
    # a slot whose anchors are all out of scope has nothing to compare with: it decides by its radius
    router.set_text_anchors(1, pos=torch.zeros(0, 2), neg=torch.tensor([[10.6, 10.1]]))
    assert router.route(torch.zeros(4, 2), textual, torch.ones(4, dtype=torch.bool)).tolist() == [0, NO_SLOT, 1, 1]
    # replacing slot 0's anchors drops the old ones
    router.set_text_anchors(0, pos=torch.tensor([[0.8, 0.0]]), neg=torch.zeros(0, 2))
    assert router.num_anchors == 2
    assert router.route(torch.zeros(4, 2), textual, torch.ones(4, dtype=torch.bool)).tolist()[:2] == [0, 0]


def test_a_row_naming_the_slots_asked_word_is_vetoed_only_by_anchors_naming_it():
    """The proposed neighbours swap the asked-for word out: a question that names it is a wording of the edit, so
    only out-of-scope anchors that name it too (the caller's own questions about the same thing) veto it. Rows
    are matched by word form (case, plural and possessive aside); a slot without a word vetoes as before."""
    from ldke_peft.tuner.text_anchors import names_word

    router = RouterState(2, 2, 2)
    eye = torch.eye(2)
    router.set_projection(mu_v=torch.zeros(2), proj_v=eye, mu_t=torch.zeros(4), proj_t=torch.cat([eye, eye * 0]))
    for k in (0, 1):
        router.set_slot(k, key_v=torch.zeros(2), key_t=torch.zeros(2) + 10 * k, radius_v=1.0, radius_t=1.0)
        router.set_text_anchors(k, pos=torch.tensor([[0.0, 0.0]]) + 10 * k, neg=torch.tensor([[0.8, 0.0]]) + 10 * k)
    router.slot_words = ("capital", "")
    textual = torch.tensor([[0.7, 0.0, 0, 0], [0.7, 0.0, 0, 0], [10.7, 10.0, 0, 0], [10.7, 10.0, 0, 0]])
    qs = ["Which city is this country's CAPITALS?", "Which city is the largest?", "The capital?", "Other?"]
    named = router.named_mask(qs)
    assert named.tolist() == [[True, False], [False, False], [True, False], [False, False]]
    img = torch.ones(4, dtype=torch.bool)
    assert router.route(torch.zeros(4, 2), textual, img).tolist() == [NO_SLOT] * 4
    # row 0 names slot 0's word: the unnamed neighbour no longer vetoes it; slot 1 has no word: both vetoed
    assert router.route(torch.zeros(4, 2), textual, img, named).tolist() == [0, NO_SLOT, NO_SLOT, NO_SLOT]
    # an out-of-scope anchor that names the word vetoes a row naming it
    router.set_text_anchors(0, pos=torch.tensor([[0.0, 0.0]]), neg=torch.tensor([[0.8, 0.0], [0.75, 0.0]]),
                            named=torch.tensor([False, True]))
    assert router.anchors_pos[router.anchors_slot == 0].tolist() == [1.0, 0.0, -1.0]
    assert router.route(torch.zeros(4, 2), textual, img, named).tolist() == [NO_SLOT] * 4
    router.slot_words = ()
    assert router.named_mask(qs) is None and names_word(["", ""], qs).sum() == 0


def test_word_forms_match_plurals_possessives_and_unicode_forms():
    """A question names a slot's word in any of its ordinary forms: a plural (-s, -es, -ies), a possessive, another
    case, a decomposed accent; a longer word that merely starts with it does not."""
    import unicodedata

    from ldke_peft.tuner.text_anchors import names_word

    qs = ["Which CURRENCIES are used here?", "The nation's capital?", "How many buses run?",
          unicodedata.normalize("NFD", "A café?"), "Is this it?", "Which addresses?"]
    got = names_word(["currency", "nation", "bus", "café", "thi", "address"], qs)
    assert got.tolist() == [[i == k for k in range(6)] for i in range(6)][:4] + [[False] * 6, [False] * 5 + [True]]
    # a word recorded in another form (the edit metadata is a JSON file a user can edit) matches as its word form
    assert names_word(["Capitals", "CAFE\u0301"], ["The capital?", "Un café"]).tolist() == [[True, False], [False, True]]
