"""Exception hierarchy.

Every failure a user can trigger with bad input maps to one of these types, each with a message that
names the offending field, file or model type. They all derive from :class:`LDKEError` (and from the
closest builtin, so ``except ValueError`` keeps working for code written against plain PEFT).

Layer: data, a leaf (README "Architecture"): imports nothing of the library.
"""

from __future__ import annotations


class LDKEError(Exception):
    """Base class of every error raised on purpose by ldke-peft."""


class UnsupportedModelError(LDKEError, ValueError):
    """The model's ``config.model_type`` is not a family ldke-peft knows how to edit."""


class ProcessorNotFoundError(LDKEError, FileNotFoundError):
    """A model folder has no processor files (``processor_config.json`` / ``preprocessor_config.json``
    and the tokenizer): the processor lives elsewhere, pass its folder (``--processor``)."""


class InvalidRequestError(LDKEError, ValueError):
    """An :class:`~ldke_peft.requests.EditRequest` (or a record it was parsed from) is malformed.

    ``field`` names the offending field so callers (CLI, EasyEdit wrapper) can report it.
    """

    def __init__(self, message: str, field: str | None = None, index: int | None = None):
        super().__init__(message)
        self.field = field
        self.index = index


class ImageError(InvalidRequestError):
    """An image is missing, unreadable, empty or far too large."""


class AdapterLoadError(LDKEError, ValueError):
    """An LDKE adapter (edit pack) cannot be loaded; the base model was not modified."""


class FingerprintMismatchError(AdapterLoadError):
    """The adapter was made for a different base model than the one it is being loaded onto."""


class CorruptAdapterError(AdapterLoadError):
    """The adapter files are truncated, have missing/extra tensors, wrong shapes or non-finite values."""


class UnsafeAdapterError(AdapterLoadError):
    """The adapter folder contains pickle files or config fields that could execute code; refused."""


class MergeRefusedError(LDKEError, RuntimeError):
    """Merging an LDKE adapter would apply every edit to every input; refused unless forced."""
