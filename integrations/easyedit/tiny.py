"""Tiny random checkpoints saved where EasyEdit's ``MultimodalEditor`` finds them.

EasyEdit picks the model class from substrings of ``hparams.model_name`` (a path), so a tiny model
must be saved under a directory whose name carries the family's substring. Used by the tests and
by ``examples/easyedit_ldke.py --tiny`` to smoke-test an EasyEdit setup in seconds on CPU.
"""

from __future__ import annotations

import os

from ldke_peft.testing.tiny import tiny_model

__all__ = ["EASYEDIT_DIR_NAMES", "save_tiny_model"]

#: ``config.model_type`` -> a directory name EasyEdit's path detection accepts.
EASYEDIT_DIR_NAMES = {
    "qwen2_vl": "qwen2-vl-tiny",
    "llava_onevision": "llava-onevision-tiny",
    "qwen2_5_vl": "qwen2.5-vl-tiny",  # detected only after register(detect_qwen2_5_vl=True)
}


def save_tiny_model(model_type: str, parent: str | os.PathLike, seed: int = 0) -> str:
    """Save a tiny random ``(model, processor)`` of ``model_type`` under ``parent``; return its path."""
    if model_type not in EASYEDIT_DIR_NAMES:
        raise ValueError(
            f"no EasyEdit-detectable directory name for model_type {model_type!r}; "
            f"choose one of {', '.join(sorted(EASYEDIT_DIR_NAMES))}"
        )
    path = os.path.join(os.fspath(parent), EASYEDIT_DIR_NAMES[model_type])
    model, processor = tiny_model(model_type, seed=seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    _save_video_processor(model_type, path)
    return path


def _save_video_processor(model_type: str, path: str) -> None:
    """Add a default video-processor config where torchvision is installed.

    The tiny processors are image-only (their video processors need torchvision); EasyEdit loads
    the processor with ``AutoProcessor.from_pretrained``, which for Qwen-VL / LLaVA-OneVision also
    wants ``video_preprocessor_config.json``. EasyEdit needs torchvision anyway, so where it is
    missing there is nothing to do.
    """
    try:
        from transformers.models.auto import video_processing_auto as auto
    except ImportError:  # pragma: no cover - transformers without video processors
        return
    names = auto.VIDEO_PROCESSOR_MAPPING_NAMES.get(model_type)
    name = names.get("torchvision") if isinstance(names, dict) else names
    if not name:
        return
    try:
        video_processor = auto.video_processor_class_from_name(name)()
    except Exception:  # noqa: BLE001 - no torchvision: an image-only processor is all we can save
        return
    video_processor.save_pretrained(path)
