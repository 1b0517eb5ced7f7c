"""``run.py``'s patch (every sentence-encoder embedding multiplied by B) around any study script.

Usage: OMP_NUM_THREADS=1 python run_script.py B SCRIPT [its arguments]
(e.g. ``../anchor_rules/dump.py 30 OUT.json.gz --hold-out-relation``)
"""
import runpy
import sys
from pathlib import Path

from ldke_peft.tuner import question_key

weight = float(sys.argv[1])
real = question_key.SentenceEncoder.encode


def scaled(self, texts, device=None):
    return real(self, texts, device=device) * weight


question_key.SentenceEncoder.encode = scaled
script = Path(sys.argv[2]).resolve()
sys.argv = [str(script)] + sys.argv[3:]
sys.path.insert(0, str(script.parent))
runpy.run_path(str(script), run_name="__main__")
