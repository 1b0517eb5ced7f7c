"""Integrations of ldke-peft with other editing frameworks (``integrations.easyedit``)."""
