"""Video-free processors: the real processor classes built without a (torchvision-only) video processor.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

from typing import Any

__all__ = ["image_only_processor"]

_IMAGE_ONLY_CLASSES: dict[type, type] = {}


def image_only_processor(processor_cls: type, **components: Any) -> Any:
    """Build a real ``processor_cls`` (e.g. ``Qwen2VLProcessor``) without its video processor.

    Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL and SmolVLM processors declare a ``video_processor`` whose every
    implementation needs torchvision, and ``ProcessorMixin`` refuses ``video_processor=None`` (its
    type check itself imports the video-processor registry, which needs torchvision). Image
    editing never touches video, so we subclass the processor with an ``__init__`` whose signature
    lacks ``video_processor``: ``ProcessorMixin`` derives a processor's sub-components from that
    signature, so the subclass holds only an image processor and a tokenizer. Everything else --
    placeholder expansion, ``mm_token_type_ids``, chat templates -- is the real class's code,
    unchanged. The subclass keeps the original class name, so a processor saved from it loads as
    the full processor wherever torchvision is installed.
    """
    sub = _IMAGE_ONLY_CLASSES.get(processor_cls)
    if sub is None:
        sub = type(
            processor_cls.__name__,
            (processor_cls,),
            {
                "__init__": _init_without_video(processor_cls),
                "__module__": processor_cls.__module__,
                "__doc__": image_only_processor.__doc__,
            },
        )
        _IMAGE_ONLY_CLASSES[processor_cls] = sub
    return sub(**components)


_UNSET: Any = object()


def _init_without_video(processor_cls: type) -> Any:
    """``processor_cls.__init__`` minus its ``video_processor`` parameter.

    ``ProcessorMixin`` reads a processor's sub-components from ``__init__``'s signature and
    ``from_pretrained`` passes only the arguments ``__init__``'s *code object* names
    (``chat_template``, ``num_image_tokens``, ...), so a bare ``**kwargs`` would drop them on reload.
    The wrapper names every non-video parameter of the video-capable processors we support
    explicitly and forwards only those the caller set; it refuses classes with parameters it does
    not know (no code is generated at run time)."""
    import inspect

    base_init = processor_cls.__init__
    params = [n for n in inspect.signature(base_init).parameters if n not in ("self", "video_processor", "kwargs")]
    unknown = set(params) - set(_KNOWN_PROCESSOR_PARAMS)
    if unknown:
        raise TypeError(f"{processor_cls.__name__}.__init__ has parameters image_only_processor cannot forward: {sorted(unknown)}")

    def __init__(
        self,
        image_processor=_UNSET,
        tokenizer=_UNSET,
        num_image_tokens=_UNSET,
        vision_feature_select_strategy=_UNSET,
        chat_template=_UNSET,
        image_token=_UNSET,
        video_token=_UNSET,
        vision_aspect_ratio=_UNSET,
        image_seq_length=_UNSET,
        image_seq_len=_UNSET,
        **kwargs: Any,
    ) -> None:
        given = {k: v for k, v in locals().items() if k in params and v is not _UNSET}
        base_init(self, video_processor=None, **given, **kwargs)

    return __init__


_KNOWN_PROCESSOR_PARAMS = (
    "image_processor",
    "tokenizer",
    "num_image_tokens",
    "vision_feature_select_strategy",
    "chat_template",
    "image_token",
    "video_token",
    "vision_aspect_ratio",
    "image_seq_length",
    "image_seq_len",
)
