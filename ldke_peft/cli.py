"""The ``ldke`` command: demo, edit, eval, locate, push (and bench, when a benchmark suite is installed).

Every subcommand works on local folders (``save_pretrained`` layout: model + processor in one folder)
and never runs remote code (no ``trust_remote_code``). Which model class to instantiate is decided
from ``config.json``'s ``model_type`` through :mod:`ldke_peft.families`; nothing here knows a family.

Errors a user can cause (a missing file, a malformed request, an unsupported model, a pack for another
base model) print one line, ``ldke: error: ...``, and exit with status 2; ``--debug`` shows the
traceback instead. ``-v`` / ``-vv`` turn on INFO / DEBUG logging.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import textwrap
import warnings
from typing import Any, Sequence

logger = logging.getLogger("ldke_peft.cli")

__all__ = ["build_parser", "load_model", "load_requests", "main"]

PROG = "ldke"


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
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    family_for_config(config)  # the real config: encoder-decoder, cross-attention, no image token -> why
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    processor = AutoProcessor.from_pretrained(processor_path or path, trust_remote_code=False)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    model.eval()
    logger.info("loaded %s (%s) on %s", path, type(model).__name__, device)
    return model, processor


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
    from .demo import run_demo

    result = run_demo(args.out, seed=args.seed, cache_dir=args.cache_dir, n_edits=args.edits)
    return 0 if result.ok else 1


def cmd_edit(args: argparse.Namespace) -> int:
    import dataclasses

    from . import edit
    from .config import LDKEConfig
    from .hub import load_edits, save_edits
    from .io import atomic_dir

    requests = load_requests(args.requests, image_root=args.image_root, fmt=args.format, limit=args.limit)
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
                      progress=not args.no_progress, seed=args.seed)
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


def cmd_locate(args: argparse.Namespace) -> int:
    from .families import family_of
    from .localization import locate, trace
    from .model import default_probe_layer

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


# ---------------------------------------------------------------------- parser


def _bench_module() -> str | None:
    """The benchmark entry point, when this installation has one (``ldke_peft.bench.run:main``)."""
    try:
        return "ldke_peft.bench.run" if importlib.util.find_spec("ldke_peft.bench.run") is not None else None
    except (ImportError, ValueError):
        return None


def _fmt(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def _common_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--processor", metavar="DIR", help="processor folder (default: the model folder)")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda:0, ... (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (default: as saved)")


def _common_requests(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-root", metavar="DIR",
                   help="folder relative image paths are resolved against (default: the requests file's folder)")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "easyedit"],
                   help="requests format: jsonl (ldke-peft, one EditRequest per line) or easyedit (E-VQA/E-IC JSON); "
                   "auto = by file extension")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_fmt("""
            LDKE: Localized and Disentangled Knowledge Editing for multimodal LLMs.

            Edit facts inside a vision-language model (LLaVA, Qwen2-VL, BLIP-2, ...) so that the new
            answer follows rephrasings and other views of the image, while unrelated and coupled
            questions keep their answers. Edits are PEFT adapters ("edit packs").
        """),
        epilog=_fmt("""
            examples:
              ldke demo                                   # offline walk-through on a toy model
              ldke edit ./llava requests.jsonl --out ./pack
              ldke eval ./llava ./pack requests.jsonl --json
              ldke locate ./llava requests.jsonl --png layers.png
              ldke push ./llava ./pack you/my-edits

            Run 'ldke <command> --help' for the options of each command.
        """),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v: info, -vv: debug)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    # -v / --debug are accepted after the command too (SUPPRESS: absent there = keep the global value)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging (-v: info, -vv: debug)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks instead of one-line errors")

    def add(name: str, help: str, description: str, example: str, func) -> argparse.ArgumentParser:  # noqa: A002
        p = sub.add_parser(name, help=help, description=_fmt(description), epilog="example:\n  " + _fmt(example),
                           formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common])
        p.set_defaults(func=func)
        return p

    p = add("demo", "offline walk-through: edit a fact in a toy model and check what changed",
            """
            Offline walk-through on the toy world (a tiny LLaVA trained on invented countries; trained on
            the first run, then cached): the answer before the edit, the edit, the answers to the edit
            question, a rephrasing, another view of the image, coupled and unrelated questions after it,
            then save -> reload with PeftModel.from_pretrained -> same answers, and the metrics table.
            """,
            "  ldke demo --out ./demo-pack", cmd_demo)
    p.add_argument("--out", metavar="DIR", help="where to save the edit pack (default: a new temporary folder)")
    p.add_argument("--seed", type=int, default=0, help="toy-world and edit seed (default: 0)")
    p.add_argument("--edits", type=int, default=1, help="number of facts to edit (default: 1)")
    p.add_argument("--cache-dir", metavar="DIR", help="toy-world cache (default: $LDKE_CACHE/toy_world or ~/.cache/ldke_peft/toy_world)")

    p = add("edit", "edit facts in a model and save the edit pack",
            """
            Edit the facts in REQUESTS (ldke-peft JSONL: one EditRequest per line, or an EasyEdit E-VQA/E-IC
            JSON file) in the model saved in MODEL (config.json, weights and processor files), and save the
            edit pack (adapter_config.json, adapter_model.safetensors, README.md model card,
            ldke_report.json) to --out. The base weights are not modified.

            JSONL line: {"image": "flags/fr.png", "prompt": "What is the capital of the country shown?",
                         "target": "Lyon", "rephrase_prompts": [...], "subject": "France", "relation": "capital"}
            """,
            "  ldke edit ./llava edits.jsonl --image-root ./images --out ./pack", cmd_edit)
    p.add_argument("model", help="model folder (save_pretrained layout, with the processor files)")
    p.add_argument("requests", help="edit requests: .jsonl (ldke-peft) or .json (EasyEdit)")
    p.add_argument("--out", default="ldke-pack", metavar="DIR", help="output folder of the edit pack (default: ./ldke-pack)")
    _common_requests(p)
    p.add_argument("--limit", type=int, help="edit only the first N requests")
    p.add_argument("--append-to", metavar="PACK", help="append the edits to an existing pack (sequential editing)")
    p.add_argument("--config", metavar="FILE", help="JSON/YAML file of LDKEConfig fields (rank, edit_steps, router_dim, ...)")
    p.add_argument("--rank", type=int, help="rank of each edit's delta (default 4)")
    p.add_argument("--num-edit-layers", type=int, help="localized layers edited per fact (default 1)")
    p.add_argument("--edit-steps", type=int, help="max optimisation steps per edit (default 40)")
    p.add_argument("--probe-layer", type=int, help="decoder layer the router reads (default: about L/8)")
    p.add_argument("--localization", choices=["attribution", "tracing", "fixed"],
                   help="layer choice: attribution (Fast Localization, default), tracing (exact), fixed")
    p.add_argument("--layers", metavar="I,J", help="edit these decoder layers (implies --localization fixed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--num-processes", type=int, metavar="N",
                   help="shard the requests over N processes with accelerate (CPU or one GPU each); rank 0 "
                   "merges the shards' packs into --out. Same as 'accelerate launch -m ldke_peft.distributed edit ...'")
    _common_model(p)

    p = add("eval", "measure an edit pack: reliability, generality, locality, coupled locality, portability",
            """
            Load MODEL, apply the edit pack ADAPTER (a folder or a Hub repo id) and compute the EasyEdit
            metrics on REQUESTS: reliability, T/M-generality, T/M-locality, coupled locality, portability
            and exact match. The pre-edit state comes from the same model with the adapter disabled.
            """,
            "  ldke eval ./llava ./pack edits.jsonl --json > metrics.json", cmd_eval)
    p.add_argument("model", help="base model folder")
    p.add_argument("adapter", help="edit pack folder or Hub repo id")
    p.add_argument("requests", help="requests with their probes (.jsonl or EasyEdit .json)")
    _common_requests(p)
    p.add_argument("--limit", type=int, help="evaluate only the first N requests")
    p.add_argument("--num-processes", type=int, metavar="N",
                   help="shard the cases over N processes with accelerate and gather the metrics")
    p.add_argument("--json", action="store_true", help="print the full result (with per-request values) as JSON")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-generate", action="store_true", help="skip exact_match (greedy generation, the slowest part)")
    p.add_argument("--locality-positions", choices=["sequence", "answer"], default="sequence",
                   help="locality over the whole probe sequence (EasyEdit) or only the answer positions")
    _common_model(p)

    p = add("locate", "show which decoder layers carry a fact (Fast Localization)",
            """
            Score every decoder layer of MODEL for one request (or all, --all) with Fast Localization
            (attribution patching: a constant number of passes) or exact causal tracing (--method tracing,
            one pass per layer). Layer 0 and the layers at or below the router's probe layer are shown but
            never chosen. Prints a table with a text bar chart; --png writes a bar chart image.
            """,
            "  ldke locate ./llava edits.jsonl --index 3 --png layers.png", cmd_locate)
    p.add_argument("model", help="model folder")
    p.add_argument("requests", help="requests file (.jsonl or EasyEdit .json)")
    _common_requests(p)
    p.add_argument("--index", type=int, default=0, help="which request (default: 0)")
    p.add_argument("--all", action="store_true", help="every request")
    p.add_argument("--num-layers", type=int, default=1, help="how many layers to choose (default: 1)")
    p.add_argument("--probe-layer", type=int, help="router probe layer (default: as ldke edit)")
    p.add_argument("--method", choices=["attribution", "tracing"], default="attribution")
    p.add_argument("--png", metavar="FILE", help="write a bar chart (needs matplotlib: pip install 'ldke-peft[plots]')")
    p.add_argument("--json", action="store_true", help="print the scores as JSON instead of tables")
    _common_model(p)

    p = add("push", "upload an edit pack with its model card to the Hugging Face Hub",
            """
            Check that the edit pack ADAPTER loads onto MODEL (files and base-model fingerprint), then upload
            adapter_config.json, adapter_model.safetensors and an LDKE model card (edited facts, metrics,
            loading snippet) to the Hub repo REPO_ID, creating it if needed. --metrics adds the JSON written
            by 'ldke eval --json' to the card. Token: --token, $HF_TOKEN or 'hf auth login'.
            """,
            "  ldke push ./llava ./pack you/llava-capital-edits --base-model-id llava-hf/llava-1.5-7b-hf", cmd_push)
    p.add_argument("model", help="base model folder the pack was made for")
    p.add_argument("adapter", help="edit pack folder")
    p.add_argument("repo_id", help="Hub repo id, 'namespace/name'")
    p.add_argument("--endpoint", help="Hub endpoint (default: https://huggingface.co or $HF_ENDPOINT)")
    p.add_argument("--token", help="Hub token (default: the logged-in user's)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--message", help="commit message")
    p.add_argument("--metrics", metavar="FILE", help="metrics JSON from 'ldke eval --json' to show on the card")
    p.add_argument("--base-model-id", metavar="HUB_ID", help="Hub id of the base model, for the card's base_model field")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])

    mp = sub.add_parser("merge", help="merge edit packs made separately for the same base model "
                        "(see 'ldke merge --help')", add_help=False)
    mp.add_argument("args", nargs=argparse.REMAINDER)
    mp.set_defaults(func=None)

    if _bench_module():
        bp = sub.add_parser("bench", help="run the benchmark suites (see 'ldke bench --help')", add_help=False)
        bp.add_argument("args", nargs=argparse.REMAINDER)
        bp.set_defaults(func=None)
    return parser


# ---------------------------------------------------------------------- entry point


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("ldke_peft").setLevel(level)
    if verbosity == 0:
        # deprecation chatter from dependencies is not for CLI users; -v shows it
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        import transformers

        transformers.logging.set_verbosity(logging.DEBUG if verbosity >= 2 else logging.ERROR)
        if verbosity == 0:
            transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ldke``; returns the exit status (0 ok, 1 the command ran but its check failed, 2 error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    bench = _bench_module()
    # `ldke [-v] [--debug] bench ...`: everything after "bench" belongs to the benchmark's own parser
    if bench and "bench" in argv and argv.index("bench") == next(
        (i for i, a in enumerate(argv) if not a.startswith("-")), -1
    ):
        k = argv.index("bench")
        head, rest = argv[:k], argv[k + 1 :]
        args = build_parser().parse_args(head + ["bench"])
        _setup_logging(args.verbose)
        return _run(args, lambda: int(importlib.import_module(bench).main(rest) or 0))

    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), -1)
    if first >= 0 and argv[first] == "merge":
        # `ldke merge ...`: the merge command has its own parser (ldke_peft.merge)
        from .merge import merge_main

        args = build_parser().parse_args(argv[:first] + ["merge"])
        _setup_logging(args.verbose)
        return _run(args, lambda: int(merge_main(argv[first + 1 :]) or 0))
    if first >= 0 and argv[first] in ("edit", "eval") and any(a.startswith("--num-processes") for a in argv):
        # sharded over processes with accelerate (ldke_peft.distributed): each process edits/evaluates
        # its shard, rank 0 merges the packs / gathers the metrics
        from . import distributed

        args = build_parser().parse_args(argv[:first] + ["demo"])
        _setup_logging(args.verbose)
        fn = distributed.edit_main if argv[first] == "edit" else distributed.eval_main
        return _run(args, lambda: int(fn(argv[first + 1 :]) or 0))

    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    return _run(args, lambda: int(args.func(args) or 0))


def _run(args: argparse.Namespace, fn) -> int:
    from .errors import LDKEError

    try:
        return fn()
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (LDKEError, OSError, ValueError, KeyError, ImportError) as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - last resort: still one line, and a hint
        if args.debug:
            raise
        print(f"{PROG}: error: unexpected {type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
