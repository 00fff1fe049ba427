"""Shared test setup.

Without a GPU, Triton kernels run under Triton's interpreter so the fast paths are still checked
against the plain-torch reference on CPU. The variable must be set before any kernel is defined.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest

from services.engine.default_model import build_model_dir, build_tokenizer
from tests.vlm_models import VLM_FAMILIES, build_vlm_dir


def _let_the_interpreter_loop_to_loaded_bounds() -> None:
    """A kernel loop `range(0, n)` with `n` loaded from memory: compiled Triton runs it, but the
    interpreter turns `n` into a Python int through `int(array)`, which numpy 2 refuses for its
    one-element arrays. Take the element instead (interpreter only; compiled kernels are untouched)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


_let_the_interpreter_loop_to_loaded_bounds()

# Tiny random models of every supported family, each stressing one difference between them.
TINY_MODEL_VARIANTS = {
    "llama": (
        "LlamaForCausalLM",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "llama-mha-tied": ("LlamaForCausalLM", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "qwen2-mqa": ("Qwen2ForCausalLM", {"num_key_value_heads": 1}),
    "qwen3": ("Qwen3ForCausalLM", {}),
    "mistral": ("MistralForCausalLM", {"sliding_window": None}),
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tokenizer_dir):
    """name -> directory of a tiny random model (built once per test session)."""
    root = tmp_path_factory.mktemp("models")
    return {
        name: str(build_model_dir(root / name, arch, tokenizer_dir=tokenizer_dir, **overrides))
        for name, (arch, overrides) in TINY_MODEL_VARIANTS.items()
    }


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dirs):
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def vlm_dirs(tmp_path_factory):
    """family -> directory of a tiny random vision-language model (tests/vlm_models.py)."""
    root = tmp_path_factory.mktemp("vlms")
    return {family: str(build_vlm_dir(root / family, family)) for family in VLM_FAMILIES}
