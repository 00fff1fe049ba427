"""Where a vision-language checkpoint keeps its tensors: two key layouts, one rename per consumer.

The language model and the vision side are loaded by different processes (prefill/decode workers and
encode workers), so each reads only its own tensors. Checkpoints come in two layouts:

    part              in memory / newer saves              Hub (and what transformers 5 saves)
    language model    model.language_model.<x>             language_model.model.<x>   (LLaVA)
                                                           model.<x>                  (Qwen2-VL)
    LM head           lm_head.weight                       language_model.lm_head.weight (LLaVA)
    vision tower      model.vision_tower.<x>               vision_tower.<x>, vision_tower.vision_model.<x>
    projector         model.multi_modal_projector.<x>      multi_modal_projector.<x>
    Qwen ViT+merger   model.visual.<x>                     visual.<x>

`language_model_name` maps to the names `DecoderLM.load_weights` expects (`model.<x>`, `lm_head.weight`);
`vision_name` maps to the names of the encoder's modules (`vision_tower.<x>`, `multi_modal_projector.<x>`,
`visual.<x>`). transformers 5's CLIP and SigLIP towers dropped their `vision_model.` level, so it is
removed here too. Each returns None for a tensor the other side owns, so it is never read.
"""

from __future__ import annotations

VISION_MODULES = ("vision_tower.", "multi_modal_projector.", "visual.")

_LANGUAGE_MODEL_RENAMES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)


def language_model_name(name: str) -> str | None:
    """A checkpoint tensor's name for `DecoderLM.load_weights`, or None when it is not the LM's."""
    if _vision_module_key(name) is not None:
        return None
    for old, new in _LANGUAGE_MODEL_RENAMES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def vision_name(name: str) -> str | None:
    """A checkpoint tensor's name in the vision encoder's modules, or None when it is not the vision side's."""
    key = _vision_module_key(name)
    if key is None:
        return None
    return key.replace("vision_tower.vision_model.", "vision_tower.", 1)


def _vision_module_key(name: str) -> str | None:
    key = name.removeprefix("model.")
    return key if key.startswith(VISION_MODULES) else None
