"""*Making* edits: localization, an edit's scope (positives and negatives), the delta fit, the router fit
and the orchestrating :func:`~.editor.edit` with its rollback. Everything here writes into a pack the
tuner (:mod:`ldke_peft.tuner`) then runs.

Layer: editing (README "Architecture"): imports data, tuner and editing modules, never the product code.
"""
