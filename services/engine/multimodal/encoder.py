"""The vision side of a vision-language model: pixels -> embeddings in the language model's space.

It loads only the vision tower and the projector: the modules are transformers' own (exactness),
built from the config's `vision_config` on the target device without their random initialisation,
and filled from the checkpoint through `loader.iter_weights` with a rename that skips every language
model tensor unread (`checkpoint.vision_name`). An encode worker therefore never holds the LLM.

    llava     vision_tower(pixels, all hidden states) -> hidden_states[vision_feature_layer]
              (several layers: concatenated on the feature axis) -> drop the first row when the
              strategy is "default" -> multi_modal_projector         [num_images, rows, lm_hidden]
              Only encoder hidden states are read, so CLIP's post-layernorm and SigLIP's pooling
              head never reach the output: they are replaced by Identity and not loaded.
    qwen2_vl  visual(patches of all images, their grids) -> merged tokens   [sum of rows, lm_hidden]
              (the ViT attends within each image; Qwen2.5-VL within windows of one image)

`encode` batches every image of a call whose pixels share a shape (all of LLaVA's; Qwen's ViT takes
mixed sizes in one pass) and returns one `[rows, lm_hidden_size]` tensor per image, in order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import transformers
from torch import nn
from transformers.initialization import no_init_weights
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel,
)

from services.common.errors import ModelLoadError
from services.engine.models import default_dtype
from services.engine.models.checkpoint import vision_name
from services.engine.models.loader import iter_weights, read_model_config
from services.engine.multimodal.processor import ImageItem
from services.engine.multimodal.spec import VisionLanguageSpec

_QWEN_VISION_CLASSES = {
    "Qwen2VLForConditionalGeneration": Qwen2VisionTransformerPretrainedModel,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VisionTransformerPretrainedModel,
}
DUMMY_WEIGHT_RANGE = 0.02  # dummy weights: uniform in [-range, range]; norms at weight 1, bias 0


class LlavaVision(nn.Module):
    """CLIP/SigLIP tower + projector; forward mirrors transformers' `LlavaModel.get_image_features`."""

    # tower outputs past the encoder's hidden states; never read here
    UNUSED_TOWER_MODULES = ("post_layernorm", "head")

    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.vision_tower = transformers.AutoModel.from_config(config.vision_config, dtype=dtype)
        for name in self.UNUSED_TOWER_MODULES:
            if hasattr(self.vision_tower, name):
                setattr(self.vision_tower, name, nn.Identity())
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        layer = config.vision_feature_layer
        self.feature_layers = [layer] if isinstance(layer, int) else list(layer)
        self.drop_first_row = config.vision_feature_select_strategy == "default"

    def skips(self, name: str) -> bool:
        return any(name.startswith(f"vision_tower.{m}.") for m in self.UNUSED_TOWER_MODULES)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: [num_images, 3, H, W] -> [num_images, rows, lm_hidden_size]."""
        out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        selected = [out.hidden_states[i] for i in self.feature_layers]  # each [N, patches (+CLS), vision_hidden]
        if self.drop_first_row:
            selected = [h[:, 1:] for h in selected]
        return self.multi_modal_projector(torch.cat(selected, dim=-1))


class QwenVision(nn.Module):
    """Qwen2-VL / Qwen2.5-VL ViT with its patch merger."""

    def __init__(self, config: Any, vision_class: type[transformers.PreTrainedModel], dtype: torch.dtype) -> None:
        super().__init__()
        self.visual = vision_class._from_config(config.vision_config, dtype=dtype)

    def skips(self, name: str) -> bool:
        return False

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """patches: [sum of patches, patch_dim]; grid_thw: [num_images, 3] -> [sum of rows, lm_hidden_size]."""
        return self.visual(patches, grid_thw=grid_thw).pooler_output


class VisionEncoder:
    """Owns the vision modules on one device; `encode` is the only call, and it mutates nothing."""

    def __init__(
        self, spec: VisionLanguageSpec, modules: LlavaVision | QwenVision, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.spec = spec
        self.modules = modules
        self.device = device
        self.dtype = dtype

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        load_format: str = "auto",
        seed: int = 0,
    ) -> VisionEncoder:
        """Build the vision modules of `model_dir` and fill them (load_format "dummy": random weights)."""
        hf_config = read_model_config(model_dir)
        spec = VisionLanguageSpec.from_hf_config(hf_config)
        if spec is None:
            raise ModelLoadError(f"{model_dir}: {hf_config.architectures} has no vision tower")
        device = torch.device(device)
        with torch.device(device), default_dtype(dtype), no_init_weights():
            modules = _build_modules(spec, hf_config, dtype)
        with torch.no_grad():
            if load_format == "dummy":
                _init_dummy_weights(modules, seed)
            else:
                _load_weights(modules, iter_weights(model_dir, rename=_vision_rename(modules)))
        return cls(spec, modules.eval().requires_grad_(False), device, dtype)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.modules.parameters())

    @torch.inference_mode()
    def encode(self, items: Sequence[ImageItem]) -> list[torch.Tensor]:
        """One [length, lm_hidden_size] tensor per image, in the encoder's dtype, in order."""
        if not items:
            return []
        if isinstance(self.modules, QwenVision):
            return self._encode_qwen(items)
        return self._encode_llava(items)

    def _encode_llava(self, items: Sequence[ImageItem]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(items)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, item in enumerate(items):
            by_shape.setdefault(tuple(item.pixel_values.shape), []).append(index)
        for indices in by_shape.values():
            pixels = torch.stack([items[i].pixel_values for i in indices]).to(self.device, self.dtype)
            for i, rows in zip(indices, self.modules(pixels)):
                out[i] = self._checked(items[i], rows)
        return out  # type: ignore[return-value]

    def _encode_qwen(self, items: Sequence[ImageItem]) -> list[torch.Tensor]:
        patches = torch.cat([item.pixel_values for item in items]).to(self.device, self.dtype)
        grids = torch.tensor([item.image_grid_thw for item in items], dtype=torch.long, device=self.device)
        rows = self.modules(patches, grids)  # [sum of lengths, lm_hidden]
        return [self._checked(item, r) for item, r in zip(items, rows.split([i.length for i in items]))]

    @staticmethod
    def _checked(item: ImageItem, rows: torch.Tensor) -> torch.Tensor:
        if rows.shape[0] != item.length:
            raise ValueError(f"image {item.content_hash} yields {rows.shape[0]} rows for {item.length} placeholders")
        return rows


def num_vision_parameters(hf_config: Any) -> int:
    """Parameters an encoder of this vision-language config loads (tower + projector, the tower modules
    it never reads left out), counted on modules built on the meta device: nothing is allocated."""
    spec = VisionLanguageSpec.from_hf_config(hf_config)
    if spec is None:
        raise ModelLoadError(f"{hf_config.architectures} has no vision tower")
    with torch.device("meta"), no_init_weights():
        modules = _build_modules(spec, hf_config, torch.get_default_dtype())
    return sum(p.numel() for p in modules.parameters())


def _build_modules(spec: VisionLanguageSpec, hf_config: Any, dtype: torch.dtype) -> LlavaVision | QwenVision:
    """transformers' modules take the dtype explicitly: they would otherwise take the checkpoint's."""
    if spec.family == "llava":
        return LlavaVision(hf_config, dtype)
    return QwenVision(hf_config, _QWEN_VISION_CLASSES[spec.architecture], dtype)


def _vision_rename(modules: LlavaVision | QwenVision) -> Callable[[str], str | None]:
    def rename(name: str) -> str | None:
        new_name = vision_name(name)
        return None if new_name is None or modules.skips(new_name) else new_name

    return rename


def _load_weights(modules: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy every (name, tensor) into the modules' parameters; each parameter must be filled exactly once."""
    params = dict(modules.named_parameters())
    filled: set[str] = set()
    for name, tensor in weights:
        param = params.get(name)
        if param is None:
            raise ModelLoadError(f"checkpoint tensor {name!r} has no place in the vision encoder")
        if tuple(param.shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {tuple(param.shape)}"
            )
        param.copy_(tensor)
        filled.add(name)
    missing = sorted(set(params) - filled)
    if missing:
        raise ModelLoadError(f"checkpoint is missing {len(missing)} vision tensors, first: {missing[:3]}")


def _init_dummy_weights(modules: nn.Module, seed: int) -> None:
    generator = torch.Generator(device=next(modules.parameters()).device).manual_seed(seed)
    for module in modules.modules():
        is_norm = isinstance(module, nn.LayerNorm) or "RMSNorm" in type(module).__name__
        for name, param in module.named_parameters(recurse=False):
            if is_norm:
                param.fill_(1.0 if name == "weight" else 0.0)
            else:
                param.uniform_(-DUMMY_WEIGHT_RANGE, DUMMY_WEIGHT_RANGE, generator=generator)
