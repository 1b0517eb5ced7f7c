"""Dev study: a stated consequence fitted on the edit image only (one row) instead of every view."""
import sys
import ldke_peft.editing.delta_fit as df
from ldke_peft.bench.mke import CALLER_TWO_HOP
stated = set(CALLER_TWO_HOP.values())
real = df._positive_rows
def rows(imgs, prompts, has_image):
    if len(prompts) == 1 and prompts[0] in stated and has_image:
        return real(imgs[:1], prompts, has_image)
    return real(imgs, prompts, has_image)
df._positive_rows = rows
from ldke_peft.bench.run import main
sys.exit(main(sys.argv[1:]))
