"""Sharing edit packs on the Hugging Face Hub: a model card of our own, push, and load by repo id.

An LDKE edit pack is a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, with
the edit metadata beside them in ``ldke_edits.json``), so the Hub stores it like any adapter. Two things
differ from ``PeftModel.push_to_hub``:

* the **model card** is ours: ``push_to_hub`` regenerates PEFT's generic card (template text, no
  word about edits) over whatever ``README.md`` the folder had. Ours lists every edited fact (prompt -> new target,
  subject, relation, image fingerprint, edited layers), the base-model fingerprint, the metrics
  measured at edit time, and the one line users forget: ``import ldke_peft`` must run before
  ``PeftModel.from_pretrained`` (it registers the ``LDKE`` PEFT type; peft has no plugin discovery);
* only **safetensors** is ever written or uploaded (the loader refuses pickle files anyway).

Loading (:func:`load_edits`) downloads just the pack's files (``snapshot_download``, so ``revision``,
``cache_dir``, ``token``, ``endpoint`` and ``HF_HUB_OFFLINE`` all work) and then calls
``PeftModel.from_pretrained`` on the local folder: the pack's files are validated before injection
(:mod:`ldke_peft.tuner.safety`) and the base-model fingerprint is checked before any module is replaced, so
a foreign or corrupt pack raises an :class:`~ldke_peft.errors.AdapterLoadError` subclass and leaves
the base model as it was. Pushing was tested against an in-process fake Hub
(:class:`ldke_peft.testing.fake_hub.FakeHub`), not against huggingface.co.

Layer: product (README "Architecture"): may import every layer; no library layer imports it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import AdapterLoadError, LDKEError
from .tuner.pack_meta import EDITS_FILE, has_edits_file

logger = logging.getLogger(__name__)

__all__ = ["CARD_TAGS", "PACK_FILES", "load_edits", "model_card", "push_edits", "save_edits"]

#: Tags on every LDKE model card.
CARD_TAGS = ["ldke", "knowledge-editing", "multimodal", "peft"]
#: The files that make up a shared pack (nothing else is uploaded or downloaded).
PACK_FILES = ("adapter_config.json", "adapter_model.safetensors", EDITS_FILE, "README.md")

# A Hub repo id: "name" or "namespace/name" (letters, digits, "-", "_", "."; no "--" or ".." ).
_REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][\w.\-]{0,95}/)?[A-Za-z0-9][\w.\-]{0,95}$")


def _is_repo_id(value: str | None) -> bool:
    if not value or os.path.exists(value) or value.startswith((".", "/", "~")) or "\\" in value:
        return False
    return bool(_REPO_ID_RE.match(value)) and "--" not in value and ".." not in value


# ---------------------------------------------------------------------- model card


def _config_of(peft_model_or_config: Any, adapter_name: str) -> Any:
    from .tuner.config import LDKEConfig

    if isinstance(peft_model_or_config, LDKEConfig):
        return peft_model_or_config
    peft_config = getattr(peft_model_or_config, "peft_config", None)
    if not isinstance(peft_config, Mapping) or adapter_name not in peft_config:
        raise LDKEError(f"{type(peft_model_or_config).__name__} has no adapter named {adapter_name!r}")
    config = peft_config[adapter_name]
    if not isinstance(config, LDKEConfig):
        raise LDKEError(f"adapter {adapter_name!r} is a {type(config).__name__}, not an LDKE edit pack")
    return config


def _fix_image(image: Any, edit_image: Any) -> str:
    """The image of a scope correction's question, as the card's table names it."""
    if not image:
        return "text-only"
    return "the edit's" if image == edit_image else f"`{_cell(image, 40)}`"


def _cell(value: Any, limit: int = 80) -> str:
    """A markdown table cell: no pipes or newlines, long text shortened."""
    if value is None or value == "":
        return "–"
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _layers(layers: Any) -> str:
    return ", ".join(str(i) for i in layers) if layers else "–"


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _report_dicts(reports: Sequence[Any] | None) -> list[dict[str, Any]]:
    out = []
    for r in reports or []:
        if dataclasses.is_dataclass(r) and not isinstance(r, type):
            out.append(dataclasses.asdict(r))
        elif isinstance(r, Mapping):
            out.append(dict(r))
    return out


def _metrics_section(metrics: Mapping[str, Any] | None, reports: list[dict[str, Any]]) -> list[str]:
    from .metrics import METRIC_KEYS

    lines: list[str] = []
    if metrics:
        lines += [
            "## Metrics measured at edit time",
            "",
            f"EasyEdit-compatible metrics (see `ldke_peft.metrics`) over {metrics.get('n', 'the')} edit request(s); "
            "1.0 is best for every key. `coupled_locality` is the entanglement test: same image with another "
            "question, or a look-alike image with the same question, must keep its old answer.",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        keys = [k for k in METRIC_KEYS if k in metrics] + sorted(
            k for k, v in metrics.items() if k not in METRIC_KEYS and isinstance(v, (int, float)) and k != "n"
        )
        lines += [f"| {k} | {_fmt(metrics[k])} |" for k in keys]
        lines.append("")
    if reports:
        lines += [
            "## Edit reports",
            "",
            "Per slot: optimisation steps and target accuracy on the edit's positives (the edit question, its "
            "rephrasings and image views), and whether the router separated positives from negatives.",
            "",
            "| slot | layers | fit steps | fit accuracy | router separable | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for r in reports:
            router = r.get("router") or {}
            lines.append(
                f"| {r.get('slot', '–')} | {_layers(r.get('layers'))} | {_fmt(r.get('fit_steps'))} | "
                f"{_fmt(r.get('fit_accuracy'))} | {_fmt(router.get('separable'))} | {_fmt(r.get('seconds'))} |"
            )
        lines.append("")
    return lines


def model_card(
    peft_model: Any,
    repo_id: str | None = None,
    *,
    adapter_name: str = "default",
    base_model: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    reports: Sequence[Any] | None = None,
) -> Any:
    """The ``huggingface_hub.ModelCard`` of an LDKE edit pack.

    Args:
        peft_model: a ``PeftModel`` carrying an LDKE adapter, or its :class:`~ldke_peft.LDKEConfig`.
        repo_id: where the pack will live (used in the loading snippet).
        base_model: Hub id of the base model for the card's ``base_model`` field. Default: the
            config's ``base_model_name_or_path`` when it looks like a Hub id; a local path is not
            written to the metadata (the Hub rejects it) but is mentioned in the text.
        metrics: the result of :func:`ldke_peft.evaluate` (means per key), measured at edit time.
        reports: per-slot edit reports (``SlotReport`` or dicts). Default: ``peft_model.ldke_reports``.
    """
    from huggingface_hub import ModelCard, ModelCardData

    config = _config_of(peft_model, adapter_name)
    recorded = base_model or config.base_model_name_or_path
    hub_base = recorded if _is_repo_id(recorded) else None
    if reports is None:
        reports = getattr(peft_model, "ldke_reports", None)
    # another pack's slots are numbered from 0 too: its reports are not this card's
    report_list = [r for r in _report_dicts(reports) if r.get("adapter_name", adapter_name) == adapter_name]
    fp = dict(config.base_model_fingerprint or {})
    edits = list(config.edits or [])
    slot_layers = list(config.slot_layers or [])

    data = ModelCardData(library_name="peft", base_model=hub_base, tags=list(CARD_TAGS))
    base_text = f"[`{hub_base}`](https://huggingface.co/{hub_base})" if hub_base else (
        # the folder name only: a card is published, a local path is nobody else's business
        f"a local checkpoint (`{os.path.basename(os.path.normpath(recorded))}`)" if recorded else "an unrecorded base model"
    )
    lines = [
        f"# LDKE edit pack{': ' + repo_id if repo_id else ''}",
        "",
        f"An **LDKE edit pack** for {base_text}, made with "
        "[ldke-peft](https://pypi.org/project/ldke-peft/) (Localized and Disentangled Knowledge Editing for "
        "multimodal LLMs). It changes the facts listed below and nothing else:",
        "",
        f"* each edit is a rank-{config.rank} weight delta on the MLP output projection of the few decoder layers "
        "that Fast Localization found to carry the fact;",
        f"* a router (the *Disentanglement Classifier*, reading decoder layer {config.probe_layer}) applies an edit "
        "only when the image shows the edited entity **and** the question asks for the edited relation; every "
        "other input runs the original weights unchanged.",
        "",
        "The base model's weights are not modified and not included.",
        "",
        "## Edited facts",
        "",
        "| # | prompt | new target | old answer | subject | relation | image (sha256/12) | layers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in range(max(len(edits), len(slot_layers))):
        e = edits[k] if k < len(edits) else {}
        layers = e.get("layers") or (slot_layers[k] if k < len(slot_layers) else None)
        image = f"`{e['image_sha']}`" if e.get("image_sha") else "text-only"
        lines.append(
            f"| {k} | {_cell(e.get('prompt'))} | **{_cell(e.get('target'))}** | {_cell(e.get('ground_truth'))} | "
            f"{_cell(e.get('subject'))} | {_cell(e.get('relation'))} | {image} | "
            f"{_layers(layers)} |"
        )
    stated = [(k, c) for k, e in enumerate(edits) for c in e.get("consequences") or []
              if isinstance(c, (list, tuple)) and len(c) == 2]
    if stated:
        lines += ["", "Consequences stated with the edits (fitted into the same slot):", "",
                  "| # | question (about the edit's image) | answer after the edit |", "|---|---|---|"]
        lines += [f"| {k} | {_cell(q)} | **{_cell(a)}** |" for k, (q, a) in stated]
    fixed = [(k, f) for k, e in enumerate(edits) for f in e.get("scope_fixes") or [] if isinstance(f, dict)]
    if fixed:
        lines += ["", "## Scope corrections", "",
                  f"The router was corrected after editing (`ldke route --fix`, `ldke_peft.refine_scope`) for {len(fixed)} "
                  "question(s); no weight delta was changed:", "",
                  "| # | question | image | should fire edit # | change |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {_cell(f.get('question'))} | {_fix_image(f.get('image'), edits[k].get('image_sha'))} | "
                  f"{'yes' if f.get('in_scope') else 'no'} | {_cell(f.get('change'))} |" for k, f in fixed]
    lines.append("")
    lines += _metrics_section(metrics, report_list)
    lines += [
        "## Base model fingerprint",
        "",
        f"The pack only loads onto the base model it was made for: `model_type={fp.get('model_type', '?')}`, "
        f"hidden size {fp.get('hidden_size', '?')}, {fp.get('num_layers', '?')} decoder layers, plus sampled weights "
        "of every decoder layer's MLP output projection. Loading it onto another model raises "
        "`ldke_peft.FingerprintMismatchError` and leaves that model unmodified.",
        "",
        "## How to use",
        "",
        "```bash",
        "pip install ldke-peft",
        "```",
        "",
        "```python",
        "import ldke_peft  # registers the LDKE PEFT type: without this import peft cannot read this adapter",
        "from peft import PeftModel",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        f'base = AutoModelForImageTextToText.from_pretrained("{hub_base or "<base model>"}")',
        f'processor = AutoProcessor.from_pretrained("{hub_base or "<base model>"}")',
        f'model = PeftModel.from_pretrained(base, "{repo_id or "<this repo id>"}")',
        f'# or, with revision/cache/offline handling: ldke_peft.hub.load_edits(base, "{repo_id or "<this repo id>"}")',
        "```",
        "",
        "Edits answer greedily through `model.generate(...)` as usual. `merge_and_unload()` is refused: a merged "
        "edit would fire on every input and lose the routing that keeps unrelated inputs unchanged.",
        "",
    ]
    if getattr(config, "router_text_encoder", None):
        lines += [
            f"The router reads each question with the sentence encoder `{config.router_text_encoder}` (installed "
            "with ldke-peft, no download) and decodes the prompt with the base model's tokenizer, found beside "
            "the base model; for a base model without tokenizer files call "
            "`ldke_peft.attach_tokenizer(model, processor)` once.",
            "",
        ]
    if int(getattr(config, "router_text_anchors", 0) or 0):
        lines += [f"Slots keep {config.router_text_anchors} textual anchors: a question nearest to an out-of-scope one (another "
                  "question on the edit image, or one the base model proposed at edit time) does not fire the edit.", ""]
        words = sorted({str(e.get("asked_word")) for e in (config.edits or []) if isinstance(e, dict) and e.get("asked_word")})
        if getattr(config, "router_asked_word", False) and words:
            lines += ["A question that names the word its edit question asks about (" + ", ".join(f"`{w}`" for w in words)
                      + ") is kept out only by an out-of-scope question that names it too: the proposed questions swap "
                      "that word out.", ""]
    lines += [
        f"Format: LDKE pack v{config.pack_format_version}, {config.num_slots} edit slot(s), safetensors only.",
        "",
    ]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content)


# ---------------------------------------------------------------------- save / push


def save_edits(
    peft_model: Any,
    save_directory: str | os.PathLike,
    *,
    adapter_name: str = "default",
    repo_id: str | None = None,
    base_model: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    reports: Sequence[Any] | None = None,
) -> str:
    """Save one LDKE adapter as a flat pack folder (safetensors only) with our model card.

    ``base_model`` (a Hub id), when given, is also written as the config's
    ``base_model_name_or_path`` so ``AutoPeftModel`` can find the base. Returns the folder.

    The save is atomic (:func:`ldke_peft.tuner.io.atomic_dir`): the folder holds either the previous pack or
    the complete new one, whenever the process dies. Other files already in the folder are kept.
    """
    from .tuner.io import atomic_dir, stored_state_dict

    config = _config_of(peft_model, adapter_name)
    save_directory = os.fspath(save_directory)
    recorded = config.base_model_name_or_path
    card = model_card(
        peft_model, repo_id, adapter_name=adapter_name, base_model=base_model or recorded, metrics=metrics, reports=reports
    )
    with atomic_dir(save_directory) as stage, tempfile.TemporaryDirectory(prefix="ldke-save-") as tmp:
        # LDKE never touches embeddings: no embedding-layer check (which would look the base up on the Hub)
        peft_model.save_pretrained(tmp, selected_adapters=[adapter_name], safe_serialization=True,
                                   save_embedding_layers=False, state_dict=stored_state_dict(peft_model))
        # peft puts non-default adapters in a subfolder named after them
        src = tmp if adapter_name == "default" else os.path.join(tmp, adapter_name)
        for fname in PACK_FILES[:3] if has_edits_file(config) else PACK_FILES[:2]:
            path = os.path.join(src, fname)
            if not os.path.isfile(path):
                raise AdapterLoadError(f"saving adapter {adapter_name!r} did not produce {fname}")
            shutil.copyfile(path, os.path.join(stage, fname))
        if base_model:
            _set_base_model(stage, base_model)
        card.save(os.path.join(stage, "README.md"))
    return save_directory


def _set_base_model(folder: str, value: str | None) -> None:
    cfg_path = os.path.join(folder, "adapter_config.json")
    with open(cfg_path, encoding="utf-8") as fh:
        data = json.load(fh)
    data["base_model_name_or_path"] = value
    with open(cfg_path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)


def push_edits(
    peft_model: Any,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    adapter_name: str = "default",
    metrics: Mapping[str, Any] | None = None,
    endpoint: str | None = None,
    base_model: str | None = None,
    reports: Sequence[Any] | None = None,
    revision: str | None = None,
) -> str:
    """Upload an LDKE edit pack (safetensors + our model card) to a Hub repo; returns the commit URL.

    Creates the repo if needed (``exist_ok=True``) and uploads ``adapter_config.json``,
    ``adapter_model.safetensors`` and ``README.md`` in one commit. ``endpoint`` targets another Hub
    (a private deployment, or a local test server); ``token`` defaults to the logged-in user's.
    PEFT's ``push_to_hub`` is deliberately not used: it would replace the card with its own.
    """
    from huggingface_hub import HfApi

    if not _REPO_ID_RE.match(repo_id or ""):
        raise LDKEError(f"invalid Hub repo id {repo_id!r}; expected 'namespace/name'")
    config = _config_of(peft_model, adapter_name)
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or f"Upload LDKE edit pack ({config.num_slots} edit{'s' if config.num_slots != 1 else ''})"
    with tempfile.TemporaryDirectory(prefix="ldke-push-") as tmp:
        save_edits(peft_model, tmp, adapter_name=adapter_name, repo_id=repo_id, base_model=base_model,
                   metrics=metrics, reports=reports)
        if not base_model and not _is_repo_id(config.base_model_name_or_path):
            _set_base_model(tmp, None)  # do not publish a local filesystem path
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        logger.info("uploading LDKE pack to %s", url)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=message,
            repo_type="model",
            revision=revision,
            allow_patterns=list(PACK_FILES),
        )
    return str(info.commit_url)


# ---------------------------------------------------------------------- load


def load_edits(
    base_model: Any,
    repo_id_or_path: str | os.PathLike,
    revision: str | None = None,
    adapter_name: str = "default",
    *,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    local_files_only: bool | None = None,
    **kwargs: Any,
) -> Any:
    """Load an LDKE edit pack onto ``base_model`` from a local folder or a Hub repo id.

    For a repo id only the pack's files are fetched (into the Hugging Face cache; ``HF_HUB_OFFLINE=1``
    or ``local_files_only=True`` uses the cache alone). Then ``PeftModel.from_pretrained`` loads the
    local folder; ``kwargs`` go to it (e.g. ``is_trainable``).

    Raises:
        FingerprintMismatchError: the pack was made for another base model (``base_model`` untouched).
        CorruptAdapterError / UnsafeAdapterError: the pack's files are broken or unsafe (untouched).
        AdapterLoadError: the pack cannot be fetched (not found, offline cache miss, ...).
    """
    from peft import PeftModel

    from .tuner.peft_type import register

    register()  # idempotent: guarantees peft can resolve peft_type "LDKE" whatever happened since import
    source = os.fspath(repo_id_or_path)
    if os.path.isdir(source):
        folder = os.path.join(source, subfolder) if subfolder else source
        if revision is not None:
            logger.warning("revision=%r ignored: %s is a local folder", revision, source)
    elif _is_repo_id(source):
        folder = _download(source, revision, subfolder, cache_dir, token, endpoint, local_files_only)
    else:
        raise AdapterLoadError(f"{source!r} is neither a local pack folder nor a Hub repo id ('namespace/name')")
    logger.info("loading LDKE pack from %s", folder)
    return PeftModel.from_pretrained(base_model, folder, adapter_name=adapter_name, **kwargs)


def _download(repo_id: str, revision: str | None, subfolder: str | None, cache_dir: Any, token: str | None,
              endpoint: str | None, local_files_only: bool | None) -> str:
    import huggingface_hub
    from huggingface_hub import snapshot_download

    from .tuner.safety import _refuse_pickles

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    offline = bool(local_files_only) or huggingface_hub.constants.HF_HUB_OFFLINE
    if not offline:
        # The pack policy refuses a repo that ships pickle weights next to the pack, even though we
        # would never download them: say so before fetching anything.
        try:
            files = huggingface_hub.HfApi(endpoint=endpoint, token=token).list_repo_files(repo_id, revision=revision)
        except Exception as exc:  # noqa: BLE001 - the download below reports access problems clearly
            logger.debug("could not list files of %s: %s", repo_id, exc)
        else:
            _refuse_pickles([f for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]], f"Hub repo {repo_id!r}")
    try:
        root = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
            token=token,
            endpoint=endpoint,
            local_files_only=offline,
            allow_patterns=[prefix + f for f in PACK_FILES],
        )
    except Exception as exc:  # noqa: BLE001 - not found, auth, offline cache miss: one clear error type
        where = f"Hub repo {repo_id!r}" + (f" (revision {revision!r})" if revision else "")
        hint = " (offline: only the local Hugging Face cache was searched)" if offline else ""
        raise AdapterLoadError(f"cannot fetch the LDKE pack from {where}{hint}: {type(exc).__name__}: {exc}") from exc
    folder = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        raise AdapterLoadError(f"Hub repo {repo_id!r} has no adapter_config.json{' in ' + subfolder if subfolder else ''}")
    return folder
