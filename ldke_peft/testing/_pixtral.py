"""A Pixtral-format processor that does not need torchvision.

``transformers.models.pixtral.processing_pixtral`` imports the torchvision image processor at module
level, so ``PixtralProcessor`` (Mistral 3, LightOnOCR) cannot even be imported without torchvision.
This class is a :class:`~transformers.ProcessorMixin` with the same constructor and the same
placeholder expansion (``PixtralProcessor.replace_image_token``: rows of ``[IMG]`` each closed by
``[IMG_BREAK]``, the last one by ``[IMG_END]``) around the real PIL ``PixtralImageProcessorPil``.
"""

from __future__ import annotations

from typing import Any

from transformers import ProcessorMixin

__all__ = ["PixtralImageOnlyProcessor"]


class PixtralImageOnlyProcessor(ProcessorMixin):
    """``PixtralProcessor`` without the torchvision import (see the module docstring)."""

    text_kwargs = {"return_tensors": "pt"}
    images_kwargs = {"return_tensors": "pt"}

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        patch_size: int = 16,
        spatial_merge_size: int = 1,
        chat_template: str | None = None,
        image_token: str = "[IMG]",
        image_break_token: str = "[IMG_BREAK]",
        image_end_token: str = "[IMG_END]",
        **kwargs: Any,
    ):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.patch_size = patch_size
        self.spatial_merge_size = spatial_merge_size
        self.image_token = image_token
        self.image_break_token = image_break_token
        self.image_end_token = image_end_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image_break_token_id = tokenizer.convert_tokens_to_ids(image_break_token)
        self.image_end_token_id = tokenizer.convert_tokens_to_ids(image_end_token)

    @property
    def image_token_ids(self) -> list[int]:
        return [self.image_token_id, self.image_break_token_id, self.image_end_token_id]

    def _process_images(self, images: Any, **images_kwargs: Any) -> Any:
        images_kwargs["patch_size"] = self.patch_size * self.spatial_merge_size
        return super()._process_images(images, **images_kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        patch = self.patch_size * self.spatial_merge_size
        height, width = image_inputs["image_sizes"][image_idx]
        row = [self.image_token] * (int(width) // patch) + [self.image_break_token]
        tokens = row * (int(height) // patch)
        tokens[-1] = self.image_end_token
        return "".join(tokens)

    @property
    def model_input_names(self) -> list[str]:
        return self.tokenizer.model_input_names + self.image_processor.model_input_names + ["image_sizes"]
