"""Share an edit pack through a Hugging Face Hub, and load it by repo id (also offline, from the cache).

By default this runs against a *local fake Hub* (an HTTP server on 127.0.0.1 that answers the calls
``huggingface_hub`` makes), so it needs no account and no network:

1. edit a fact and ``push_edits`` the pack (safetensors + an LDKE model card) to ``org/<name>``;
2. ``load_edits(fresh_base, "org/<name>")`` downloads it into a Hugging Face cache and loads it;
3. the same call with ``local_files_only=True`` (what ``HF_HUB_OFFLINE=1`` does) loads from the cache alone.

To share for real (not exercised by this project's tests), log in (``hf auth login``) and run::

    python examples/hub_share.py --endpoint https://huggingface.co --repo-id <you>/<name>

and load anywhere with ``import ldke_peft; PeftModel.from_pretrained(base, "<you>/<name>")``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from huggingface_hub import ModelCard

import ldke_peft
from ldke_peft.tuner.context import prompt_mask_context
from ldke_peft.hub import load_edits, push_edits
from ldke_peft.testing.fake_hub import FakeHub
from ldke_peft.testing.toy_world import toy_world


@torch.no_grad()
def logits(model, processor, request) -> torch.Tensor:
    family = ldke_peft.family_of(model)
    built = family.build_inputs(processor, [request.image], [request.prompt], [request.target])
    with prompt_mask_context(model, built.prompt_mask):  # teacher-forced pass: route on the prompt only
        return model(**built.inputs).logits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo-id", default="org/ldke-toy-edits", help="Hub repo to push to")
    parser.add_argument("--endpoint", help="Hub endpoint (default: start a local fake Hub)")
    parser.add_argument("--token", help="Hub token (default: the logged-in user's; a dummy one for the fake Hub)")
    parser.add_argument("--cache-dir", help="Hugging Face cache for the download (default: a temporary folder, removed at the end)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cache_dir:
        return run(args, args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="ldke-hf-cache-") as cache_dir:  # removed at the end
        return run(args, cache_dir)


def run(args: argparse.Namespace, cache_dir: str) -> int:

    world = toy_world(args.seed)
    processor = world.processor
    request = world.edit_requests(1, seed=args.seed)[0]
    edited = ldke_peft.edit(world.model, processor, [request], progress=False)
    metrics = ldke_peft.evaluate(edited, processor, [request])  # shown on the model card
    reference = logits(edited, processor, request)

    fake = None if args.endpoint else FakeHub().start()
    endpoint = args.endpoint or fake.endpoint
    token = args.token or ("hf_fake_token" if fake else None)
    try:
        url = push_edits(edited, args.repo_id, endpoint=endpoint, token=token, metrics=metrics,
                         commit_message=f"LDKE: {request.subject} {request.relation} -> {request.target}")
        print(f"pushed: {url}")
        if fake:
            commit = fake.commits(args.repo_id)[-1]
            print(f"  commit {commit.oid[:10]} '{commit.summary}': {', '.join(sorted(commit.files))}")
            card = ModelCard(commit.files["README.md"].decode())
            print(f"  model card metadata: {card.data.to_dict()}")

        # a freshly loaded base model + load by repo id (downloads into the HF cache layout)
        fresh = toy_world(args.seed).model
        loaded = load_edits(fresh, args.repo_id, endpoint=endpoint, token=token, cache_dir=cache_dir)
        diff_online = (logits(loaded, processor, request) - reference).abs().max().item()
        print(f"loaded {args.repo_id} from the Hub into {cache_dir}: max logit difference {diff_online:.1e}")
    finally:
        if fake:
            fake.stop()

    # offline: the Hub is gone; the cache (models--org--name/snapshots/<commit>/...) is enough
    fresh = toy_world(args.seed).model
    offline = load_edits(fresh, args.repo_id, cache_dir=cache_dir, local_files_only=True)
    diff_offline = (logits(offline, processor, request) - reference).abs().max().item()
    storage = os.path.join(cache_dir, "models--" + args.repo_id.replace("/", "--"))
    print(f"loaded {args.repo_id} offline from {storage}: max logit difference {diff_offline:.1e}")
    return 0 if diff_online == 0.0 and diff_offline == 0.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
