"""The PEFT tuner that *runs* LDKE packs: config, layers, routing, storage. It knows nothing of fitting.

``LDKEModel`` (:mod:`.model`) injects :class:`~.layer.LDKELinear` layers into the localized decoder
layers; the routing hooks (:mod:`.routing_hooks`) hand each call's router inputs to them; packs are
stored and checked by :mod:`.io`, :mod:`.safety` and :mod:`.pack_meta`.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""
