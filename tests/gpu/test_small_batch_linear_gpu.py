"""The skinny matrix product on a GPU: Llama-3.1-8B shapes in bf16 against the exact sum, CUDA-graph
replay, and greedy decoding through the engine with it and with F.linear.

Shapes (out_features x in_features): qkv 6144 x 4096, o 4096 x 4096, gate_up 28672 x 4096, down
4096 x 14336, logits 128256 x 4096; the launch table's configs. The numerics check is the unit
tests' own (`assert_near_exact`): float32 summation slack plus one unit of the output dtype.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from services.engine import LLM, SamplingParams  # noqa: E402
from services.engine.small_batch_linear import linear, supports  # noqa: E402
from tests.unit.test_small_batch_linear import (  # noqa: E402
    CONFIGS,
    SUM_SLACK,
    assert_near_exact,
    check_linear,
    make_inputs,
)

LLAMA_31_8B_SHAPES = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "logits": (128256, 4096),
}
ROWS = [1, 2, 3, 8, 13, 16]


@pytest.mark.parametrize("num_rows", ROWS)
@pytest.mark.parametrize("shape", sorted(LLAMA_31_8B_SHAPES))
def test_llama_shapes_bf16(shape, num_rows):
    out_features, in_features = LLAMA_31_8B_SHAPES[shape]
    check_linear(num_rows, out_features, in_features, torch.bfloat16, has_bias=False, device="cuda", seed=num_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_qkv_with_bias_in_every_dtype(dtype):
    """Qwen2's q/k/v bias, added in float32 before the one rounding."""
    check_linear(4, 6144, 4096, dtype, has_bias=True, device="cuda")


@pytest.mark.parametrize("num_rows", [1, 16])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_every_variant_at_a_real_shape(config, num_rows):
    check_linear(num_rows, 4096, 14336, torch.bfloat16, has_bias=False, config=CONFIGS[config], device="cuda")


@pytest.mark.parametrize("num_rows", [1, 16])
def test_agrees_with_f_linear(num_rows):
    """Two float32 sums in different orders, each rounded once to bf16: at most one unit apart, plus
    the summation slack of both (near zero a sum's slack exceeds the unit)."""
    x, weight, _ = make_inputs(num_rows, 6144, 4096, torch.bfloat16, False, "cuda", seed=5)
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_bf16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = False  # cuBLAS sums in float32 throughout
    try:
        expected = F.linear(x, weight)
    finally:
        matmul.allow_bf16_reduced_precision_reduction = saved
    ours = linear(x, weight)
    magnitude = F.linear(x.double().abs(), weight.double().abs())
    _, exponent = torch.frexp(torch.maximum(ours.double().abs(), expected.double().abs()))
    allowed = torch.pow(2.0, exponent.double() - 8) + 2 * SUM_SLACK * 2.0**-24 * magnitude
    assert ((ours.double() - expected.double()).abs() <= allowed).all()


def test_supports():
    x, weight, bias = make_inputs(4, 64, 128, torch.bfloat16, True, "cuda", seed=0)
    assert supports(x, weight, bias) and supports(x, weight)
    assert not supports(torch.zeros(17, 128, device="cuda", dtype=torch.bfloat16), weight)
    assert not supports(x.cpu(), weight.cpu())
    assert not supports(x.double(), weight.double())
    assert not supports(x, weight.t().contiguous().t())
    assert not supports(x, weight.cpu())
    weight.requires_grad_()
    assert not supports(x, weight)
    with torch.no_grad():
        assert supports(x, weight)


def test_strided_rows_are_taken():
    """x may be a view with a row stride other than K (a slice of a wider activation)."""
    wide, weight, _ = make_inputs(3, 96, 256, torch.bfloat16, False, "cuda", seed=2)
    x = wide[:, :128]
    weight = weight[:, :128].contiguous()
    assert supports(x, weight)
    assert_near_exact(linear(x, weight), x, weight, None)


@pytest.mark.parametrize("num_rows", [1, 16])
def test_cuda_graph_replay_equals_eager(num_rows):
    """fma (1 row) and dot (16 rows) launches, captured once, replayed on new inputs."""
    for out_features, in_features in (LLAMA_31_8B_SHAPES["o"], LLAMA_31_8B_SHAPES["gate_up"]):
        x, weight, _ = make_inputs(num_rows, out_features, in_features, torch.bfloat16, False, "cuda", seed=1)
        static_x = x.clone()
        linear(static_x, weight)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = linear(static_x, weight)
        for seed in (10, 11):
            static_x.copy_(make_inputs(num_rows, 1, in_features, torch.bfloat16, False, "cuda", seed)[0])
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static_out, linear(static_x, weight))


def test_engine_greedy_decode_matches_f_linear_in_float32(llama_dir):
    rng = random.Random(0)
    batch = [{"prompt_token_ids": [rng.randrange(3, 900) for _ in range(n)]} for n in (5, 17, 40, 9)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    common = dict(device="cuda", dtype="float32", attention_backend="triton", block_size=16, num_kv_blocks=128)
    outputs = {}
    for kernel in ("torch", "triton"):
        llm = LLM(llama_dir, small_batch_linear=kernel, **common)
        assert llm.engine.runner.model.ops.small_batch_linear == (kernel == "triton")
        outputs[kernel] = llm.generate(batch, params)
        del llm
    for ref, ours in zip(outputs["torch"], outputs["triton"]):
        assert ours.outputs[0].token_ids == ref.outputs[0].token_ids
        for ref_step, our_step in zip(ref.outputs[0].logprobs, ours.outputs[0].logprobs):
            for token_id, logprob in ref_step.items():
                assert our_step[token_id].logprob == pytest.approx(logprob.logprob, abs=1e-4)
