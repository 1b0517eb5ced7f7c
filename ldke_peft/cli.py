"""The ``ldke`` command: demo, edit, eval, locate, push (and bench, when a benchmark suite is installed).

The commands' code. Parsing, help texts and the entry point live in :mod:`ldke_peft.cli_front` (the
parser imports nothing heavy; this module is imported only to run a command); ``build_parser`` and
``main`` are re-exported here.

Every subcommand works on local folders (``save_pretrained`` layout: model + processor in one folder)
and never runs remote code (no ``trust_remote_code``). Which model class to instantiate is decided
from ``config.json``'s ``model_type`` through :mod:`ldke_peft.families`; nothing here knows a family.

Errors a user can cause (a missing file, a malformed request, an unsupported model, a pack for another
base model) print one line, ``ldke: error: ...``, and exit with status 2; ``--debug`` shows the
traceback instead. ``-v`` / ``-vv`` turn on INFO / DEBUG logging.

Layer: product (README "Architecture"): may import every layer; no library layer imports it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

logger = logging.getLogger("ldke_peft.cli")

__all__ = ["build_parser", "load_model", "load_requests", "main"]

from ldke_peft.cli_front import PROG, build_parser, main  # the front: parser and entry point

from .errors import ProcessorNotFoundError


# ---------------------------------------------------------------------- helpers shared by commands


def load_model(path: str, *, processor_path: str | None = None, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """``(model, processor)`` from a local folder (or a cached Hub id), without remote code.

    The model type is read from ``config.json`` first, so an unsupported type fails with
    :class:`~ldke_peft.errors.UnsupportedModelError` before any weights are read.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from .families import family_for_config, get_family

    if not os.path.isdir(path):
        from .hub import _is_repo_id

        # a bare name is a typo'd folder far more often than a Hub id; "namespace/name" may be a Hub id
        if os.path.exists(path) or not (_is_repo_id(path) and "/" in path):
            raise FileNotFoundError(f"model folder not found: {path}" + (" (not a folder)" if os.path.exists(path) else ""))
    cfg_file = os.path.join(path, "config.json")
    if os.path.isdir(path):
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"{path} is not a model folder: it has no config.json")
        with open(cfg_file, encoding="utf-8") as fh:
            model_type = json.load(fh).get("model_type")
        get_family(str(model_type))  # UnsupportedModelError saying why the type cannot be edited
    _check_processor_folder(path, processor_path)  # before the (possibly huge) weights are read
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    family_for_config(config)  # the real config: encoder-decoder, cross-attention, no image token -> why
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    try:
        processor = AutoProcessor.from_pretrained(processor_path or path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ProcessorNotFoundError(f"cannot load the processor from {processor_path or path} ({_first_line(exc)}); "
                                     + _PROCESSOR_HINT) from exc
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    model.eval()
    logger.info("loaded %s (%s) on %s", path, type(model).__name__, device)
    return model, processor


#: Files that make a folder a processor folder (transformers 5 writes ``processor_config.json``; older
#: checkpoints have the image processor's ``preprocessor_config.json``).
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
_PROCESSOR_HINT = ("pass --processor DIR (the folder holding processor_config.json or preprocessor_config.json and the "
                   "tokenizer files; processor_path= in Python), or save the processor into the model folder "
                   "(processor.save_pretrained(DIR)); 'ldke demo --save DIR' writes both for the toy model")


def _check_processor_folder(model_path: str, processor_path: str | None) -> None:
    """:class:`ProcessorNotFoundError` naming ``--processor`` when the processor folder has no processor files."""
    from .hub import _is_repo_id

    folder = processor_path or model_path
    if processor_path is not None and not os.path.isdir(processor_path):
        if os.path.exists(processor_path) or not (_is_repo_id(processor_path) and "/" in processor_path):
            raise ProcessorNotFoundError(f"processor folder not found: {processor_path}")
        return  # "namespace/name": a Hub id, resolved by AutoProcessor
    if os.path.isdir(folder) and not any(os.path.isfile(os.path.join(folder, f)) for f in PROCESSOR_FILES):
        raise ProcessorNotFoundError(f"{folder} has no processor ({' or '.join(PROCESSOR_FILES)}): " + _PROCESSOR_HINT)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_requests(path: str, *, image_root: str | None = None, fmt: str = "auto", limit: int | None = None) -> list[Any]:
    """Edit requests from our JSONL format (``.jsonl``) or an EasyEdit dataset file (``.json``)."""
    from .requests import load_easyedit, load_jsonl

    if not os.path.isfile(path):
        raise FileNotFoundError(f"requests file not found: {path}")
    if fmt == "auto":
        if path.endswith(".jsonl"):
            fmt = "jsonl"
        elif path.endswith(".json"):
            fmt = "easyedit"
        else:
            raise ValueError(f"cannot tell the format of {path} from its name; pass --format jsonl or --format easyedit")
    if fmt == "jsonl":
        requests = load_jsonl(path, image_root=image_root)
    else:
        requests = load_easyedit(path, image_root if image_root is not None else os.path.dirname(os.path.abspath(path)))
    if not requests:
        raise ValueError(f"{path} contains no edit requests")
    return requests[:limit] if limit else requests


def _json_default(obj: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _table(rows: Sequence[Sequence[Any]], out=None) -> None:
    out = out or sys.stdout
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)
        if k == 0:
            print("  ".join("-" * w for w in widths), file=out)


def _bar(value: float, scale: float, width: int = 30) -> str:
    if scale <= 0:
        return ""
    n = int(round(width * abs(value) / scale))
    return ("#" if value >= 0 else "-") * n


# ---------------------------------------------------------------------- commands


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo, save_demo_model

    if args.save:
        save_demo_model(args.save, seed=args.seed, cache_dir=args.cache_dir, n_edits=args.edits)
        return 0
    result = run_demo(args.out, seed=args.seed, cache_dir=args.cache_dir, n_edits=args.edits)
    return 0 if result.ok else 1


def cmd_edit(args: argparse.Namespace) -> int:
    import dataclasses

    from . import edit
    from .tuner.config import LDKEConfig
    from .hub import load_edits, save_edits
    from .tuner.io import atomic_dir

    from .requests import load_negatives

    requests = load_requests(args.requests, image_root=args.image_root, fmt=args.format, limit=args.limit)
    negatives = load_negatives(args.negatives, image_root=args.image_root) if args.negatives else None
    overrides: dict[str, Any] = {}
    if args.config:
        with open(args.config, encoding="utf-8") as fh:
            overrides.update(json.load(fh) if args.config.endswith(".json") else _yaml(fh))
    for name in ("rank", "num_edit_layers", "edit_steps", "probe_layer", "localization"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.layers:
        overrides.update(localization="fixed", fixed_layers=[int(i) for i in args.layers.split(",")])
    model, processor = load_model(args.model, processor_path=args.processor, device=args.device, dtype=args.dtype)
    pack = None
    if args.append_to:
        pack = load_edits(model, args.append_to, is_trainable=True)
        if overrides:
            logger.warning("config options are ignored when appending to an existing pack: %s", sorted(overrides))
    config = LDKEConfig(**overrides) if overrides and pack is None else None
    print(f"editing {len(requests)} fact(s) in {args.model}", file=sys.stderr)
    peft_model = edit(pack if pack is not None else model, processor, requests, config, pack=pack,
                      negatives=negatives, progress=not args.no_progress, seed=args.seed)
    reports = list(getattr(peft_model, "ldke_reports", []))
    earlier: list[dict[str, Any]] = []
    if args.append_to and os.path.isfile(os.path.join(args.append_to, "ldke_report.json")):
        with open(os.path.join(args.append_to, "ldke_report.json"), encoding="utf-8") as fh:
            earlier = json.load(fh)  # reports of the slots already in the pack
    all_reports = earlier + [json.loads(json.dumps(dataclasses.asdict(r), default=_json_default)) for r in reports]
    # one atomic step: the --out folder holds the old pack or the complete new one (with its report)
    with atomic_dir(args.out) as stage:
        save_edits(peft_model, stage, reports=all_reports)
        with open(os.path.join(stage, "ldke_report.json"), "w", encoding="utf-8") as fh:
            json.dump(all_reports, fh, indent=1)
    rows = [["slot", "prompt", "target", "layers", "fit steps", "fit acc", "router ok"]]
    edits = peft_model.peft_config["default"].edits
    for r in reports:
        e = edits[r.slot] if r.slot < len(edits) else {}
        rows.append([r.slot, (e.get("prompt") or "")[:50], e.get("target", ""), ",".join(map(str, r.layers)),
                     r.fit_steps, f"{r.fit_accuracy:.2f}", r.router.get("separable", "")])
    _table(rows)
    print(f"saved the edit pack to {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from . import evaluate
    from .demo import metrics_rows
    from .hub import load_edits

    requests = load_requests(args.requests, image_root=args.image_root, fmt=args.format, limit=args.limit)
    model, processor = load_model(args.model, processor_path=args.processor, device=args.device, dtype=args.dtype)
    peft_model = load_edits(model, args.adapter)
    metrics = evaluate(peft_model, processor, requests, batch_size=args.batch_size, generate=not args.no_generate,
                       locality_positions=args.locality_positions)
    if args.json:
        json.dump(metrics, sys.stdout, indent=1, default=_json_default)
        print()
    else:
        print(f"{metrics['n']} request(s), adapter {args.adapter}")
        _table(metrics_rows(metrics))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from collections import Counter

    from .hub import load_edits
    from .metrics.routes import route_requests

    requests = load_requests(args.requests, image_root=args.image_root, fmt=args.format)
    model, processor = load_model(args.model, processor_path=args.processor, device=args.device, dtype=args.dtype)
    peft_model = load_edits(model, args.adapter)
    fixes = _fix_routes(args, peft_model, processor, requests) if args.fix else None
    routes = route_requests(peft_model, processor, requests, batch_size=args.batch_size)
    if args.json:
        rows = [r.to_dict() for r in routes]
        json.dump(rows if fixes is None else {"fixes": [f.to_dict() for f in fixes], "routes": rows}, sys.stdout,
                  indent=1)
        print()
        return 0
    shown = [r for r in routes if args.all or r.ok is False]
    if shown:
        _table([("request", "kind", "question", "wanted", "fired", "ok")] + [
            (r.request, r.kind, r.prompt, {True: "its edit", False: "none", None: "-"}[r.in_scope],
             f"slot {r.slot}: {r.edit}" if r.slot >= 0 else "none", {True: "yes", False: "NO", None: "-"}[r.ok])
            for r in shown])
        print()
    for i in sorted({r.request for r in routes if r.in_scope and r.expected_slot is None}):
        print(f"note: request {i} ({requests[i].prompt!r} -> {requests[i].target!r}) is not an edit of this pack "
              "(no edit with its prompt, target and image): its in-scope questions are not judged")
    judged, good = Counter(), Counter()
    for r in routes:
        if r.ok is not None:
            field = r.kind.split(":")[0]
            judged[field] += 1
            good[field] += int(r.ok)
    _table([("kind", "routed as wanted")] + [(k, f"{good[k]}/{n}") for k, n in judged.items()])
    return 0


def _fix_routes(args: argparse.Namespace, peft_model: Any, processor: Any, requests: list) -> list:
    """``ldke route --fix OUT``: refine the pack's scope for ``requests`` and save it to OUT (with the source
    pack's edit report); prints what changed unless --json."""
    import shutil

    from .editing.scope_refine import refine_scope
    from .hub import save_edits
    from .tuner.io import atomic_dir

    name = peft_model.active_adapter
    fixes = refine_scope(peft_model, processor, requests, adapter_name=name, batch_size=args.batch_size)
    with atomic_dir(args.fix) as stage:
        save_edits(peft_model, stage, adapter_name=name)
        report, staged = os.path.join(args.adapter, "ldke_report.json"), os.path.join(stage, "ldke_report.json")
        same = os.path.exists(staged) and os.path.isfile(report) and os.path.samefile(report, staged)  # fixed in place
        if os.path.exists(staged) and not same:
            os.remove(staged)  # a link to OUT's earlier report (describing other edits): never written through
        if os.path.isfile(report) and not same:
            shutil.copyfile(report, staged)
    if not args.json:
        changed = [f for f in fixes if f.action]
        if changed:
            _table([("request", "kind", "question", "before", "after", "change")] + [
                (f.request, f.kind, f.prompt, f.before, f.after, f.action) for f in changed])
            print()
        print(f"fixed {sum(f.ok and f.before != f.wanted for f in fixes)} of "
              f"{sum(f.before != f.wanted for f in fixes)} question(s) routed against their request's wish "
              f"(no delta changed); saved the pack to {args.fix}\n")
    return fixes


def cmd_locate(args: argparse.Namespace) -> int:
    from .families import family_of
    from .editing.localization import locate, trace
    from .tuner.model import default_probe_layer

    requests = load_requests(args.requests, image_root=args.image_root, fmt=args.format)
    indices = list(range(len(requests))) if args.all else [args.index]
    for i in indices:
        if not 0 <= i < len(requests):
            raise ValueError(f"--index {i} is out of range: {args.requests} has {len(requests)} request(s)")
    model, processor = load_model(args.model, processor_path=args.processor, device=args.device, dtype=args.dtype)
    n_layers = family_of(model).num_layers(model)
    probe = args.probe_layer if args.probe_layer is not None else default_probe_layer(n_layers)
    fn = locate if args.method == "attribution" else trace
    results = []
    for i in indices:
        r = requests[i]
        res = fn(model, processor, r, num_layers=args.num_layers, probe_layer=probe)
        results.append(res)
        if args.json:
            continue
        print(f"request {i}: {r.prompt!r} -> {r.ground_truth or r.target!r}  ({res.method}, {res.forward_passes:g} "
              f"forward-equivalents, {res.seconds:.2f} s; probe layer {probe})")
        scale = max((abs(float(s)) for s in res.scores), default=0.0)
        rows = [["layer", "score", "", "chart"]]
        for layer, s in enumerate(res.scores):
            mark = "edit" if layer in res.layers else ("" if layer in res.candidates else "excluded")
            rows.append([layer, f"{float(s):+.3e}", mark, _bar(float(s), scale)])
        _table(rows)
        print()
    if args.json:
        json.dump([{"index": i, **res.to_dict()} for i, res in zip(indices, results)], sys.stdout, indent=1)
        print()
    if args.png:
        from .plots import layer_scores_chart

        for i, res in zip(indices, results):
            path = args.png
            if len(indices) > 1:
                stem, ext = os.path.splitext(args.png)
                path = f"{stem}-{i}{ext or '.png'}"
            layer_scores_chart(res, path, title=f"request {i}: {requests[i].prompt[:60]}")
            print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import load_edits, push_edits

    metrics = None
    if args.metrics:
        with open(args.metrics, encoding="utf-8") as fh:
            metrics = json.load(fh)
    reports = None
    report_file = os.path.join(args.adapter, "ldke_report.json")
    if os.path.isfile(report_file):
        with open(report_file, encoding="utf-8") as fh:
            reports = json.load(fh)
    model, _ = load_model(args.model, device="cpu", dtype=args.dtype)
    # loading verifies the pack's files and that it belongs to this base model before anything is published
    peft_model = load_edits(model, args.adapter)
    url = push_edits(peft_model, args.repo_id, private=args.private, token=args.token, commit_message=args.message,
                     metrics=metrics, endpoint=args.endpoint, base_model=args.base_model_id, reports=reports)
    print(url)
    return 0


def _yaml(fh) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError("the --config file must hold a mapping of LDKEConfig fields")
    return data


# ---------------------------------------------------------------------- merge


def build_merge_parser(prog: str = "ldke merge") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Merge LDKE edit packs made for the same base model into one pack. Each source keeps its "
        "router projection, so every edit routes as it did in its own pack.",
    )
    ap.add_argument("packs", nargs="+", help="pack folders, in merge order")
    ap.add_argument("--out", required=True, help="folder for the merged pack")
    from .merge import CONFLICT_POLICIES

    ap.add_argument("--on-conflict", choices=CONFLICT_POLICIES, default="error",
                    help="same image + prompt edited to different targets: fail (default), or keep the first/last")
    ap.add_argument("--base-model", default=None, help="also check every pack against this model folder")
    return ap


def merge_main(argv: Sequence[str] | None = None) -> int:
    """``ldke merge``: merge pack folders; prints a summary. Errors propagate (the CLI prints them)."""
    from .merge import merge_packs

    args = build_merge_parser().parse_args(argv)
    base = None
    if args.base_model:
        base, _ = load_model(args.base_model, device="cpu")
    res = merge_packs(args.packs, base_model=base, out=args.out, on_conflict=args.on_conflict)
    rep = res.report
    for c in rep.conflicts:
        print(f"conflict ({args.on_conflict}): {c.describe(rep.sources)}", file=sys.stderr)
    for dropped, kept in rep.duplicates:
        print(f"duplicate: {rep.sources[dropped[0]]} slot {dropped[1]} repeats {rep.sources[kept[0]]} slot {kept[1]}",
              file=sys.stderr)
    print(f"merged {len(rep.sources)} pack(s): {res.config.num_slots} slot(s), {rep.groups} router projection(s), "
          f"{len(rep.dropped)} slot(s) dropped -> {args.out}")
    return 0
