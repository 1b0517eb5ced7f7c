"""Answer-level study (#20, dev): the delta fitted on the caller's own wordings of the edited relation.

The router's textual positives already borrow the caller pool's wordings of the edited relation
(``same_relation_questions``); the delta is fitted on the request's wordings topped up with templated
rephrasings ("Question: ...", "... Answer briefly."). Here the top-up takes the pool's wordings of the relation
first (the same number of wordings, so the same rows and cost). Wraps ``ldke bench`` (arguments passed through)."""
import sys

import ldke_peft.bench.run as run
import ldke_peft.editing.delta_fit as delta_fit
from ldke_peft.editing.augment import dedupe, templated_rephrasings
from ldke_peft.editing.scope import positive_views, same_relation_questions

POOL = {}
real_load = run.load_suite


def load_suite(*a, **k):
    s = real_load(*a, **k)
    POOL["pool"] = s.pool
    return s


def positive_views_borrowing(r, seed=0, n_auto=2, n_views=None, mirror=True):
    imgs, _ = positive_views(r, seed=seed, n_auto=n_auto, n_views=n_views, mirror=mirror)
    prompts = dedupe([r.prompt] + list(r.rephrase_prompts))
    if len(prompts) < 1 + n_auto and "pool" in POOL:
        same = [q for q in same_relation_questions(r, POOL["pool"], 0) if q.strip().casefold() != r.prompt.strip().casefold()]
        prompts = dedupe(prompts + same)[: 1 + n_auto]
    if len(prompts) < 1 + n_auto:
        prompts = dedupe(prompts + templated_rephrasings(r.prompt, 1 + n_auto - len(prompts)))
    return imgs, prompts


run.load_suite = load_suite
delta_fit.positive_views = positive_views_borrowing
raise SystemExit(run.main(sys.argv[1:]))
