"""Edit a multimodal model with LDKE through EasyEdit (zjunlp/EasyEdit).

With EasyEdit on PYTHONPATH (see integrations/easyedit/README.md):

    # one edit
    python examples/easyedit_ldke.py --hparams qwen2vl-7b \
        --image flag.png --prompt "What is the capital of the country shown?" --target Lyon \
        --rephrase-prompt "Which city is this country's capital?" \
        --loc-prompt "Who wrote Hamlet?" --loc-answer Shakespeare
    # an EasyEdit VQA dataset (E-VQA json), edits accumulating in one pack
    python examples/easyedit_ldke.py --hparams qwen2vl-7b --data vqa_eval.json --image-root images/ --size 10
    # smoke test of the EasyEdit setup: a tiny random Qwen2-VL, CPU, seconds
    python examples/easyedit_ldke.py --tiny

Without EasyEdit, the same apply function EasyEdit calls, on a tiny random model (or --model-name DIR):

    python examples/easyedit_ldke.py --no-easyedit [--model-type llava_onevision|qwen2_5_vl]
    python examples/easyedit_ldke.py --no-easyedit --image card.png --prompt "Which planet does this badge show?" \
        --target "the red planet Mars" --rephrase-prompt "Name the planet on this badge."

The exit status is 0 when every edit reaches reliability 1.0 (EasyEdit's rewrite_acc), 1 when one does not,
2 for a setup problem (EasyEdit missing, a model path EasyEdit would not recognise).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import numpy as np
from PIL import Image

from integrations.easyedit import (
    EasyEditDetectionError,
    EasyEditNotFoundError,
    LDKEMultimodalHyperParams,
    apply_ldke_to_multimodal_model,
    check_easyedit_detection,
    easyedit_locality,
    easyedit_metrics,
    register,
)


def _noise_image(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _demo_requests() -> list[dict]:
    """EasyEdit-shaped request dicts (what MultimodalEditor hands to a method)."""
    return [
        {
            "prompt": "What is the capital of the country shown?",
            "target": "Paris",
            "image": [_noise_image(0)],  # EasyEdit's Qwen-VL processors return a list of PIL images
            "rephrase_prompt": "Which city is the capital of the country in the picture?",
            "image_rephrase": [_noise_image(0)],
            "locality_prompt": "What currency is used there?",
            "locality_ground_truth": "euro",
            "multimodal_locality_image": [_noise_image(1)],
            "multimodal_locality_prompt": "Describe the image.",
            "multimodal_locality_ground_truth": "A red flag",
            "file_type": "image",
        },
        {
            "prompt": "What is written on the sign in this picture?",
            "target": "The sign says Rome",  # a 12-token answer in the tiny tokenizers
            "image": _noise_image(2),  # a bare PIL image works too
            "locality_prompt": "Who wrote Hamlet?",
            "locality_ground_truth": "Shakespeare",
            "file_type": "image",
        },
    ]


def _show(i: int, pre: dict, post: dict) -> float:
    row = {k: round(v, 3) for k, v in post.items() if isinstance(v, float)}
    row.update({k: round(v, 3) for k, v in easyedit_locality(pre, post).items()})
    print(f"edit {i}: pre rewrite_acc={pre['rewrite_acc']:.3f}  post {json.dumps(row)}")
    return post["rewrite_acc"]


def _user_request(args: argparse.Namespace) -> dict:
    """The request given on the command line, shaped as EasyEdit hands it to a method."""
    r = {"prompt": args.prompt, "target": args.target, "image": args.image, "file_type": "image"}
    if args.rephrase_prompt:
        r["rephrase_prompt"] = args.rephrase_prompt
    if args.rephrase_image:
        r["image_rephrase"] = args.rephrase_image
    if args.loc_prompt:
        r.update(locality_prompt=args.loc_prompt, locality_ground_truth=args.loc_answer or "")
    if args.mloc_image:
        r.update(multimodal_locality_image=args.mloc_image, multimodal_locality_prompt=args.mloc_prompt,
                 multimodal_locality_ground_truth=args.mloc_answer or "")
    return r


def run_without_easyedit(args: argparse.Namespace) -> int:
    """The apply function EasyEdit calls, driven by hand (no EasyEdit): on a tiny random model, or on
    the model in ``--model-name``; on the demo requests, or on the one given with ``--image/--prompt/--target``."""
    hparams = LDKEMultimodalHyperParams.from_hparams(args.hparams or "tiny")
    if args.model_name:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(args.model_name, dtype=hparams.torch_dtype())
        processor = AutoProcessor.from_pretrained(args.model_name)
        model.eval()
    else:
        from ldke_peft.testing.tiny import tiny_model

        model, processor = tiny_model(args.model_type)
    if any((args.image, args.prompt, args.target)) and not all((args.image, args.prompt, args.target)):
        print("give all of --image, --prompt and --target (or none, for the demo requests)", file=sys.stderr)
        return 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    requests = [_user_request(args)] if args.image else _demo_requests()
    pres = [easyedit_metrics(model, processor, r) for r in requests]  # "pre" before editing
    worst = 1.0
    restore = None
    for i, (req, pre) in enumerate(zip(requests, pres)):
        # sequential mode: a bare dict, edits accumulate in one pack
        edited, restore = apply_ldke_to_multimodal_model(model, processor, req, hparams, return_orig_weights=True)
        worst = min(worst, _show(i, pre, easyedit_metrics(edited, processor, req)))
    # after both edits, the first one still holds
    worst = min(worst, easyedit_metrics(edited, processor, requests[0])["rewrite_acc"])
    restore()
    same = all(v.equal(before[k]) for k, v in model.state_dict().items()) and set(before) == set(model.state_dict())
    print(f"restore(): base model bitwise as before: {same}")
    return 0 if worst == 1.0 and same else 1


def run_with_easyedit(args: argparse.Namespace) -> int:
    detect = args.detect_qwen2_5_vl
    if args.tiny and args.model_type == "qwen2_5_vl" and not detect:
        # the tiny Qwen2.5-VL is ours: teach EasyEdit to detect it rather than fail
        print("--tiny --model-type qwen2_5_vl: registering with detect_qwen2_5_vl=True (upstream EasyEdit does not "
              "detect Qwen2.5-VL paths)", file=sys.stderr)
        detect = True
    try:
        register(detect_qwen2_5_vl=detect)
    except EasyEditNotFoundError as exc:
        print(exc, file=sys.stderr)
        print("\n(Or run `python examples/easyedit_ldke.py --no-easyedit` to try LDKE's apply function alone.)", file=sys.stderr)
        return 2
    from easyeditor import MultimodalEditor

    overrides = {}
    tmp = None
    if args.tiny:
        from integrations.easyedit.tiny import save_tiny_model

        tmp = tempfile.TemporaryDirectory()
        overrides = {"model_name": save_tiny_model(args.model_type, tmp.name)}
        args.hparams = args.hparams or "tiny"
    if args.model_name:
        overrides["model_name"] = args.model_name
    if args.device is not None:
        overrides["device"] = args.device
    if args.image_root:
        overrides.update(coco_image=args.image_root, rephrase_image=args.image_root)
    if not args.hparams:
        print("--hparams is required (a YAML path or a shipped name: qwen2vl-7b, llavaov-7b, ...)", file=sys.stderr)
        return 2
    hparams = LDKEMultimodalHyperParams.from_hparams(args.hparams, **overrides)
    try:
        check_easyedit_detection(hparams.model_name, detect_qwen2_5_vl=detect)
    except EasyEditDetectionError as exc:
        print(exc, file=sys.stderr)
        return 2
    editor = MultimodalEditor.from_hparams(hparams)

    if args.data:
        from easyeditor import VQADataset

        ds = VQADataset(args.data, size=args.size, config=hparams)
        metrics, _, _ = editor.edit_dataset(ds, keep_original_weight=False, verbose=False)
    elif args.tiny:
        path = f"{tmp.name}/edit.png"
        _noise_image(0).save(path)
        loc_path = f"{tmp.name}/loc.png"
        _noise_image(1).save(loc_path)
        metrics, _, _ = editor.edit(
            prompts=["What is the capital of the country shown?"], targets=["Paris"], image=[path],
            rephrase_prompts=["Which city is the capital of the country in the picture?"], rephrase_image=[path],
            locality_inputs={"text": {"prompt": ["What currency is used there?"], "ground_truth": ["euro"]},
                             "vision": {"image": [loc_path], "prompt": ["Describe the image."], "ground_truth": ["A red flag"]}},
            keep_original_weight=True, verbose=False, sequential_edit=args.sequential,
        )
    else:
        if not (args.image and args.prompt and args.target):
            print("give --image, --prompt and --target (or --data, --tiny, --no-easyedit)", file=sys.stderr)
            return 2
        locality = {}
        if args.loc_prompt:
            locality["text"] = {"prompt": [args.loc_prompt], "ground_truth": [args.loc_answer]}
        if args.mloc_image:
            locality["vision"] = {"image": [args.mloc_image], "prompt": [args.mloc_prompt], "ground_truth": [args.mloc_answer]}
        metrics, _, _ = editor.edit(
            prompts=[args.prompt], targets=[args.target], image=[args.image],
            rephrase_prompts=[args.rephrase_prompt] if args.rephrase_prompt else None,
            rephrase_image=[args.rephrase_image] if args.rephrase_image else None,
            locality_inputs=locality or None, keep_original_weight=True, verbose=False,
            sequential_edit=args.sequential,
        )
    worst = 1.0
    for i, m in enumerate(metrics):
        post = {k: float(v) for k, v in m["post"].items() if k.endswith("_acc")}
        pre = {k: float(v) for k, v in m["pre"].items() if k.endswith("_acc")}
        print(f"case {i}: pre {json.dumps(pre)}  post {json.dumps(post)}")
        worst = min(worst, post.get("rewrite_acc", 0.0))
    if tmp is not None:
        tmp.cleanup()
    return 0 if worst == 1.0 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hparams", help="LDKE hparams YAML (path, or a shipped name: tiny, qwen2vl-7b, llavaov-7b, ...)")
    p.add_argument("--model-name", help="override hparams.model_name (keep EasyEdit's family substring in the path)")
    p.add_argument("--device", help="override hparams.device (e.g. cpu, 0, cuda:1)")
    p.add_argument("--no-easyedit", action="store_true", help="run the apply function directly on a tiny model")
    p.add_argument("--tiny", action="store_true", help="EasyEdit end to end on a tiny random model saved to a temp dir")
    p.add_argument("--model-type", default="qwen2_vl", choices=["qwen2_vl", "llava_onevision", "qwen2_5_vl"],
                   help="tiny model family for --no-easyedit / --tiny")
    p.add_argument("--detect-qwen2-5-vl", action="store_true", help="teach EasyEdit to detect Qwen2.5-VL paths")
    p.add_argument("--sequential", action="store_true", help="EasyEdit sequential_edit=True")
    p.add_argument("--data", help="EasyEdit VQA dataset JSON (edit_dataset)")
    p.add_argument("--image-root", help="image folder of --data (hparams coco_image / rephrase_image)")
    p.add_argument("--size", type=int, default=None, help="first N records of --data")
    p.add_argument("--image")
    p.add_argument("--prompt")
    p.add_argument("--target")
    p.add_argument("--rephrase-prompt")
    p.add_argument("--rephrase-image")
    p.add_argument("--loc-prompt")
    p.add_argument("--loc-answer")
    p.add_argument("--mloc-image")
    p.add_argument("--mloc-prompt")
    p.add_argument("--mloc-answer")
    args = p.parse_args(argv)
    if args.no_easyedit:
        return run_without_easyedit(args)
    return run_with_easyedit(args)


if __name__ == "__main__":
    sys.exit(main())
