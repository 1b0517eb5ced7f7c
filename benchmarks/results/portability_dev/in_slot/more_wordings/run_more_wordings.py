import sys
import ldke_peft.editing.delta_fit as df
real = df.positive_views
def more(r, *a, borrowed=(), **k):
    if r.consequences and borrowed:
        k["n_auto"] = 2 + len(borrowed)
    return real(r, *a, borrowed=borrowed, **k)
df.positive_views = more
from ldke_peft.bench.run import main
sys.exit(main(sys.argv[1:]))
