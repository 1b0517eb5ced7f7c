"""Testing helpers: tiny random models of every family and the trained toy world.

The toy world's entry point is ``ldke_peft.testing.toy_world.toy_world`` (the submodule is not
shadowed by the function here, so ``from ldke_peft.testing import toy_world as tw`` keeps giving
the module that ``tw.toy_world(...)``, ``tw.cache_key(...)`` etc. live in).
"""

from .tiny import tiny_model, tiny_model_types
from .toy_world import ToyWorld

__all__ = ["ToyWorld", "tiny_model", "tiny_model_types"]
