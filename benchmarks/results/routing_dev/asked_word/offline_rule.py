"""Offline, on dump.py's distances (dev): the library's nearest-anchor veto against the same veto with the asked-for
word (a question that names the word its slot's edit question asks about is vetoed only by out-of-scope anchors that
name it; the dumps' anchors that name it are the caller's same-image questions and none of the proposed neighbours).
Per probe kind, the share routed as it should (in scope: to the slot; the others: to no slot).
Usage: OMP_NUM_THREADS=1 python offline_rule.py DUMP.json.gz [DUMP.json.gz ...]"""
import gzip
import json
import sys
from collections import defaultdict

import torch

torch.set_num_threads(1)
from ldke_peft import LDKEConfig  # noqa: E402
from ldke_peft.bench.run import load_suite  # noqa: E402
from ldke_peft.editing.neighbours import asked_word, frame_words  # noqa: E402
from ldke_peft.tuner.question_key import load_encoder  # noqa: E402
from ldke_peft.tuner.text_anchors import names_word  # noqa: E402

IN_SCOPE = {"reliability", "t_generality", "x_in_scope"}


def main():
    encode = load_encoder(LDKEConfig().router_text_encoder).encode
    suite = load_suite("full", 30, split="dev")
    for path in sys.argv[1:]:
        with gzip.open(path, "rt") as fh:
            d = json.load(fh)
        res = {"library (nearest anchor)": defaultdict(lambda: [0, 0]), "asked-for word": defaultdict(lambda: [0, 0])}
        words = {}
        for e, r in zip(d["edits"], suite.requests):
            assert (e["subject"], e["relation"]) == (r.subject, r.relation)
            qs = [q for q, rel in suite.pool.questions if not (d["hold_out_relation"] and rel == r.relation)]
            w = asked_word(r.prompt, frame_words(qs), encode)
            words[r.prompt] = w
            kinds = e["anchor_kinds"]
            dist = torch.tensor(e["dist"])
            pos = torch.tensor([k == "pos" for k in kinds])
            named_anchor = names_word([w], e["anchor_texts"])[:, 0] & ~pos
            d_pos = dist[:, pos].min(1).values
            veto = dist[:, ~pos].min(1).values < d_pos
            d_named = torch.where(named_anchor, dist, torch.inf).min(1).values
            named = names_word([w], e["probe_texts"])[:, 0]
            veto_w = torch.where(named, d_named < d_pos, veto)
            for name, v in (("library (nearest anchor)", veto), ("asked-for word", veto_w)):
                routed = torch.tensor(e["inside"]) & ~v
                for k, got in zip(e["probe_kinds"], routed.tolist()):
                    ok = got if k in IN_SCOPE else not got
                    res[name][k][0] += int(ok)
                    res[name][k][1] += 1
        print(path, "hold_out_relation", d["hold_out_relation"], "asked-for words", words)
        for name, agg in res.items():
            print(f"  {name:26s}", json.dumps({k: round(a / n, 3) for k, (a, n) in sorted(agg.items())}))


if __name__ == "__main__":
    main()
