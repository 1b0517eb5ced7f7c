"""Does an edit made on a CUDA GPU behave as one made on the CPU, in float32 and in bfloat16?

On the toy world (:mod:`ldke_peft.testing.toy_world`), the same ``n`` edits (half in one call, the rest
appended to the same pack in a second) are made three times: on the CPU in float32 (the reference), on
``--device`` in float32 and on ``--device`` in bfloat16 (the whole model cast, as a user serving in bf16
would); the question encoder's memo is emptied before each, so each encodes on its own device. Each pack is scored with
:func:`ldke_peft.evaluate` where it was made, saved, and reloaded with ``PeftModel.from_pretrained`` onto a
fresh float32 CPU base, where it is scored again: a pack made on a GPU must serve on a CPU. Edit times are
wall clock with ``torch.cuda.synchronize``; GPU against CPU is a ratio within the same run.

Every stage runs even if an earlier one fails (the traceback is recorded), so one run on a lent GPU tells
everything it can.

    python benchmarks/gpu_check.py --device cuda --edits 8 --out gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import traceback
from pathlib import Path

import torch
from peft import PeftModel

import ldke_peft
from ldke_peft.demo import ask
from ldke_peft.testing.toy_world import toy_world

COLUMNS = ("reliability", "t_generality", "m_generality", "t_locality", "m_locality", "coupled_locality")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _scores(metrics: dict) -> dict:
    return {k: metrics.get(k) for k in COLUMNS}


def stage(device: str, dtype: torch.dtype, n: int, seed: int, out: dict) -> None:
    from ldke_peft.tuner.question_key import _ENCODERS

    for enc in _ENCODERS.values():  # each stage encodes its questions on its own device, not from the memo
        enc.clear_memo()
    world = toy_world(seed)
    requests = world.edit_requests(n, seed=seed)
    model = world.model.to(device=device, dtype=dtype)
    _sync(device)
    t0 = time.perf_counter()
    plain = [r.without_probes() for r in requests]
    half = max(1, len(plain) // 2)
    pm = ldke_peft.edit(model, world.processor, plain[:half], negatives=world.negative_pool(), progress=False)
    _sync(device)
    out["edit_s"] = time.perf_counter() - t0
    if plain[half:]:  # the rest appended to the same pack (the sequential path: scope memory, guards)
        t0 = time.perf_counter()
        pm = ldke_peft.edit(pm, world.processor, plain[half:], pack=pm, negatives=world.negative_pool(),
                            progress=False)
        _sync(device)
        out["append_s"] = time.perf_counter() - t0
    out["generated"] = [ask(pm, world.processor, r.image, r.prompt) for r in requests[:2]]
    out["targets"] = [r.target for r in requests[:2]]
    out["fit_dtype"] = str(getattr(pm.peft_config["default"], "edit_fit_dtype", None))
    out["here"] = _scores(ldke_peft.evaluate(pm, world.processor, requests, generate=False))
    out["slot_layers"] = pm.peft_config["default"].slot_layers
    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d)
        fresh = toy_world(seed)
        cpu = PeftModel.from_pretrained(fresh.model, d)
        out["reloaded_cpu_fp32"] = _scores(ldke_peft.evaluate(cpu, fresh.processor, requests, generate=False))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--edits", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    report: dict = {
        "config": {
            "device": args.device, "edits": args.edits, "seed": args.seed, "torch": torch.__version__,
            "ldke_peft": ldke_peft.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_threads": torch.get_num_threads(),
        },
        "stages": {},
    }
    for name, device, dtype in (("cpu_fp32", "cpu", torch.float32), ("gpu_fp32", args.device, torch.float32),
                                ("gpu_bf16", args.device, torch.bfloat16)):
        row: dict = {"device": device, "dtype": str(dtype)}
        report["stages"][name] = row
        try:
            stage(device, dtype, args.edits, args.seed, row)
        except Exception:  # noqa: BLE001 - record and go on: one lent run must tell all it can
            row["error"] = traceback.format_exc()
        print(name, json.dumps({k: v for k, v in row.items() if k != "error"}), row.get("error", ""), flush=True)
    cpu = report["stages"]["cpu_fp32"].get("edit_s")
    for name in ("gpu_fp32", "gpu_bf16"):
        if cpu and report["stages"][name].get("edit_s"):
            report["stages"][name]["edit_time_vs_cpu"] = report["stages"][name]["edit_s"] / cpu
            if report["stages"]["cpu_fp32"].get("append_s") and report["stages"][name].get("append_s"):
                report["stages"][name]["append_time_vs_cpu"] = (report["stages"][name]["append_s"]
                                                                 / report["stages"]["cpu_fp32"]["append_s"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return 0 if not any("error" in r for r in report["stages"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
