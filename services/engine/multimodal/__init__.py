"""Images for vision-language models: processing, the vision encoder, and what the engine consumes.

The vision side is separable from the language model: in a cluster it runs in encode workers and its
output (one embedding tensor per image) travels to the prefill worker. The pieces:

    processor.MultiModalProcessor   prompt text/ids + PIL images -> ProcessedPrompt (expanded token ids,
                                    one ImageItem per image with its pixels, M-RoPE positions)
    encoder.VisionEncoder           ImageItems -> [rows, lm_hidden] embeddings (vision tower + projector only)
    inputs.MultiModalInputs         what `LLMEngine.add_request(..., multi_modal=...)` takes: one
                                    MultiModalFeature (hash, offset, length, embeddings) per image,
                                    plus M-RoPE positions and delta
    mrope.compute_mrope_positions   M-RoPE positions from token ids and image grids alone
"""

from services.engine.multimodal.encoder import VisionEncoder
from services.engine.multimodal.inputs import MultiModalFeature, MultiModalInputs
from services.engine.multimodal.mrope import compute_mrope_positions
from services.engine.multimodal.processor import (
    ImageItem,
    MultiModalProcessor,
    ProcessedPrompt,
    image_content_hash,
)
from services.engine.multimodal.spec import VisionLanguageSpec

__all__ = [
    "ImageItem",
    "MultiModalFeature",
    "MultiModalInputs",
    "MultiModalProcessor",
    "ProcessedPrompt",
    "VisionEncoder",
    "VisionLanguageSpec",
    "compute_mrope_positions",
    "image_content_hash",
]
