"""Routing study (#20, dev): does a caller's pool that names the neighbouring relations (in wordings of its own,
none of them a probe) keep near-miss questions out? Wraps benchmarks/routing_study.py with the pool extended."""
import sys
sys.path.insert(0, "benchmarks")
import ldke_peft.bench.run as run

NEIGHBOURS = [
    ("Tell me the most populated city of this country.", "largest city"),
    ("Which urban area in this country has the biggest population?", "largest city"),
    ("Which body of water lies beside this country?", "nearest ocean"),
    ("Name the ocean along this country's coast.", "nearest ocean"),
    ("Which script is this country's language written in?", "writing system"),
    ("In which alphabet is the language of this nation written?", "writing system"),
]
real = run.load_suite

def load_suite(*a, **k):
    s = real(*a, **k)
    probes = {p.prompt for r in s.requests for p in r.coupled}
    assert not probes & {q for q, _ in NEIGHBOURS}, "a pool wording is a probe"
    s.pool.questions = list(s.pool.questions) + NEIGHBOURS
    return s

run.load_suite = load_suite
import routing_study
raise SystemExit(routing_study.main(sys.argv[1:]))
