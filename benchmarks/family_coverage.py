"""Which image-text-to-text model types of the installed transformers LDKE edits end to end.

For every model type in ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`` (one child process each, with
a time limit):

1. **support**: ``ldke_peft.families.get_family`` -- encoder-decoder and cross-attention types are
   refused here, with the reason;
2. **builds**: a tiny model -- the hand-made builder of ``ldke_peft.testing.tiny`` where there is one
   (real model class + real processor class around a tokenizer trained on the fly), else the type's
   default config shrunk by ``ldke_peft.testing.shrink`` (model only);
3. **structure**: ``family_of(model)`` derives the language model, decoder layers and MLP outputs and
   checks the image token -- a failure says why;
4. **edits** / **reloads**: ``ldke_peft.testing.roundtrip.round_trip`` (edit; routed vs.
   out-of-scope logits; save; ``PeftModel.from_pretrained``; bitwise logits; KV-cache ``generate``).
   This needs a processor, i.e. a tiny builder; types without one say so.

Writes ``family_coverage.md`` and ``family_coverage.json`` (rows, counts, command, commit).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/family_coverage.py [--types llava gemma3 ...] [--timeout 300]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "family_coverage"

logger = logging.getLogger("family_coverage")


@dataclass
class Row:
    model_type: str
    model_class: str
    builder: str = ""  # "tiny" (hand-made, with processor) / "shrunk" (default config, model only) / ""
    supported: bool = False
    builds: bool = False
    structure: bool = False
    edits: bool = False
    reloads: bool = False
    reason: str = ""
    seconds: float = 0.0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}"


def check(model_type: str) -> Row:
    """Run the stages above for one model type (in the calling process)."""
    import torch
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from ldke_peft.errors import UnsupportedModelError
    from ldke_peft.families import check_config, family_of, get_family
    from ldke_peft.testing.roundtrip import round_trip
    from ldke_peft.testing.tiny import tiny_model, tiny_model_types

    row = Row(model_type, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type])
    row.reason = _why_unsupported(get_family, model_type)
    if row.reason:
        return row
    row.supported = True

    has_builder = model_type in tiny_model_types()
    row.builder = "tiny" if has_builder else "shrunk"
    if not has_builder:
        try:
            check_config(AutoConfig.for_model(model_type))
        except UnsupportedModelError as exc:
            row.reason = f"default config: {exc}"
            return row
        except Exception:  # noqa: BLE001 - no default config: building says why
            pass
    try:
        if has_builder:
            model, _ = tiny_model(model_type)
        else:
            model = _shrunk_model(model_type)
    except ImportError as exc:
        row.reason = f"no tiny model: a dependency is not installed here ({_one_line(exc)[:160]})"
        return row
    except Exception as exc:  # noqa: BLE001 - the report records why
        row.reason = f"no tiny model: the generic config shrink does not fit this architecture ({_one_line(exc)})"
        return row
    row.builds = True
    row.reason = _why_unsupported(family_of, model)
    if row.reason:
        return row
    row.structure = True
    if not has_builder:
        row.reason = f"structure derived, not edited: {_no_processor_reason(model_type)}"
        return row
    del model
    torch.manual_seed(0)
    try:
        result = round_trip(lambda: tiny_model(model_type))
    except Exception as exc:  # noqa: BLE001
        row.reason = f"round trip raised {_one_line(exc)}"
        logger.debug("%s", traceback.format_exc())
        return row
    row.edits, row.reloads, row.reason = result.edits, result.reloads, result.reason
    return row


def _no_processor_reason(model_type: str) -> str:
    """Why there is no tiny processor (so no inputs) for a type without a hand-made builder."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    processor = PROCESSOR_MAPPING_NAMES.get(model_type)
    image = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
    if not processor:
        return "transformers maps no processor class to this type (inputs come from model-specific code)"
    if isinstance(image, dict) and "pil" not in image:
        return f"its image processor ({image.get('torchvision')}) exists only as a torchvision class, not installed here"
    return (f"no tiny builder for its processor ({processor}) in ldke_peft.testing yet; the real tokenizer and "
            "processor files are on the Hub, not offline")


def _why_unsupported(fn: Any, arg: Any) -> str:
    """``fn(arg)``'s :class:`UnsupportedModelError` message, or ``""`` when it passes."""
    from ldke_peft.errors import UnsupportedModelError

    try:
        fn(arg)
    except UnsupportedModelError as exc:
        return str(exc)
    return ""


def _shrunk_model(model_type: str) -> Any:
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ldke_peft.testing.shrink import shrink_config

    cfg = shrink_config(AutoConfig.for_model(model_type))
    return AutoModelForImageTextToText.from_config(cfg).eval()


def _child(model_type: str, queue: Any) -> None:
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    try:
        row = check(model_type)
    except Exception as exc:  # noqa: BLE001 - a crash is a row too
        row = Row(model_type, "?", reason=f"crashed: {_one_line(exc)}")
    row.seconds = round(time.perf_counter() - t0, 1)
    queue.put(asdict(row))


def run(types: list[str], timeout: float) -> list[dict[str, Any]]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    import ldke_peft  # noqa: F401  (imported once, before forking: children start warm)

    ctx = mp.get_context("fork")
    rows = []
    for mt in types:
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(mt, queue))
        t0 = time.perf_counter()
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            row = asdict(Row(mt, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(mt, "?"),
                             reason=f"timed out after {timeout:.0f} s", seconds=round(time.perf_counter() - t0, 1)))
        elif queue.empty():
            row = asdict(Row(mt, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(mt, "?"),
                             reason=f"child process died (exit code {proc.exitcode})"))
        else:
            row = queue.get()
        logger.info("%-28s builds=%s edits=%s reloads=%s %s", mt, row["builds"], row["edits"], row["reloads"], row["reason"][:120])
        rows.append(row)
    return rows


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


_STAGES = ("supported", "builds", "structure", "edits", "reloads")


def _cells(row: dict[str, Any]) -> list[str]:
    """builds / structure / edits / reloads as yes / no, and "-" where an earlier stage stopped the row."""
    out = []
    for before, stage in zip(_STAGES, _STAGES[1:]):
        out.append("-" if not row[before] else ("yes" if row[stage] else "no"))
    return out


def write(rows: list[dict[str, Any]], out_dir: Path, command: str, commit: str) -> dict[str, Any]:
    import torch
    import transformers

    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {
        "model_types": len(rows),
        "supported": sum(r["supported"] for r in rows),
        "builds": sum(r["builds"] for r in rows),
        "structure_ok": sum(r["structure"] for r in rows),
        "edits": sum(r["edits"] for r in rows),
        "reloads": sum(r["reloads"] for r in rows),
        "end_to_end": sum(r["edits"] and r["reloads"] for r in rows),
    }
    meta = {
        "command": command,
        "commit": commit,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    payload = {"meta": meta, "counts": counts, "rows": rows}
    (out_dir / "family_coverage.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# Family coverage: every image-text-to-text model type of transformers "
        f"{meta['transformers']}",
        "",
        f"Command: `{command}`  ",
        f"Commit: `{meta['commit']}`, {meta['date_utc']}, torch {meta['torch']}, CPU",
        "",
        f"**{counts['end_to_end']} of {counts['model_types']} model types edit end to end** (edit, routed and "
        f"out-of-scope logits, save, `PeftModel.from_pretrained`, bitwise logits, KV-cache `generate`); "
        f"{counts['supported']} pass the type check, {counts['builds']} build a tiny model, "
        f"{counts['structure_ok']} have their structure derived with no family code or a quirk family.",
        "",
        "builder: `tiny` = hand-made tiny model with its real processor (`ldke_peft.testing.tiny`); "
        "`shrunk` = the type's default config shrunk (model only, no processor offline). "
        "`-` = not tried (an earlier stage stopped the row; the reason says why).",
        "",
        "| model_type | class | builder | builds | structure | edits | reloads | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(rows, key=lambda r: (not (r["edits"] and r["reloads"]), not r["structure"], not r["builds"],
                                        not r["supported"], r["model_type"]))
    for r in order:
        reason = r["reason"].replace("|", "\\|") or "-"
        cells = " | ".join(_cells(r))
        lines.append(f"| {r['model_type']} | {r['model_class']} | {r['builder'] or '-'} | {cells} | {reason} |")
    (out_dir / "family_coverage.md").write_text("\n".join(lines) + "\n")
    return payload


def main(argv: list[str] | None = None) -> int:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--types", nargs="*", help="model types to try (default: every image-text-to-text type)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per model type (default 300)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    types = args.types or sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    unknown = [t for t in types if t not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES]
    if unknown:
        p.error(f"not image-text-to-text model types: {', '.join(unknown)}")
    command = "OMP_NUM_THREADS=%s python benchmarks/family_coverage.py %s" % (
        os.environ.get("OMP_NUM_THREADS", "?"), " ".join(sys.argv[1:] if argv is None else argv)
    )
    commit = _commit()  # the code that runs, whatever happens to the checkout meanwhile
    payload = write(run(types, args.timeout), args.out, command.strip(), commit)
    logger.info("%s", json.dumps(payload["counts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
