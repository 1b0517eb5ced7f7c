"""Testing helpers: tiny random models of every family and the trained toy world.

``from ldke_peft.testing import toy_world`` gives the function (``world = toy_world()``). The module it
lives in stays importable as ``ldke_peft.testing.toy_world_module`` (and by its dotted name:
``from ldke_peft.testing.toy_world import cache_key, ...``).
"""

from . import toy_world as toy_world_module
from .tiny import tiny_model, tiny_model_types
from .toy_world import ToyWorld, toy_world

__all__ = ["ToyWorld", "tiny_model", "tiny_model_types", "toy_world", "toy_world_module"]
