"""The edit metadata of a pack, in its own file beside the adapter: ``ldke_edits.json``.

Owns: the file's name and layout, writing it (:func:`write_edits`, called by
:meth:`ldke_peft.LDKEConfig.save_pretrained`) and reading it back into the config at load time
(:func:`read_edits`). Imports nothing from the tuner or the editor.

Why a file of its own: PEFT treats ``adapter_config.json`` as the adapter's hyperparameters (it is
diffed, printed, merged into model cards). Per-edit prompts, targets, subjects and edit-time metrics
are data about the pack's content, they grow with every edit, and a user reviewing a pack wants them
apart from the settings. Packs of format 1.3 and older kept them in ``adapter_config.json`` under
``edits``; those still load (the file is then not looked for).

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import CorruptAdapterError

EDITS_FILE = "ldke_edits.json"
#: Pack formats that kept the edit metadata inside ``adapter_config.json``.
FORMATS_WITH_EDITS_IN_CONFIG = ("1.0", "1.1", "1.2", "1.3")


def has_edits_file(config: Any) -> bool:
    """Whether a pack of ``config``'s format keeps its edit metadata in :data:`EDITS_FILE`."""
    return str(getattr(config, "pack_format_version", "")) not in FORMATS_WITH_EDITS_IN_CONFIG


def write_edits(folder: str | os.PathLike, config: Any) -> str:
    """Write ``config.edits`` to ``folder/ldke_edits.json``; returns the path."""
    path = os.path.join(os.fspath(folder), EDITS_FILE)
    data = {"pack_format_version": str(config.pack_format_version), "num_slots": int(config.num_slots),
            "edits": list(config.edits or [])}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, ensure_ascii=False)
        fh.write("\n")
    return path


def read_edits(path: str, config: Any) -> list[dict[str, Any]]:
    """The edit metadata in the file at ``path``, checked against ``config``.

    Raises:
        CorruptAdapterError: the file is not JSON, not the layout :func:`write_edits` writes, or
            describes another number of slots than the config.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptAdapterError(f"cannot read the LDKE pack's {EDITS_FILE}: {exc}") from exc
    edits = data.get("edits") if isinstance(data, dict) else None
    if not isinstance(edits, list) or not all(isinstance(e, dict) for e in edits):
        raise CorruptAdapterError(f"the LDKE pack's {EDITS_FILE} has no list of edits (an object per slot)")
    if len(edits) > int(config.num_slots) or data.get("num_slots", config.num_slots) != config.num_slots:
        raise CorruptAdapterError(
            f"the LDKE pack's {EDITS_FILE} describes {data.get('num_slots', len(edits))} slots with "
            f"{len(edits)} edits but adapter_config.json has num_slots={config.num_slots}: the files come from "
            "different saves"
        )
    return edits
