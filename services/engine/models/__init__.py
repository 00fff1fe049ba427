"""Model registry and loading: HF architecture name -> our implementation, weights streamed in."""

from __future__ import annotations

import contextlib
import os

import torch

from services.common.errors import ModelLoadError
from services.engine.models.checkpoint import language_model_name
from services.engine.models.llama import DecoderLM, DecoderSpec
from services.engine.models.loader import (
    ALL_ARCHITECTURES,
    VISION_LANGUAGE_ARCHITECTURES,
    iter_weights,
)
from services.engine.ops import get_ops

# Every supported architecture is a Llama-family decoder; their differences live in DecoderSpec. A
# vision-language model's decoder is its language model (the vision side: services.engine.multimodal).
MODEL_CLASSES: dict[str, type[DecoderLM]] = {arch: DecoderLM for arch in ALL_ARCHITECTURES}


def load_model(
    model_dir: str | os.PathLike,
    hf_config,
    device: torch.device,
    dtype: torch.dtype,
    load_format: str = "auto",
    seed: int = 0,
    ops: str = "torch",
) -> DecoderLM:
    """Build the model on the meta device, materialise it on `device`, then fill its weights.

    Weights stream one checkpoint shard at a time straight into the parameters, so host memory
    never holds a second copy of the model. Of a vision-language checkpoint only the language
    model's tensors are read.
    """
    arch = hf_config.architectures[0]
    if arch not in MODEL_CLASSES:
        raise ModelLoadError(f"architecture {arch!r} is not supported; supported: {sorted(MODEL_CLASSES)}")
    spec = DecoderSpec.from_hf_config(hf_config)
    with torch.device("meta"), default_dtype(dtype):
        model = MODEL_CLASSES[arch](spec, get_ops(ops))
    model = model.to_empty(device=device)
    if load_format == "dummy":
        model.init_dummy_weights(seed)
    else:
        with torch.no_grad():
            rename = language_model_name if arch in VISION_LANGUAGE_ARCHITECTURES else None
            model.load_weights(iter_weights(model_dir, rename=rename))
    model.init_rotary()
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """torch's default dtype set to `dtype` inside the block (modules built there get it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
