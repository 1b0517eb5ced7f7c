"""Dev study (#20): the weight of the sentence encoder's half of the router's textual feature.

The textual feature is [probe-layer text features ; encoder embedding] (``router_text_probe``), projected by a PCA
fitted on the pack's rows. Scaling the encoder half by ``B`` (B = 1: the library) moves the projected space between
the probe layer's (wording) and the encoder's (meaning); the nearest-anchor veto and the radii are computed there.
Patched for the study only: every encoder embedding (fit, anchors, inference) is multiplied by B.

Usage: OMP_NUM_THREADS=1 python run.py B [benchmarks/routing_study.py arguments]
"""
import sys
from pathlib import Path

import torch

from ldke_peft.tuner import question_key

weight = float(sys.argv[1])
real = question_key.SentenceEncoder.encode


def scaled(self, texts, device=None):
    return real(self, texts, device=device) * weight


question_key.SentenceEncoder.encode = scaled
sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from benchmarks.routing_study import main  # noqa: E402

torch.set_num_threads(1)
raise SystemExit(main(sys.argv[2:]))
