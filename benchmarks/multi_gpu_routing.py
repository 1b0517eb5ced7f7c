"""Routing on a model split over two devices: the decision reaches every edited layer on its own device.

LDKE decides per input at the probe layer (a forward hook on that decoder layer) and every edited
layer applies only the chosen slot's delta. With ``device_map`` the probe layer and the edited layers
may sit on different GPUs: the decision tensor lives on the probe layer's device, each
``LDKELinear`` moves it to its own input's device, and PEFT puts each layer's deltas (and the router)
next to the base weights they wrap. This script checks that on a real split:

1. an edit pack is made on one device (the reference): two edited layers per slot, chosen so that
   one sits on each device of the split;
2. a fresh copy of the base model is dispatched over the devices (``accelerate.dispatch_model``
   with a manual device map: decoder layers ``[0, L/2)`` and every non-decoder module on the first
   device, layers ``[L/2, L)`` on the second — the layout ``device_map="auto"`` produces for a model
   too large for one GPU), and the pack is loaded onto it;
3. for every probe of every request: the routing decision equals the reference one; on every edited
   layer, exactly the rows routed to a slot hosted there change that layer's output, computed on
   that layer's device; the logits match the reference; and the metrics
   (:func:`ldke_peft.metrics.compute_metrics`) equal the reference metrics.

Usage::

    python benchmarks/multi_gpu_routing.py                      # toy world, cuda:0 + cuda:1
    python benchmarks/multi_gpu_routing.py --model PATH --requests edits.jsonl
    python benchmarks/multi_gpu_routing.py --devices cpu,cpu    # smoke test of the script on one CPU

It needs two CUDA devices; without them it prints why and exits with status 0 (``--require``: 1), so a
CPU-only CI can run it. ``--devices cpu,cpu`` runs every check on one device (no cross-device proof).
Exit status 1 when a check fails. Results as JSON on stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _devices(spec: str) -> list[torch.device]:
    devs = [torch.device(d.strip()) for d in spec.split(",") if d.strip()]
    if len(devs) != 2:
        raise SystemExit(f"--devices needs exactly two devices, got {spec!r}")
    return devs


def _available(devs: list[torch.device]) -> str | None:
    """Why the devices cannot be used, or None."""
    cuda = [d for d in devs if d.type == "cuda"]
    if not cuda:
        return None
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine (torch %s)" % torch.__version__
    n = torch.cuda.device_count()
    need = max((d.index or 0) for d in cuda) + 1
    if n < need or len({d.index or 0 for d in cuda}) < len(cuda):
        return f"needs {len(cuda)} distinct CUDA devices (up to cuda:{need - 1}); this machine has {n}"
    return None


def split_device_map(model: Any, devs: list[torch.device]) -> tuple[dict[str, str], dict[int, torch.device]]:
    """``{module name: device}`` covering every parameter: decoder layers split in halves, other modules on
    the first device; and each decoder layer's device."""
    from ldke_peft.families import family_of

    family = family_of(model)
    path = family.layers_path
    L = family.num_layers(model)
    half = L // 2
    layer_dev = {i: devs[0] if i < half else devs[1] for i in range(L)}
    dm: dict[str, str] = {}

    def walk(prefix: str, module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if full == path:
                for i in range(len(child)):
                    dm[f"{full}.{i}"] = str(layer_dev[i])
            elif path.startswith(full + "."):
                if any(True for _ in child.parameters(recurse=False)) or any(True for _ in child.buffers(recurse=False)):
                    raise SystemExit(f"{full} holds tensors of its own; give a device map by hand")
                walk(full, child)
            else:
                dm[full] = str(devs[0])

    walk("", model)
    return dm, layer_dev


@torch.no_grad()
def run_rows(pm: Any, processor: Any, rows: list[tuple[Any, str]], probe: "LayerProbe | None" = None):
    """Per row: routing decision and last-position logits (one forward pass per row)."""
    from ldke_peft.tuner.context import prompt_mask_context
    from ldke_peft.families import family_of

    fam = family_of(pm)
    dev = next(p.device for p in pm.parameters())
    out_dec, out_logits = [], []
    for i, (image, prompt) in enumerate(rows):
        built = fam.build_inputs(processor, [image], [prompt]).to(dev)
        if probe is not None:
            probe.row = i
        with prompt_mask_context(pm, built.prompt_mask):
            logits = pm(**built.inputs).logits[0, -1].float().cpu()
        out_dec.append(int(pm.base_model.last_routing("default")[0]))
        out_logits.append(logits)
    return out_dec, out_logits


class LayerProbe:
    """Forward hooks on every LDKELinear: per (row, layer) the device the layer ran on, where its deltas
    live, and whether the layer's output differs from its base layer's."""

    def __init__(self, pm: Any):
        from ldke_peft.tuner.layer import LDKELinear

        self.row = -1
        self.records: list[dict[str, Any]] = []
        self.handles = []
        for m in pm.modules():
            if isinstance(m, LDKELinear) and "default" in m.ldke_A:
                self.handles.append(m.register_forward_hook(self._hook))

    def _hook(self, module, args, output):
        x = args[0]
        with torch.no_grad():
            base = module.base_layer(x)
        changed = bool((output.float() - base.float()).abs().amax() > 0)
        self.records.append({
            "row": self.row, "layer": module.layer_idx, "x_device": str(x.device),
            "weight_device": str(module.get_base_layer().weight.device),
            "delta_device": str(module.ldke_A["default"].device), "hosted": module.hosted_slots("default"),
            "changed": changed,
        })

    def remove(self):
        for h in self.handles:
            h.remove()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy", help="'toy' (the toy world) or a model folder")
    ap.add_argument("--requests", help="edit requests (.jsonl); default for the toy world: 4 generated edits")
    ap.add_argument("--n-edits", type=int, default=4)
    ap.add_argument("--devices", default="cuda:0,cuda:1", help="the two devices of the split (default cuda:0,cuda:1)")
    ap.add_argument("--require", action="store_true", help="exit 1 (not 0) when the devices are missing")
    ap.add_argument("--atol", type=float, default=1e-3, help="max |logit difference| split vs reference")
    ap.add_argument("--out", help="also write the JSON result here")
    args = ap.parse_args(argv)

    devs = _devices(args.devices)
    why = _available(devs)
    if why is not None:
        print(f"multi_gpu_routing: SKIPPED: {why}. This check needs two CUDA devices "
              "(or run `--devices cpu,cpu` for a single-device smoke test of the script).", file=sys.stderr)
        return 1 if args.require else 0

    import ldke_peft
    from accelerate import dispatch_model
    from accelerate.utils import check_device_map
    from peft import PeftModel

    from ldke_peft import LDKEConfig
    from ldke_peft.families import family_of
    from ldke_peft.metrics import METRIC_KEYS, collect_pre, compute_metrics
    from ldke_peft.tuner.model import default_probe_layer
    from ldke_peft.requests import PROBE_FIELDS

    t0 = time.perf_counter()
    if args.model == "toy" or args.model.startswith("toy:"):
        from ldke_peft.testing.toy_world import toy_world

        world = toy_world(seed=int(args.model.split(":")[1]) if ":" in args.model else 0)
        base, processor, pool = world.model, world.processor, world.negative_pool()
        reqs = world.edit_requests(args.n_edits, seed=3) if not args.requests else None
    else:
        from ldke_peft.cli import load_model

        base, processor = load_model(args.model, device="cpu")
        pool, reqs = None, None
    if reqs is None:
        if not args.requests:
            raise SystemExit("--requests is required with --model PATH")
        from ldke_peft.requests import load_jsonl

        reqs = load_jsonl(args.requests, open_images=True)
    family = family_of(base)
    L = family.num_layers(base)
    probe = default_probe_layer(L)
    dm, layer_dev = split_device_map(base, devs)
    # one edited layer per half of the split: the last layer of each half (above the probe layer)
    half = L // 2
    first = list(range(probe + 1, half))
    second = list(range(max(probe + 1, half), L))
    edit_layers = ([first[-1]] if first else []) + ([second[-1]] if second else [])
    result: dict[str, Any] = {"model": args.model, "devices": [str(d) for d in devs], "num_layers": L,
                              "probe_layer": probe, "probe_device": str(layer_dev[probe]),
                              "edit_layers": {str(i): str(layer_dev[i]) for i in edit_layers}, "checks": {}}
    checks = result["checks"]

    # 1. reference pack and reference outputs, everything on the first device
    ref_model = copy.deepcopy(base).to(devs[0]).eval()
    pre = collect_pre(ref_model, processor, reqs)
    cfg = LDKEConfig(probe_layer=probe, localization="fixed", fixed_layers=edit_layers, num_edit_layers=len(edit_layers))
    ref = ldke_peft.edit(ref_model, processor, reqs, cfg, negatives=pool, progress=False)
    tmp = tempfile.mkdtemp(prefix="ldke-multi-device-")
    ref.save_pretrained(tmp)
    rows = []
    for r in reqs:
        rows += [(r.image, r.prompt)] + [(r.image, p) for p in r.rephrase_prompts] + [(im, r.prompt) for im in r.rephrase_images]
        for f in PROBE_FIELDS:
            rows += [(p.image, p.prompt) for p in getattr(r, f)]
    ref_dec, ref_logits = run_rows(ref, processor, rows)
    ref_metrics = compute_metrics(ref, processor, reqs, pre)

    # 2. the split model
    split = copy.deepcopy(base).eval()
    check_device_map(split, dm)
    split = dispatch_model(split, device_map=dm)
    pm = PeftModel.from_pretrained(split, tmp)
    pm.eval()
    tuner = pm.base_model
    placed = {}
    for i, m in tuner.ldke_layers("default").items():
        devs_here = {str(m.get_base_layer().weight.device)}
        if "default" in m.ldke_A:
            devs_here |= {str(m.ldke_A["default"].device), str(m.ldke_B["default"].device)}
        if m.router("default") is not None:
            devs_here |= {str(b.device) for b in m.router("default").buffers()}
        placed[str(i)] = sorted(devs_here)
    result["placement"] = placed
    checks["adapter_next_to_base_weights"] = all(len(v) == 1 for v in placed.values())
    if devs[0] != devs[1]:
        checks["edited_layers_on_two_devices"] = len({str(layer_dev[i]) for i in edit_layers}) == 2

    # 3. decisions, per-layer effects, logits, metrics
    probe_hooks = LayerProbe(pm)
    dec, logits = run_rows(pm, processor, rows, probe_hooks)
    probe_hooks.remove()
    checks["decisions_equal_reference"] = dec == ref_dec
    result["rows"] = len(rows)
    result["routed_rows"] = sum(d >= 0 for d in dec)
    per_layer_ok = True
    layers_seen: dict[str, set] = {}
    for rec in probe_hooks.records:
        d = dec[rec["row"]]
        should_change = d >= 0 and d in rec["hosted"]
        layers_seen.setdefault(str(rec["layer"]), set()).add(rec["x_device"])
        if rec["x_device"] != rec["weight_device"] or rec["delta_device"] != rec["weight_device"]:
            per_layer_ok = False
        if rec["changed"] != should_change:
            per_layer_ok = False
    result["edited_layer_devices_seen"] = {k: sorted(v) for k, v in layers_seen.items()}
    checks["delta_applied_exactly_on_routed_rows_on_own_device"] = per_layer_ok and bool(probe_hooks.records)
    diff = max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits))
    result["max_logit_diff"] = diff
    checks["logits_match_reference"] = diff <= args.atol
    split_metrics = compute_metrics(pm, processor, reqs, pre)
    result["metrics"] = {"reference": {k: ref_metrics[k] for k in METRIC_KEYS}, "split": {k: split_metrics[k] for k in METRIC_KEYS}}
    checks["metrics_equal_reference"] = all(
        (ref_metrics[k] is None and split_metrics[k] is None) or abs(ref_metrics[k] - split_metrics[k]) <= 1e-6
        for k in METRIC_KEYS
    )
    result["seconds"] = time.perf_counter() - t0
    result["ok"] = all(checks.values())
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if not checks.get("edited_layers_on_two_devices", True):
        print("multi_gpu_routing: warning: the edited layers did not land on two devices (too few layers?)",
              file=sys.stderr)
    print("multi_gpu_routing: " + ("PASS" if result["ok"] else "FAIL: " + ", ".join(k for k, v in checks.items() if not v)),
          file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
