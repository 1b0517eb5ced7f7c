"""Quickstart: edit one fact of a multimodal model, save the edit pack, load it back with plain PEFT.

Runs offline on the toy world, a tiny LLaVA trained on invented countries (it is trained on the first
run, about a minute on one CPU core, and cached afterwards). To edit your own model, replace
the two ``toy_world`` lines with::

    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained("llava-hf/llava-1.5-7b-hf")
    processor = AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf")

and build the ``EditRequest`` from your own image file (``image="flag.png"``).

    python examples/quickstart.py --out ./my-pack
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from peft import PeftModel

import ldke_peft  # registers the LDKE PEFT type (needed before PeftModel.from_pretrained)
from ldke_peft import EditRequest
from ldke_peft.metrics.routes import which_slots
from ldke_peft.testing.toy_world import toy_world


@torch.no_grad()
def answer(model, processor, image, question: str) -> str:
    """Greedy answer to one question about one image (works for base and edited models)."""
    family = ldke_peft.family_of(model)  # knows how this model family formats prompts and images
    inputs = family.build_inputs(processor, [image], [question]).inputs
    tok = family.tokenizer(processor)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for the edit pack (default: a temporary folder, removed at the end)")
    parser.add_argument("--seed", type=int, default=0, help="toy-world seed")
    parser.add_argument("--entity", type=int, default=3, help="which country of the toy world to edit")
    args = parser.parse_args(argv)
    if args.out:
        return run(args, args.out)
    with tempfile.TemporaryDirectory(prefix="ldke-quickstart-") as out:  # removed at the end; --out keeps the pack
        return run(args, out)


def run(args: argparse.Namespace, out: str) -> int:

    # 1. A model and its processor. The toy world is a real LlavaForConditionalGeneration + LlavaProcessor.
    world = toy_world(args.seed)
    model, processor = world.model, world.processor

    # 2. What to change: "for this image and question, answer `target`". Rephrasings and other photos of
    #    the same entity help the edit generalise (the router learns what "in scope" means from them).
    country = world.entities[args.entity]
    image = world.render(country)  # a PIL image of the country's flag
    question = "What is the capital of the country shown?"
    old = answer(model, processor, image, question)
    new = next(city for city in world.answer_vocab("capital") if city != old)
    request = EditRequest(
        image=image,
        prompt=question,
        target=new,
        ground_truth=old,
        rephrase_images=[world.render(country, view=v) for v in (1, 2)],  # other photos of the same flag
        rephrase_prompts=["Which city is the capital of this country?", "Name the capital of the country in the picture."],
        subject=country,
        relation="capital",
    )

    # 3. Edit. Returns a peft.PeftModel carrying an LDKE adapter; the base weights are untouched.
    edited = ldke_peft.edit(model, processor, [request])
    probes = {
        "edit question": (image, question),
        "unseen wording": (image, "What city is the capital of the country in the picture?"),
        "another view": (world.render(country, view=10_001), question),
        "same flag, other question": (image, "What language is spoken in the country shown?"),
        "other country": (world.render(world.entities[(args.entity + 1) % len(world.entities)]), question),
    }
    after = {name: answer(edited, processor, im, q) for name, (im, q) in probes.items()}
    # which inputs the edit fired on (the router's decision; `ldke route` does the same from the command line)
    fired = which_slots(edited, processor, [im for im, _ in probes.values()], [q for _, q in probes.values()])
    print(f"{country}: {question}  {old} -> {new}")
    for (name, text), slots in zip(after.items(), fired):
        print(f"  {name:28s} {text:14s} {'edit fired' if slots['default'] >= 0 else 'original weights'}")

    # 4. Save: adapter_config.json + adapter_model.safetensors + ldke_edits.json (an "edit pack").
    edited.save_pretrained(out)

    # 5. Load it the PEFT way onto a freshly loaded base model, and check the answers are the same.
    fresh = toy_world(args.seed).model
    reloaded = PeftModel.from_pretrained(fresh, out)
    again = {name: answer(reloaded, processor, im, q) for name, (im, q) in probes.items()}
    same = again == after
    print(f"saved to {out}; reloaded with PeftModel.from_pretrained: {'same answers' if same else 'DIFFERENT answers'}")
    return 0 if same and after["edit question"] == new else 1


if __name__ == "__main__":
    raise SystemExit(main())
