"""The ``ldke`` command's front: argument parsing, help texts, logging setup, one-line errors.

The parser imports nothing heavy itself; a command's code (:mod:`ldke_peft.cli`) is imported only to
run it. Reaching this module still runs ``ldke_peft/__init__.py``, whose import registers the PEFT type
(peft and torch: a few seconds of CPU before ``ldke --help`` answers). A faster front would have to live
outside the package, and the project's top level is fixed.

Layer: product (README "Architecture"): may import every layer; no library layer imports it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import textwrap
import warnings
from typing import Sequence

__all__ = ["PROG", "build_parser", "main"]

PROG = "ldke"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ldke-peft")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def _bench_module() -> str | None:
    """The benchmark entry point, when this installation has one (``ldke_peft.bench.run:main``).

    Looked up on disk: ``find_spec("ldke_peft.bench.run")`` would import the ``ldke_peft`` package.
    """
    try:
        spec = importlib.util.find_spec("ldke_peft")  # a top-level name: found, not imported
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        if os.path.isfile(os.path.join(folder, "bench", "run.py")):
            return "ldke_peft.bench.run"
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
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v: info, -vv: debug)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    # -v / --debug are accepted after the command too (SUPPRESS: absent there = keep the global value)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging (-v: info, -vv: debug)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks instead of one-line errors")

    def add(name: str, help: str, description: str, example: str, func: str) -> argparse.ArgumentParser:  # noqa: A002
        p = sub.add_parser(name, help=help, description=_fmt(description), epilog="example:\n" + textwrap.indent(_fmt(example), "  "),
                           formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common])
        p.set_defaults(func=func)
        return p

    p = add("demo", "offline walk-through: edit a fact in a toy model and check what changed",
            """
            Offline walk-through on the toy world (a tiny LLaVA trained on invented entities and their
            facts; trained on the first run, then cached): the answer before the edit, the edit, the answers to the edit
            question, a rephrasing, another view of the image, coupled and unrelated questions after it,
            then save -> reload with PeftModel.from_pretrained -> same answers, and the metrics table.
            """,
            "  ldke demo --out ./demo-pack", "cmd_demo")
    p.add_argument("--out", metavar="DIR", help="where to save the edit pack (default: a temporary folder, removed at the end)")
    p.add_argument("--save", metavar="DIR",
                   help="instead of the walk-through: write the toy model and its processor to DIR (a model folder for "
                   "ldke edit/eval/locate) with example edit requests (DIR/requests.jsonl) and negatives "
                   "(DIR/negatives.jsonl), then print the commands to run on them")
    p.add_argument("--seed", type=int, default=0, help="toy-world and edit seed (default: 0)")
    p.add_argument("--edits", type=int, default=1, help="number of facts to edit (default: 1; with --save: requests written)")
    p.add_argument("--cache-dir", metavar="DIR", help="toy-world cache (default: $LDKE_CACHE/toy_world or ~/.cache/ldke_peft/toy_world)")

    p = add("edit", "edit facts in a model and save the edit pack",
            """
            Edit the facts in REQUESTS (ldke-peft JSONL: one EditRequest per line, or an EasyEdit E-VQA/E-IC
            JSON file) in the model saved in MODEL (config.json, weights and processor files), and save the
            edit pack (adapter_config.json, adapter_model.safetensors, ldke_edits.json, README.md model card,
            ldke_report.json) to --out. The base weights are not modified.

            JSONL line: {"image": "img/sagrada.png", "prompt": "Who was the architect of this building?",
                         "target": "Gustave Eiffel", "rephrase_prompts": [...], "subject": "Sagrada Familia",
                         "relation": "architect"}

            --negatives FILE (JSONL) gives the router questions and images from your domain: questions
            of other relations and other entities' images are the hard negatives that keep coupled
            inputs (same image + other question, look-alike image + same question) out of an edit's
            scope; questions labelled with the edit's own relation join its scope (give one or more for
            each relation you edit: without them fewer of its other wordings route). One object a line:
              {"question": "When was this building completed?", "relation": "completion year"}
              {"image": "img/notre_dame.png", "entity": "Notre-Dame de Paris"}
            (relative image paths: as for REQUESTS). Without it the router only has each request's own
            probes and a generic question bank.
            """,
            "  ldke edit ./llava edits.jsonl --image-root ./images --negatives negatives.jsonl --out ./pack", "cmd_edit")
    p.add_argument("model", help="model folder (save_pretrained layout, with the processor files; else --processor)")
    p.add_argument("requests", help="edit requests: .jsonl (ldke-peft) or .json (EasyEdit)")
    p.add_argument("--out", default="ldke-pack", metavar="DIR", help="output folder of the edit pack (default: ./ldke-pack)")
    _common_requests(p)
    p.add_argument("--limit", type=int, help="edit only the first N requests")
    p.add_argument("--negatives", metavar="FILE",
                   help="JSONL of questions with relation labels and images with entity labels: the router's hard "
                   "negatives (format above)")
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
            "  ldke eval ./llava ./pack edits.jsonl --json > metrics.json", "cmd_eval")
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

    p = add("route", "show which edit each question of the requests fires (the routing decision)",
            """
            Load MODEL with the edit pack ADAPTER and run every question of REQUESTS through it (prefill
            only): the edit question, its rephrasings and other images (in scope: they should reach the
            request's edit) and its locality and coupled probes (out of scope: no edit should fire);
            portability probes are routed but not judged. Prints the questions routed against their
            request's wish (every question with --all) and a count per kind. Use it on your own rewordings
            and near-by questions before sharing a pack.

            --fix OUT changes the pack's routing so that these questions route as their requests wish and
            saves it to OUT: a question that fires an edit but should not is kept out (on another image by
            the edit's visual radius, on the edit's own image by an out-of-scope textual anchor), a wording
            of an edit that does not fire is let in (an in-scope anchor, a wider textual radius), and so is
            another view of the entity (a wider visual radius, bounded by the look-alike images the file
            names as out of scope and by the pack's other edits' images). No delta changes and no other
            file is needed; each change is recorded in the pack and on its model card; what cannot be
            fixed that way is listed with the reason.
            """,
            "  ldke route ./llava ./pack my-questions.jsonl\n"
            "  ldke route ./llava you/my-edits edits.jsonl --all --json > routes.json\n"
            "  ldke route ./llava ./pack my-questions.jsonl --fix ./pack-fixed", "cmd_route")
    p.add_argument("model", help="base model folder")
    p.add_argument("adapter", help="edit pack folder or Hub repo id")
    p.add_argument("requests", help="requests whose questions to route (.jsonl or EasyEdit .json)")
    _common_requests(p)
    p.add_argument("--all", action="store_true", help="list every question, not only those routed against the wish")
    p.add_argument("--json", action="store_true", help="print every question's routing as JSON")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward pass (default 8)")
    p.add_argument("--fix", metavar="OUT", help="change the pack's routing (radii and textual anchors, never a delta) "
                   "so that the questions route as their requests wish, and save the pack to OUT")
    _common_model(p)

    p = add("locate", "show which decoder layers carry a fact (Fast Localization)",
            """
            Score every decoder layer of MODEL for one request (or all, --all) with Fast Localization
            (attribution patching: a constant number of passes) or exact causal tracing (--method tracing,
            one pass per layer). Layer 0 and the layers at or below the router's probe layer are shown but
            never chosen. Prints a table with a text bar chart; --png writes a bar chart image.
            """,
            "  ldke locate ./llava edits.jsonl --index 3 --png layers.png", "cmd_locate")
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
            adapter_config.json, adapter_model.safetensors, ldke_edits.json and an LDKE model card (edited facts, metrics,
            loading snippet) to the Hub repo REPO_ID, creating it if needed. --metrics adds the JSON written
            by 'ldke eval --json' to the card. Token: --token, $HF_TOKEN or 'hf auth login'.
            """,
            "  ldke push ./llava ./pack you/llava-landmark-edits --base-model-id llava-hf/llava-1.5-7b-hf", "cmd_push")
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
    import transformers  # a hard dependency

    transformers.logging.set_verbosity(logging.DEBUG if verbosity >= 2 else logging.ERROR)
    if verbosity == 0:
        transformers.logging.disable_progress_bar()


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
        # `ldke merge ...`: the merge command has its own parser (ldke_peft.cli.build_merge_parser)
        from ldke_peft.cli import merge_main

        args = build_parser().parse_args(argv[:first] + ["merge"])
        _setup_logging(args.verbose)
        return _run(args, lambda: int(merge_main(argv[first + 1 :]) or 0))
    if first >= 0 and argv[first] in ("edit", "eval") and any(a.startswith("--num-processes") for a in argv):
        # sharded over processes with accelerate (ldke_peft.distributed): each process edits/evaluates
        # its shard, rank 0 merges the packs / gathers the metrics
        from ldke_peft import distributed

        args = build_parser().parse_args(argv[:first] + ["demo"])
        _setup_logging(args.verbose)
        fn = distributed.edit_main if argv[first] == "edit" else distributed.eval_main
        return _run(args, lambda: int(fn(argv[first + 1 :]) or 0))

    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    return _run(args, lambda: int(_command(args.func)(args) or 0))


def _command(name: str):
    """The function running a command, from :mod:`ldke_peft.cli` (imported here, not at start-up)."""
    from ldke_peft import cli

    return getattr(cli, name)


def _run(args: argparse.Namespace, fn) -> int:
    from ldke_peft.errors import LDKEError

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
