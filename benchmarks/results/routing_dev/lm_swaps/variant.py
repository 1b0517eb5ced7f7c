"""benchmarks/routing_study.py with ldke_peft.editing.neighbours' constants set from the environment
(NB_CANDIDATES, NB_WORD_WEIGHT): a dev-split study of how the neighbouring questions are proposed."""
import os
import sys

sys.path.insert(0, "benchmarks")
import ldke_peft.editing.neighbours as nb

nb.CANDIDATES = int(os.environ.get("NB_CANDIDATES", nb.CANDIDATES))
if "NB_WORD_WEIGHT" in os.environ:  # the study's second variant (not kept in the library): rank by the words after
    nb.WORD_WEIGHT = float(os.environ["NB_WORD_WEIGHT"])  # the swap only (0) instead of the whole sentence (1)
import routing_study

raise SystemExit(routing_study.main(sys.argv[1:] + ["--set", f"router_neighbour_questions={os.environ.get('NB_N', '8')}"]))
