"""Tiny random vision-language models in HF format, built locally for tests (no download).

    build_vlm_dir(dir, family)   config.json + model.safetensors + tokenizer (with the image special
                                 tokens and a chat template) + preprocessor_config.json
                                 (+ processor_config.json where transformers can build the processor)

Families (`VLM_FAMILIES`), each stressing one difference:

    llava-clip-llama     CLIP tower (a CLS token, cropped by the "default" strategy), feature layer -2,
                         Llama LM; 56 px crops of 14 px patches: 16 tokens an image
    llava-siglip-qwen2   SigLIP tower (no CLS, "full" strategy), features of layers [-2, -1] concatenated,
                         Qwen2 LM (q/k/v bias); 42 px: 9 tokens an image
    qwen2-vl             Qwen2-VL ViT + 2x2 patch merger, M-RoPE (mrope_section [2, 3, 3] of head_dim 16);
                         dynamic resolution: a 56x84 image is a 4x6 patch grid, 6 tokens
    qwen2.5-vl           Qwen2.5-VL ViT (RMSNorm, gated MLP, windowed attention with one full-attention
                         block), same M-RoPE

The language model is `default_model.TINY_CONFIG` (hidden 64, 2 layers, 4 query heads, 2 KV heads), so
the same engine paths run as for the text models. Qwen2-VL's processor class needs a video processor,
which transformers only builds with torchvision; these directories then hold the image processor and
the tokenizer (with its chat template) only, as many Hub checkpoints do.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image

from services.engine.default_model import (
    TINY_CONFIG,
    VOCAB_SIZE_MULTIPLE,
    _generation_config,
    _perturb_constant_params,
    _round_up,
    build_tokenizer,
)

LLAVA_IMAGE_TOKEN = "<image>"
QWEN_VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
PATCH_SIZE = 14

# ChatML; an image part renders as the model's placeholder string.
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] in ('image', 'image_url') -%}{{- 'PLACEHOLDER' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_TEXT_CONFIG: dict[str, Any] = {**TINY_CONFIG, "max_position_embeddings": 512}

# family -> (architecture, LM model_type, placeholder string)
VLM_FAMILIES: dict[str, tuple[str, str, str]] = {
    "llava-clip-llama": ("LlavaForConditionalGeneration", "llama", LLAVA_IMAGE_TOKEN),
    "llava-siglip-qwen2": ("LlavaForConditionalGeneration", "qwen2", LLAVA_IMAGE_TOKEN),
    "qwen2-vl": ("Qwen2VLForConditionalGeneration", "qwen2_vl", "<|vision_start|><|image_pad|><|vision_end|>"),
    "qwen2.5-vl": ("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl", "<|vision_start|><|image_pad|><|vision_end|>"),
}


def placeholder(family: str) -> str:
    return VLM_FAMILIES[family][2]


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------
# Tokenizer and processor


def _tokenizer(out_dir: Path, family: str) -> transformers.PreTrainedTokenizerBase:
    tokenizer = build_tokenizer(out_dir)
    special = [LLAVA_IMAGE_TOKEN] if family.startswith("llava") else list(QWEN_VISION_TOKENS)
    tokenizer.add_tokens(special, special_tokens=True)
    tokenizer.chat_template = _CHAT_TEMPLATE.replace("PLACEHOLDER", placeholder(family))
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    return tokenizer


def _image_processor(family: str, image_size: int) -> Any:
    if family == "llava-clip-llama":
        return transformers.CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    if family == "llava-siglip-qwen2":
        return transformers.SiglipImageProcessor(size={"height": image_size, "width": image_size})
    # Qwen: images between 2x2 and 8x8 patches (a patch grid is a multiple of the 2x2 merge)
    return transformers.Qwen2VLImageProcessor(
        min_pixels=28 * 28, max_pixels=112 * 112, patch_size=PATCH_SIZE, merge_size=2, temporal_patch_size=2
    )


# ----------------------------------------------------------------------------------------------
# Configs


def _text_config(model_type: str, tokenizer: transformers.PreTrainedTokenizerBase) -> dict[str, Any]:
    config = {
        **_TEXT_CONFIG,
        "vocab_size": _round_up(len(tokenizer), VOCAB_SIZE_MULTIPLE),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "model_type": model_type,
    }
    if model_type in ("qwen2", "mistral"):
        config.update(sliding_window=None, use_sliding_window=False)
    if model_type.startswith("qwen2") and model_type != "qwen2":  # Qwen2-VL LMs: head_dim = hidden / heads
        config.pop("head_dim")
        config.update(
            model_type=f"{model_type}_text",
            sliding_window=None,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        )
    return config


def _vision_config(family: str, image_size: int) -> dict[str, Any]:
    if family == "llava-clip-llama":
        return {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": PATCH_SIZE,
            "projection_dim": 32,
        }
    if family == "llava-siglip-qwen2":
        return {
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": PATCH_SIZE,
        }
    if family == "qwen2-vl":
        return {
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": _TEXT_CONFIG["hidden_size"],
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
    # Qwen2.5-VL: windows of 2x2 merged tokens (56 px); block 1 attends over the whole image
    return {
        "depth": 2,
        "hidden_size": 32,
        "out_hidden_size": _TEXT_CONFIG["hidden_size"],
        "intermediate_size": 48,
        "num_heads": 2,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }


def _model_config(
    family: str, tokenizer: transformers.PreTrainedTokenizerBase, image_size: int, overrides: dict[str, Any]
) -> transformers.PretrainedConfig:
    architecture, lm_type, _ = VLM_FAMILIES[family]
    text = _text_config(lm_type, tokenizer)
    vision = _vision_config(family, image_size)
    if family.startswith("llava"):
        siglip = family == "llava-siglip-qwen2"
        kwargs = {
            "text_config": text,
            "vision_config": vision,
            "image_token_index": tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
            "vision_feature_select_strategy": "full" if siglip else "default",
            "vision_feature_layer": [-2, -1] if siglip else -2,
            "projector_hidden_act": "gelu",
        }
        model_type = "llava"
    else:
        ids = tokenizer.convert_tokens_to_ids(list(QWEN_VISION_TOKENS))
        kwargs = {
            "text_config": text,
            "vision_config": vision,
            "vision_start_token_id": ids[0],
            "image_token_id": ids[1],
            "vision_end_token_id": ids[2],
            "video_token_id": ids[3],
        }
        model_type = lm_type
    kwargs.update(copy.deepcopy(overrides))
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    config.architectures = [architecture]
    return config


# ----------------------------------------------------------------------------------------------
# Directory


def build_vlm_dir(
    out_dir: str | os.PathLike, family: str, *, seed: int = 0, image_size: int | None = None, **config_overrides: Any
) -> Path:
    """Write a tiny random VLM of `family` into `out_dir` and return its path.

    `image_size` is the LLaVA tower's square input (default 56 for CLIP, 42 for SigLIP); Qwen models take
    any size. Weights depend only on `seed` and the config.
    """
    if family not in VLM_FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(VLM_FAMILIES)}")
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    image_size = image_size or (56 if family == "llava-clip-llama" else 42)
    tokenizer = _tokenizer(out_path, family)
    image_processor = _image_processor(family, image_size)
    image_processor.save_pretrained(out_path)
    if family.startswith("llava"):
        config = _model_config(family, tokenizer, image_size, config_overrides)
        processor = transformers.LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=PATCH_SIZE,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1 if family == "llava-clip-llama" else 0,
            chat_template=tokenizer.chat_template,
        )
        processor.save_pretrained(out_path)
    else:
        config = _model_config(family, tokenizer, image_size, config_overrides)
    model_class = getattr(transformers, VLM_FAMILIES[family][0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
        _perturb_constant_params(model)
    model.eval().generation_config = _generation_config(tokenizer)
    model.save_pretrained(out_path)
    return out_path
