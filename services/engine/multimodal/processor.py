"""Prompt + images -> expanded token ids and per-image pixel inputs, with the model's own processors.

A prompt spells each image once with the model's placeholder (as in vLLM):

    LLaVA      "USER: <image>\\nWhat is this? ASSISTANT:"
    Qwen2-VL   "<|vision_start|><|image_pad|><|vision_end|>What is this?"

Processing, per prompt:
  1. the model's image processor (transformers' AutoImageProcessor) turns each image into pixel inputs:
     LLaVA `pixel_values` [3, H, W]; Qwen2-VL flattened patches [num_patches, C * 2 * 14 * 14] and its
     patch grid `image_grid_thw` (t, h, w);
  2. the model's tokenizer encodes the text; each image token (`<image>`, `<|image_pad|>`) is then
     repeated to the number of embedding rows its image yields:
         LLaVA     (image_size / patch_size)^2, +1 for CLIP's CLS row, -1 when the "default"
                   feature strategy drops the first row
         Qwen2-VL  grid t * h * w / spatial_merge_size^2
     Expanding the token ids equals expanding the text first, as transformers' processors do: the
     image token is a special token, matched whole, so its neighbours tokenize the same either way;
  3. each image gets its placeholder run (offset, length), its content hash, and for Qwen2-VL the
     prompt's M-RoPE positions are computed (`mrope.compute_mrope_positions`).

Why not transformers' AutoProcessor itself: Qwen2-VL's processor class insists on a video processor,
which transformers builds only with torchvision (not a dependency here). The processor's work for
images is exactly steps 1-2, with the model's own image processor, tokenizer and chat template; the
token counts come from the model config, the ground truth of how many rows the tower produces.

Content hashes: the caller's when given (the gateway hashes the encoded bytes), else BLAKE2b-128 over
the image's size and RGB bytes (`image_content_hash`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image

# not `transformers.AutoImageProcessor`: transformers' lazy top-level name demands torchvision, the
# module's own class falls back to the PIL backends
from transformers.models.auto.image_processing_auto import AutoImageProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from services.common.errors import InvalidRequestError, ModelLoadError
from services.common.images import DRAFT_SCALES, draft_size
from services.engine.models.loader import read_model_config
from services.engine.multimodal.inputs import (
    PARAM,
    MultiModalFeature,
    MultiModalInputs,
    find_placeholder_runs,
)
from services.engine.multimodal.mrope import (
    GridTHW,
    compute_mrope_positions,
    num_merged_tokens,
)
from services.engine.multimodal.spec import VisionLanguageSpec

# the fields of an image processor's `size` that choose how it resizes (transformers' image_processing_backends)
_SIZE_FIELDS = ("shortest_edge", "longest_edge", "height", "width", "max_height", "max_width")
# LLaVA towers whose output starts with a CLS row (SigLIP has none)
_TOWERS_WITH_CLS = {"clip_vision_model": True, "siglip_vision_model": False}


def image_content_hash(image: Image.Image) -> str:
    """BLAKE2b-128 hex of the image's size and RGB pixels: equal images, equal hashes, on every host."""
    rgb = image.convert("RGB")
    digest = hashlib.blake2b(struct.pack("<II", rgb.width, rgb.height), digest_size=16)
    digest.update(rgb.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ImageItem:
    """One image of a processed prompt: where its placeholder run is and the pixels the encoder takes."""

    content_hash: str
    offset: int  # first placeholder token in the prompt's token ids
    length: int  # placeholder tokens = embedding rows the encoder yields
    pixel_values: torch.Tensor  # LLaVA [3, H, W]; Qwen2-VL [num_patches, patch_dim]
    image_grid_thw: GridTHW | None = None  # Qwen2-VL patch grid (before merging); None for LLaVA


@dataclass(frozen=True)
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]  # placeholders expanded
    images: tuple[ImageItem, ...]
    mrope_positions: torch.Tensor | None = None  # [3, num_tokens] int64 (Qwen2-VL); None for LLaVA
    mrope_delta: int = 0

    def to_inputs(self, embeddings: Sequence[torch.Tensor]) -> MultiModalInputs:
        """The engine's view, given each image's embeddings ([length, lm_hidden_size], in order)."""
        if len(embeddings) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(embeddings)} embeddings")
        features = tuple(
            MultiModalFeature(item.content_hash, item.offset, item.length, rows)
            for item, rows in zip(self.images, embeddings)
        )
        return MultiModalInputs(features, self.mrope_positions, self.mrope_delta)


class MultiModalProcessor:
    """Owns the model's tokenizer and image processor; stateless per call, safe to share."""

    def __init__(
        self,
        spec: VisionLanguageSpec,
        hf_config: Any,
        tokenizer: Any,
        image_processor: Any,
        chat_template: str | None = None,
    ) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self._vision_config = hf_config.vision_config
        if spec.family == "llava":
            self._llava_tokens_per_image = _llava_tokens_per_image(hf_config)

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike) -> MultiModalProcessor:
        hf_config = read_model_config(model_dir)
        spec = VisionLanguageSpec.from_hf_config(hf_config)
        if spec is None:
            raise ModelLoadError(f"{model_dir}: {hf_config.architectures} is not a vision-language model")
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        try:
            image_processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{model_dir}: no usable image processor (preprocessor_config.json): {e}") from e
        template = tokenizer.chat_template or _processor_chat_template(Path(model_dir))
        return cls(spec, hf_config, tokenizer, image_processor, template)

    @property
    def image_placeholder(self) -> str:
        """What a prompt writes once per image."""
        return "".join(self.tokenizer.convert_ids_to_tokens(list(self.spec.placeholder_token_ids)))

    def num_image_tokens(self, width: int, height: int) -> int:
        """Placeholder tokens an image of this size expands to, computed from the size alone."""
        if self.spec.family == "llava":
            return self._llava_tokens_per_image  # the image processor resizes every image to the tower's size
        # the patch grid the image processor's resize gives (a multiple of the merge size on each side)
        num_patches = self.image_processor.get_number_of_image_patches(height, width, {})
        return num_patches // self.spec.spatial_merge_size**2

    def image_grid(self, width: int, height: int) -> GridTHW | None:
        """The patch grid (t, h, w) the image processor gives an image of this size (Qwen2-VL), from the
        size alone; None for LLaVA, whose images all resize to the tower's square."""
        if not self.spec.uses_mrope:
            return None
        patch_size = self.image_processor.patch_size
        resized_width, resized_height = self._dynamic_resize(width, height)
        return (1, resized_height // patch_size, resized_width // patch_size)  # one frame: a still image

    def resize_target(self, width: int, height: int) -> tuple[int, int] | None:
        """The size (width, height) the image processor resizes an image of this size to, before any crop,
        computed as the processor computes it; None when it keeps the image's size or resizes in a way not
        modelled here.

            Qwen2-VL        smart_resize: each side a multiple of patch * merge, pixels in [min, max]
            CLIP (LLaVA)    the short side to size.shortest_edge, the long side int(scaled), then a crop
            SigLIP (LLaVA)  a fixed size.height x size.width
        """
        processor = self.image_processor
        if not getattr(processor, "do_resize", False):
            return None
        if self.spec.uses_mrope:
            return self._dynamic_resize(width, height)
        size = {name: processor.size.get(name) for name in _SIZE_FIELDS}  # a SizeDict, or a plain dict
        given = {name for name, value in size.items() if value}
        if given == {"shortest_edge"}:  # as transformers' get_resize_output_image_size computes it
            short, long = sorted((width, height))
            new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
            return (new_short, new_long) if width <= height else (new_long, new_short)
        if given == {"height", "width"}:
            return size["width"], size["height"]
        return None

    def draft_scale(self, width: int, height: int) -> int:
        """The largest JPEG draft reduction (services.common.images.DRAFT_SCALES) an image of this declared
        size may be decoded at, or 1: the reduced image must stay at least as large as what the processor
        resizes it to, in both sides, and for dynamic resolution (Qwen2-VL) resize to that same size, so
        its patch grid (the ImageRef the gateway computed from the declared size) is unchanged."""
        try:
            target = self.resize_target(width, height)
            for scale in DRAFT_SCALES:
                reduced = draft_size(width, height, scale)
                if target is None or reduced[0] < target[0] or reduced[1] < target[1]:
                    continue
                if not self.spec.uses_mrope or self.resize_target(*reduced) == target:
                    return scale
        except ValueError:  # smart_resize refuses the aspect ratio: left to the processor to refuse
            pass
        return 1

    def layout(
        self, prompt_token_ids: Sequence[int], image_sizes: Sequence[tuple[int, int]]
    ) -> tuple[list[int], list[tuple[int, int, GridTHW | None]]]:
        """What `process` gives, from image sizes (width, height) alone, without pixels: the expanded token
        ids, and each image's (offset, length, grid). A gateway uses it; encoders do the pixels.

        Raises InvalidRequestError when the placeholders and images disagree in number.
        """
        token_ids = list(prompt_token_ids)
        self._check_placeholders(token_ids, len(image_sizes))
        grids = [self.image_grid(width, height) for width, height in image_sizes]
        lengths = [
            num_merged_tokens(grid, self.spec.spatial_merge_size) if grid is not None else self._llava_tokens_per_image
            for grid in grids
        ]
        expanded = _expand(token_ids, self.spec.image_token_id, lengths)
        runs = find_placeholder_runs(expanded, self.spec.image_token_id, lengths)
        return expanded, [(offset, length, grid) for (offset, length), grid in zip(runs, grids)]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation; image content parts become the model's placeholder."""
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def process(
        self, prompt: str | Sequence[int], images: Sequence[Image.Image], content_hashes: Sequence[str] | None = None
    ) -> ProcessedPrompt:
        """Expand a prompt (text, or token ids) holding one image token per image, in order.

        Raises InvalidRequestError when the placeholders, images and content hashes disagree in number.
        """
        if content_hashes is not None and len(content_hashes) != len(images):
            raise InvalidRequestError(f"{len(images)} images but {len(content_hashes)} content hashes", param=PARAM)
        text = prompt if isinstance(prompt, str) else None
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_placeholders(token_ids, len(images))
        pixels, grids = self.pixel_inputs(images)
        lengths = [self._num_rows(pixel_values, grid) for pixel_values, grid in zip(pixels, grids)]
        expanded = _expand(token_ids, self.spec.image_token_id, lengths)
        runs = find_placeholder_runs(expanded, self.spec.image_token_id, lengths)
        hashes = content_hashes or [image_content_hash(image) for image in images]
        items = tuple(
            ImageItem(h, offset, length, pixel_values, grid)
            for h, (offset, length), pixel_values, grid in zip(hashes, runs, pixels, grids)
        )
        if not self.spec.uses_mrope:
            return ProcessedPrompt(text, expanded, items)
        positions, delta = compute_mrope_positions(
            expanded,
            [g for g in grids if g is not None],
            image_token_id=self.spec.image_token_id,
            spatial_merge_size=self.spec.spatial_merge_size,
        )
        return ProcessedPrompt(text, expanded, items, positions, delta)

    # ------------------------------------------------------------------ internals

    def _dynamic_resize(self, width: int, height: int) -> tuple[int, int]:
        """Qwen2-VL's resize of an image of this size (width, height): its processor's smart_resize."""
        processor = self.image_processor
        resized_height, resized_width = smart_resize(
            height,
            width,
            processor.patch_size * processor.merge_size,
            min_pixels=processor.size["shortest_edge"],
            max_pixels=processor.size["longest_edge"],
        )
        return resized_width, resized_height

    def pixel_inputs(self, images: Sequence[Image.Image]) -> tuple[list[torch.Tensor], list[GridTHW | None]]:
        """Per image: its pixel tensor, and its patch grid (Qwen2-VL) or None."""
        if not images:
            return [], []
        out = self.image_processor(images=list(images), return_tensors="pt")
        if self.spec.family == "llava":
            return list(out["pixel_values"]), [None] * len(images)
        grids: list[GridTHW] = [(t, h, w) for t, h, w in out["image_grid_thw"].tolist()]
        patches = torch.split(out["pixel_values"], [t * h * w for t, h, w in grids])
        return list(patches), list(grids)

    def _num_rows(self, pixel_values: torch.Tensor, grid: GridTHW | None) -> int:
        """Embedding rows (= placeholder tokens) the encoder yields for these pixels."""
        if grid is not None:
            return num_merged_tokens(grid, self.spec.spatial_merge_size)
        tower_size = self._vision_config.image_size
        if tuple(pixel_values.shape[-2:]) != (tower_size, tower_size):
            raise ModelLoadError(
                f"the image processor yields {tuple(pixel_values.shape[-2:])} pixels but the "
                f"vision tower takes {tower_size}x{tower_size}"
            )
        return self._llava_tokens_per_image

    def _check_placeholders(self, token_ids: list[int], num_images: int) -> None:
        num_placeholders = token_ids.count(self.spec.image_token_id)
        if num_placeholders != num_images:
            raise InvalidRequestError(
                f"the prompt has {num_placeholders} image placeholder(s) ({self.image_placeholder!r}) but "
                f"{num_images} image(s) were given",
                param=PARAM,
            )


def _expand(token_ids: list[int], image_token_id: int, lengths: list[int]) -> list[int]:
    """Each image token (one per image, in order) repeated to its image's length."""
    expanded: list[int] = []
    remaining = iter(lengths)
    for token_id in token_ids:
        expanded.extend([token_id] * next(remaining) if token_id == image_token_id else [token_id])
    return expanded


def _llava_tokens_per_image(hf_config: Any) -> int:
    vision = hf_config.vision_config
    if vision.model_type not in _TOWERS_WITH_CLS:
        raise ModelLoadError(
            f"LLaVA vision tower {vision.model_type!r} is not supported (supported: {', '.join(_TOWERS_WITH_CLS)})"
        )
    num_rows = (vision.image_size // vision.patch_size) ** 2 + _TOWERS_WITH_CLS[vision.model_type]
    if hf_config.vision_feature_select_strategy == "default":
        num_rows -= 1  # the first row (CLS for CLIP) is dropped
    return num_rows


def _processor_chat_template(model_dir: Path) -> str | None:
    """Older processors keep their template in chat_template.json instead of the tokenizer's config."""
    path = model_dir / "chat_template.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("chat_template")
