"""benchmarks/routing_study.py with ldke_peft.editing.neighbours' constants set from the environment
(NB_CANDIDATES, NB_WORD_WEIGHT): a dev-split study of how the neighbouring questions are proposed."""
import os
import sys

sys.path.insert(0, "benchmarks")
import ldke_peft.editing.neighbours as nb

nb.CANDIDATES = int(os.environ.get("NB_CANDIDATES", nb.CANDIDATES))
nb.WORD_WEIGHT = float(os.environ.get("NB_WORD_WEIGHT", nb.WORD_WEIGHT))
import routing_study

raise SystemExit(routing_study.main(sys.argv[1:] + ["--set", f"router_neighbour_questions={os.environ.get('NB_N', '8')}"]))
