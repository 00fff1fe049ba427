"""What the engine, the processor and the encoder need to know about a vision-language model.

Resolved once from the HF config. Families:

    llava     LlavaForConditionalGeneration: CLIP or SigLIP tower -> MLP projector -> Llama/Qwen2/Mistral.
              Each image becomes a fixed number of `<image>` tokens (one per selected feature row).
    qwen2_vl  Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration: a ViT over a
              dynamic-resolution patch grid, 2x2 patches merged into one token; prompts spell an
              image `<|vision_start|><|image_pad|><|vision_end|>` and the LM uses M-RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.common.errors import ModelLoadError
from services.engine.models.loader import VISION_LANGUAGE_ARCHITECTURES

FAMILIES = {
    "LlavaForConditionalGeneration": "llava",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_vl",
}
assert set(FAMILIES) == set(VISION_LANGUAGE_ARCHITECTURES)


@dataclass(frozen=True)
class VisionLanguageSpec:
    architecture: str
    family: str  # "llava" or "qwen2_vl"
    image_token_id: int  # the placeholder token an image's embedding rows replace
    # the tokens a prompt writes once per image (the image token among them is expanded):
    # (image,) for LLaVA, (vision_start, image, vision_end) for Qwen2-VL
    placeholder_token_ids: tuple[int, ...]
    spatial_merge_size: int  # patches merged into one token along each side (1: LLaVA)
    uses_mrope: bool

    @classmethod
    def from_hf_config(cls, config: Any) -> VisionLanguageSpec | None:
        """None for a text-only model."""
        architecture = (getattr(config, "architectures", None) or [""])[0]
        family = FAMILIES.get(architecture)
        if family is None:
            return None
        image_token_id = _image_token_id(config)
        if family == "llava":
            return cls(architecture, family, image_token_id, (image_token_id,), 1, uses_mrope=False)
        placeholder = (config.vision_start_token_id, image_token_id, config.vision_end_token_id)
        return cls(
            architecture, family, image_token_id, placeholder, config.vision_config.spatial_merge_size, uses_mrope=True
        )


def _image_token_id(config: Any) -> int:
    # LLaVA configs name it image_token_index (transformers aliases image_token_id to it)
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ModelLoadError("config.json names no image token (image_token_id / image_token_index)")
