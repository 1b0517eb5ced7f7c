"""Combine benchmark runs made in parallel processes into one ``results.json`` / report.

The ``full`` suite takes hours on a CPU; on a machine with several cores it is faster to run
``ldke bench`` once per group of methods (``--methods ldke`` in one process, ``--methods
grace,lora,...`` in another, the sequential study with ``--n-edits 1 --sequential ...`` in a third)
and merge the folders afterwards with ``ldke bench --merge A B C --out DIR``.

Merging must never compare numbers that were not measured on the same cases, so it refuses runs of
another suite, model or protocol (:class:`MergeError`), and the single-edit table only takes rows
from the runs with the most single edits, whose requests must be the same. Rows from runs with
fewer single edits (e.g. the one edit a sequential-only run does) are dropped, and said so in
``details["merged_from"]`` and the report.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)

__all__ = ["MergeError", "merge_runs"]


class MergeError(ValueError):
    """The runs cannot be merged (different suite/model/protocol/cases, or a method measured twice)."""


def _load(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        results = json.loads((folder / "results.json").read_text())
        details = json.loads((folder / "details.json").read_text())
    except FileNotFoundError as e:
        raise MergeError(f"{folder} is not a benchmark output folder: {e.filename} is missing") from e
    except json.JSONDecodeError as e:
        raise MergeError(f"{folder}: unreadable benchmark output ({e})") from e
    return results, details


def _same(runs: list[tuple[Path, dict, dict]], what: str, get) -> Any:
    values = {json.dumps(get(r, d), sort_keys=True) for _, r, d in runs}
    if len(values) > 1:
        listing = "; ".join(f"{f}: {get(r, d)!r}" for f, r, d in runs)
        raise MergeError(f"the runs differ in {what}: {listing}")
    return get(runs[0][1], runs[0][2])


def _case_keys(details: dict[str, Any], n: int) -> list[tuple]:
    return [(q.get("subject"), q.get("relation"), q.get("prompt"), q.get("target")) for q in details.get("requests", [])[:n]]


def merge_runs(folders: Sequence[str | Path]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge the ``results.json``/``details.json`` of ``folders`` (at least two) into one pair."""
    if len(folders) < 2:
        raise MergeError("--merge needs at least two benchmark output folders")
    runs = [(Path(f), *_load(Path(f))) for f in folders]
    suite = _same(runs, "suite", lambda r, d: r.get("suite"))
    model = _same(runs, "model", lambda r, d: r.get("model"))
    protocol = _same(runs, "protocol", lambda r, d: d.get("protocol"))
    split = _same(runs, "split", lambda r, d: r.get("split", "test"))

    n_single = max(r.get("n_edits") or 0 for _, r, _ in runs if r.get("methods"))
    single_runs = [(f, r, d) for f, r, d in runs if r.get("methods") and r.get("n_edits") == n_single]
    cases = _case_keys(single_runs[0][2], n_single)
    for f, _, d in single_runs[1:]:
        if _case_keys(d, n_single) != cases:
            raise MergeError(f"{f} edited other cases than {single_runs[0][0]} (different --seed or build?)")

    results: dict[str, Any] = {"suite": suite, "model": model, "split": split, "n_edits": n_single, "methods": {},
                               "sequential": {}, "localization": None, "edit_speed": None, "inference_overhead": None,
                               "dev": None}
    details: dict[str, Any] = {"protocol": protocol, "methods": {}, "timings": {}, "cpu_seconds": {},
                               "suite_info": runs[0][2].get("suite_info"), "hparams": {},
                               "requests": single_runs[0][2].get("requests"), "unedited": single_runs[0][2].get("unedited"),
                               "machine": runs[0][2].get("machine"), "merged_from": []}
    for i, (folder, res, det) in enumerate(runs):
        source: dict[str, Any] = {"folder": str(folder), "argv": det.get("argv"), "commit": det.get("commit"),
                                  "n_edits": res.get("n_edits"),
                                  "methods": [], "sequential": [], "dropped_methods": []}
        contributes_single = any(folder == f for f, _, _ in single_runs)
        for name, row in (res.get("methods") or {}).items():
            if not contributes_single:
                source["dropped_methods"].append(name)
                continue
            if name in results["methods"]:
                raise MergeError(f"method {name!r} was measured in more than one run (second: {folder})")
            results["methods"][name] = row
            details["methods"][name] = (det.get("methods") or {}).get(name)
            source["methods"].append(name)
        for name, curve in (res.get("sequential") or {}).items():
            if name in results["sequential"]:
                raise MergeError(f"the sequential study of {name!r} is in more than one run (second: {folder})")
            results["sequential"][name] = curve
            source["sequential"].append(name)
        if res.get("dev"):
            if results["dev"] is None:
                results["dev"] = {k: v for k, v in res["dev"].items() if k != "methods"} | {"methods": {}}
                details["dev"] = {}
            for name, row in res["dev"].get("methods", {}).items():
                if name in results["dev"]["methods"]:
                    raise MergeError(f"method {name!r} was measured on the dev split in more than one run (second: {folder})")
                results["dev"]["methods"][name] = row
                details["dev"][name] = (det.get("dev") or {}).get(name)
        for key in ("localization", "edit_speed", "inference_overhead"):
            if res.get(key) is not None:
                if results[key] is None:
                    results[key] = res[key]
                    details[key] = det.get(key)
                    source[key] = True
                else:
                    logger.warning("%s: %s already taken from an earlier run; this one is ignored", folder, key)
        for k, v in (det.get("hparams") or {}).items():
            details["hparams"].setdefault(k, v)
        for tk in ("timings", "cpu_seconds"):
            for k, v in (det.get(tk) or {}).items():
                details[tk][f"{k} (run {i + 1})"] = v
        if source["dropped_methods"]:
            logger.info("%s: single-edit rows %s dropped (%s edits, the merged table has %d)", folder,
                        source["dropped_methods"], res.get("n_edits"), n_single)
        if det.get("merged_from"):
            # a merged run: keep the runs it was made of (their commands and commits), not the merge itself
            details["merged_from"].extend(dict(sub) for sub in det["merged_from"])
        else:
            details["merged_from"].append(source)
    return results, details
