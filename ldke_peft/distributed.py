"""Sharded editing and evaluation over several processes with ``accelerate``.

Edits are independent slots, so a large request file is edited in shards and the shard packs are
merged (:func:`ldke_peft.merge.merge_packs`, which keeps each shard's router projection, so every edit
routes as it did in its shard):

* ``edit``: process ``k`` of ``W`` edits ``requests[k::W]`` into ``OUT/shards/rank<k>``; after a
  barrier, process 0 merges the shard packs into ``OUT`` with the slots in the request file's order.
* ``eval``: process ``k`` evaluates ``requests[k::W]`` (pre-edit state from the pack's disabled
  adapter, as :func:`ldke_peft.metrics.evaluate` does); the per-request metric rows are gathered
  (``accelerate.utils.gather_object``) and process 0 averages them exactly as
  :func:`~ldke_peft.metrics.compute_metrics` would over all requests, prints the means and writes JSON.

Run under a launcher::

    accelerate launch --multi_gpu --num_processes 2 -m ldke_peft.distributed edit \\
        --model PATH --requests big.jsonl --out DIR

or let the module launch itself (``--num-processes 2``; ``--cpu`` forces CPU processes with the gloo
backend, the default when CUDA is absent). ``--model toy`` uses the toy world
(:func:`ldke_peft.testing.toy_world.toy_world`; ``toy:SEED`` for another seed) and its negative pool.

On CPU, note that ``accelerate launch --cpu --num_processes N`` starts **one** process (accelerate's
simple launcher needs ``mpirun`` for several CPU processes); the module warns when it detects this.
The torchrun-based launcher (``--multi_gpu``) with ``ACCELERATE_USE_CPU=1`` starts N gloo processes,
and is what ``--num-processes`` uses.

A failure in one process is reported to all (the status travels with the collective instead of a
bare barrier), so no process waits forever for a crashed peer.

Layer: product (README "Architecture"): may import every layer; no library layer imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from .distributed_launch import (
    _add_model_args,
    _collect,
    _device,
    _env_flag,
    _resolve_positional,
    _run_guarded,
    _shutdown,
    _state,
    _launched_itself,
    launch,
    shard_indices,
)

logger = logging.getLogger(__name__)

__all__ = ["aggregate_rows", "edit_main", "eval_main", "launch", "load_world_or_model", "main", "shard_indices"]

SHARDS_DIR = "shards"


# ---------------------------------------------------------------------- loading


def load_world_or_model(spec: str, *, processor: str | None = None, device: str = "cpu", dtype: str = "auto") -> tuple[Any, Any, Any]:
    """``(model, processor, negative pool or None)`` for ``spec``: ``toy`` / ``toy:SEED`` (the toy world, from
    its cache) or a model folder (``AutoModelForImageTextToText`` + ``AutoProcessor``)."""
    import torch

    if spec == "toy" or spec.startswith("toy:"):
        from .testing.toy_world import toy_world

        seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
        world = toy_world(seed=seed)
        model = world.model
        if dtype != "auto":
            model = model.to(getattr(torch, dtype))
        model.to(device).eval()
        return model, world.processor, world.negative_pool()
    from .cli import load_model

    model, proc = load_model(spec, processor_path=processor, device=device, dtype=dtype)
    return model, proc, None


def _load_requests(args: argparse.Namespace) -> list[Any]:
    from .cli import load_requests

    return load_requests(args.requests, image_root=args.image_root, fmt=args.format, limit=args.limit)


# ---------------------------------------------------------------------- edit


def build_edit_parser(prog: str = "python -m ldke_peft.distributed edit") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Edit a request file in shards (one per process) and merge the shard packs into one pack.",
    )
    _add_model_args(ap)
    ap.add_argument("pos_requests", nargs="?", metavar="REQUESTS", help=argparse.SUPPRESS)
    ap.add_argument("--requests", help="edit requests: .jsonl (ldke-peft) or .json (EasyEdit)")
    ap.add_argument("--out", required=True, help="output folder: merged pack; shard packs under OUT/shards/rank<k>")
    ap.add_argument("--negatives", help="JSONL of questions/relations and images/entities for the router's hard "
                    "negatives (as 'ldke edit --negatives'; default for the toy world: its own pool)")
    ap.add_argument("--config", help="JSON/YAML file of LDKEConfig fields")
    ap.add_argument("--rank", type=int, help="rank of each edit's delta")
    ap.add_argument("--num-edit-layers", type=int)
    ap.add_argument("--edit-steps", type=int)
    ap.add_argument("--probe-layer", type=int)
    ap.add_argument("--localization", choices=["attribution", "tracing", "fixed"])
    ap.add_argument("--layers", metavar="I,J", help="edit these decoder layers (implies --localization fixed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--on-conflict", choices=["error", "keep_first", "keep_last"], default="error",
                    help="same image + prompt edited to different targets in different shards")
    ap.add_argument("--keep-shards", action="store_true", help="keep OUT/shards after merging")
    return ap


def _edit_config(args: argparse.Namespace) -> Any:
    from .tuner.config import LDKEConfig

    overrides: dict[str, Any] = {}
    if args.config:
        with open(args.config, encoding="utf-8") as fh:
            if args.config.endswith(".json"):
                overrides.update(json.load(fh))
            else:
                import yaml

                overrides.update(yaml.safe_load(fh) or {})
    for name in ("rank", "num_edit_layers", "edit_steps", "probe_layer", "localization"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.layers:
        overrides.update(localization="fixed", fixed_layers=[int(i) for i in args.layers.split(",")])
    return LDKEConfig(**overrides) if overrides else None


def edit_main(argv: Sequence[str] | None = None) -> int:
    """``edit``: shard, edit, merge. Returns 0; errors propagate (in every process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_edit_parser()
    args = ap.parse_args(argv)
    _resolve_positional(args, ("model", "requests"), ap)
    if _launched_itself("edit", argv, args):
        return 0

    state = _state(args.cpu)
    rank, world = state.process_index, state.num_processes
    out = Path(args.out)
    shard_dir = out / SHARDS_DIR / f"rank{rank}"

    def work() -> dict[str, Any]:
        from .editing.editor import edit
        from .hub import save_edits

        requests = _load_requests(args)
        mine = shard_indices(len(requests), rank, world)
        if not mine:
            return {"n": len(requests), "indices": []}
        model, processor, pool = load_world_or_model(args.model, processor=args.processor, device=_device(args, state),
                                                      dtype=args.dtype)
        if args.negatives:
            from .requests import load_negatives

            pool = load_negatives(args.negatives, image_root=args.image_root)
        pm = edit(model, processor, [requests[i] for i in mine], _edit_config(args), negatives=pool,
                  progress=False, seed=args.seed)
        edits = pm.peft_config["default"].edits
        for j, i in enumerate(mine):
            edits[j]["request_index"] = i
        reports = list(getattr(pm, "ldke_reports", []))
        save_edits(pm, shard_dir, reports=reports)
        (shard_dir / "ldke_report.json").write_text(
            json.dumps([dict(dataclasses.asdict(r), request_index=i) for r, i in zip(reports, mine)], indent=1,
                       default=str)
        )
        logger.info("process %d/%d edited %d request(s) into %s", rank, world, len(mine), shard_dir)
        return {"n": len(requests), "indices": mine}

    try:
        payloads = _collect(state, _run_guarded(rank, work))
        status: dict[str, Any] = {"rank": rank}
        if state.is_main_process:
            status = _run_guarded(rank, lambda: _merge_shards(payloads, out, args))
        _collect(state, status)  # second collective: every process learns whether the merge worked
    finally:
        _shutdown(state)
    return 0


def _merge_shards(payloads: list[dict[str, Any]], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import shutil

    from .merge import merge_packs

    shards = [(p["rank"], p["indices"]) for p in sorted(payloads, key=lambda p: p["rank"]) if p["indices"]]
    if not shards:
        raise ValueError(f"{args.requests} contains no edit requests")
    dirs = [out / SHARDS_DIR / f"rank{r}" for r, _ in shards]
    where = {i: (s, j) for s, (_, idx) in enumerate(shards) for j, i in enumerate(idx)}
    order = [where[i] for i in sorted(where)]  # the request file's order
    res = merge_packs(dirs, out=out, on_conflict=args.on_conflict, slot_order=order,
                      names=[f"rank{r}" for r, _ in shards])
    report = []
    for slot, (s, j) in enumerate(res.report.slot_map):
        rows = json.loads((dirs[s] / "ldke_report.json").read_text())
        report.append(dict(rows[j], slot=slot))
    (out / "ldke_report.json").write_text(json.dumps(report, indent=1))
    if not args.keep_shards:
        shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
    print(f"merged {len(shards)} shard pack(s): {res.config.num_slots} edit(s), {res.report.groups} router "
          f"projection(s) -> {out}")
    return {}


# ---------------------------------------------------------------------- eval


def build_eval_parser(prog: str = "python -m ldke_peft.distributed eval") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog, description="Evaluate an edit pack with the requests sharded over processes; process 0 reports."
    )
    _add_model_args(ap)
    ap.add_argument("pos_pack", nargs="?", metavar="PACK", help=argparse.SUPPRESS)
    ap.add_argument("pos_requests", nargs="?", metavar="REQUESTS", help=argparse.SUPPRESS)
    ap.add_argument("--pack", help="edit pack folder (omit to evaluate the unedited model)")
    ap.add_argument("--requests", help="requests with their probes (.jsonl or EasyEdit .json)")
    ap.add_argument("--out", help="write the result (means, counts, per-request rows) as JSON here")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-generate", action="store_true", help="skip exact_match (greedy generation)")
    ap.add_argument("--locality-positions", choices=["sequence", "answer"], default="sequence")
    return ap


def aggregate_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means and counts over per-request metric rows, exactly as :func:`~ldke_peft.metrics.compute_metrics`
    aggregates its ``per_request`` list (``None`` and NaN rows do not count)."""
    from .metrics import METRIC_KEYS

    result: dict[str, Any] = {}
    counts = {}
    for k in METRIC_KEYS:
        vals = [r[k] for r in rows if r.get(k) is not None and not math.isnan(r[k])]
        counts[k] = len(vals)
        result[k] = sum(vals) / len(vals) if vals else None
    result["per_request"] = list(rows)
    result["counts"] = counts
    result["n"] = len(rows)
    return result


def eval_main(argv: Sequence[str] | None = None) -> int:
    """``eval``: sharded metrics, gathered on process 0. Returns 0; errors propagate."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_eval_parser()
    args = ap.parse_args(argv)
    if args.pos_requests is None and args.pos_pack is not None and args.requests is None and args.pack is not None:
        args.pos_requests, args.pos_pack = args.pos_pack, None  # `MODEL REQUESTS --pack P`
    _resolve_positional(args, ("model", "pack", "requests"), ap)
    if _launched_itself("eval", argv, args):
        return 0

    state = _state(args.cpu)
    rank, world = state.process_index, state.num_processes

    def work() -> dict[str, Any]:
        requests = _load_requests(args)
        mine = shard_indices(len(requests), rank, world)
        if not mine:
            return {"rows": []}
        rows = _evaluate_shard(args, state, [requests[i] for i in mine])
        return {"rows": list(zip(mine, rows))}

    try:
        payloads = _collect(state, _run_guarded(rank, work))
    finally:
        _shutdown(state)
    if state.is_main_process:
        rows = sorted((r for p in payloads for r in p["rows"]), key=lambda x: x[0])
        result = aggregate_rows([r for _, r in rows])
        result["world_size"] = world
        text = json.dumps(result, indent=1, default=float)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)
        from .metrics import METRIC_KEYS

        print(json.dumps({k: result[k] for k in METRIC_KEYS} | {"n": result["n"], "world_size": world}))
    return 0


def _evaluate_shard(args: argparse.Namespace, state: Any, requests: list[Any]) -> list[dict[str, Any]]:
    from .metrics import collect_pre, compute_metrics

    model, processor, _ = load_world_or_model(args.model, processor=args.processor, device=_device(args, state),
                                              dtype=args.dtype)
    if args.pack:
        import ldke_peft  # noqa: F401 - registers the LDKE PEFT type
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.pack)
        model.eval()
        with model.disable_adapter():
            pre = collect_pre(model, processor, requests, batch_size=args.batch_size)
    else:
        pre = collect_pre(model, processor, requests, batch_size=args.batch_size)
    res = compute_metrics(model, processor, requests, pre, batch_size=args.batch_size, generate=not args.no_generate,
                          locality_positions=args.locality_positions)
    return res["per_request"]


# ---------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ldke_peft.distributed {edit,eval} ...``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"edit": edit_main, "eval": eval_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m ldke_peft.distributed {edit,eval} [options]  (--help after the command)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if _env_flag("LDKE_VERBOSE") else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .errors import LDKEError

    try:
        return commands[argv[0]](argv[1:])
    except (LDKEError, OSError, ValueError, RuntimeError) as exc:
        print(f"ldke {argv[0]}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
