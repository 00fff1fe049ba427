"""Fused elementwise ops (Triton) on a GPU: Llama-3.1-8B shapes in bf16, and CUDA-graph replay.

hidden 4096, 32 query heads, 8 kv heads, head_dim 128, intermediate 14336, Llama-3 rope tables;
T = 1 (decode), 64 and 4096 (prefill). The checks are the unit tests' own.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("triton")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from services.engine.ops import TORCH_OPS, TRITON_OPS, Ops  # noqa: E402
from tests.unit.test_ops import (  # noqa: E402
    EPS,
    assert_matches,
    check_add_rms_norm,
    check_mrope_rotary,
    check_rms_norm_heads,
    check_rotary,
    check_silu_and_mul,
    randn,
    rotary_embedding,
    shuffled_positions,
    split_qkv,
)

HIDDEN, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, INTERMEDIATE = 4096, 32, 8, 128, 14336
MAX_POSITIONS = 8192
LLAMA3_ROPE: dict[str, Any] = {
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
TOKEN_COUNTS = [1, 64, 4096]
BF16 = torch.bfloat16


@pytest.mark.parametrize("has_residual", [True, False])
@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
def test_add_rms_norm_bf16(num_tokens, has_residual):
    check_add_rms_norm(num_tokens, HIDDEN, BF16, has_residual, device="cuda", seed=num_tokens)


@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
def test_rms_norm_heads_bf16(num_tokens):
    check_rms_norm_heads(num_tokens, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BF16, device="cuda", seed=num_tokens)


@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
def test_rotary_bf16(num_tokens):
    check_rotary(
        num_tokens,
        NUM_Q_HEADS,
        NUM_KV_HEADS,
        HEAD_DIM,
        BF16,
        MAX_POSITIONS,
        device="cuda",
        seed=num_tokens,
        **LLAMA3_ROPE,
    )


@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
def test_silu_and_mul_bf16(num_tokens):
    check_silu_and_mul(num_tokens, INTERMEDIATE, BF16, device="cuda", seed=num_tokens)


@pytest.mark.parametrize("hidden_size", [5120, 8192, 16384])
def test_other_hidden_sizes_bf16(hidden_size):
    check_add_rms_norm(64, hidden_size, BF16, has_residual=True, device="cuda")


@pytest.mark.parametrize("head_dim", [64, 80, 96, 256])
def test_other_head_dims_bf16(head_dim):
    check_rms_norm_heads(64, 16, 4, head_dim, BF16, device="cuda")
    check_rotary(64, 16, 4, head_dim, BF16, MAX_POSITIONS, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes(dtype):
    check_add_rms_norm(64, HIDDEN, dtype, has_residual=True, device="cuda")
    check_rms_norm_heads(64, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, dtype, device="cuda")
    check_rotary(64, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, dtype, MAX_POSITIONS, device="cuda", **LLAMA3_ROPE)
    check_silu_and_mul(64, INTERMEDIATE, dtype, device="cuda")


# ---------------------------------------------------------------------------------- CUDA graphs


def layer_inputs(num_tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """One layer's elementwise inputs: a split qkv projection, the residual stream, gate|up."""
    generator = torch.Generator().manual_seed(seed)
    inputs = split_qkv(num_tokens, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BF16, generator, "cuda")
    inputs["x"] = randn((num_tokens, HIDDEN), BF16, generator, "cuda")
    inputs["residual"] = randn((num_tokens, HIDDEN), BF16, generator, "cuda", scale=4.0)
    inputs["gate_up"] = randn((num_tokens, 2 * INTERMEDIATE), BF16, generator, "cuda", scale=3.0)
    inputs["positions"] = shuffled_positions(num_tokens, MAX_POSITIONS, generator, "cuda")
    return inputs


def run_layer_ops(
    ops: Ops, inputs: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], cos: torch.Tensor, sin: torch.Tensor
) -> dict[str, torch.Tensor]:
    normed, new_residual = ops.add_rms_norm(inputs["x"], inputs["residual"], weights["hidden"], EPS)
    q_normed = ops.rms_norm_heads(inputs["q"], weights["head"], EPS)  # reads q before rotary
    q, k = ops.rotary(inputs["q"], inputs["k"], cos, sin, inputs["positions"])
    activated = ops.silu_and_mul(inputs["gate_up"])
    return {
        "normed": normed,
        "new_residual": new_residual,
        "q_normed": q_normed,
        "q": q,
        "k": k,
        "activated": activated,
    }


@pytest.mark.parametrize("num_tokens", [1, 64])
def test_cuda_graph_replay_with_new_inputs(num_tokens):
    generator = torch.Generator().manual_seed(100)
    weights = {
        "hidden": 1.0 + randn((HIDDEN,), BF16, generator, "cuda", scale=0.1),
        "head": 1.0 + randn((HEAD_DIM,), BF16, generator, "cuda", scale=0.1),
    }
    rotary = rotary_embedding(HEAD_DIM, MAX_POSITIONS, BF16, "cuda", **LLAMA3_ROPE)
    static = layer_inputs(num_tokens, seed=0)

    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):
        run_layer_ops(TRITON_OPS, static, weights, rotary.cos, rotary.sin)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run_layer_ops(TRITON_OPS, static, weights, rotary.cos, rotary.sin)

    for replay_seed in (1, 2):
        fresh = layer_inputs(num_tokens, seed=replay_seed)
        for name in ("qkv", "x", "residual", "gate_up", "positions"):
            static[name].copy_(fresh[name])  # q, k, v are views of qkv
        graph.replay()
        torch.cuda.synchronize()
        expected = run_layer_ops(TORCH_OPS, fresh, weights, rotary.cos, rotary.sin)
        for name in ("new_residual", "q", "k"):
            assert torch.equal(outputs[name], expected[name]), name
        for name in ("normed", "q_normed", "activated"):
            assert_matches(outputs[name], expected[name])


@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
def test_mrope_rotary_bf16(num_tokens):
    """Qwen2-VL-7B shapes: 28 query heads, 4 KV heads, head_dim 128, mrope_section (16, 24, 24)."""
    check_mrope_rotary(num_tokens, 28, 4, HEAD_DIM, (16, 24, 24), BF16, MAX_POSITIONS, device="cuda", seed=num_tokens)
