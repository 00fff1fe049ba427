"""Paged decode attention (Triton) on a GPU: realistic shapes in bf16, and CUDA-graph replay.

Shapes follow Llama-3.1-8B attention (32 query heads, 8 kv heads, head_dim 128, block 16).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from services.engine.attention.triton_decode import (  # noqa: E402
    DecodeTuning,
    paged_decode_attention,
)
from tests.unit.test_triton_decode import (  # noqa: E402
    check_against_reference,
    make_inputs,
    reference_decode_attention,
    relative_error,
)

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
MAX_CONTEXT_TOKENS = 4096
BF16_TOLERANCE = 1e-2


def random_seq_lens(batch_size: int, seed: int) -> list[int]:
    """Lengths in [0, 4096] with the edges (0, 1, a partition edge, the maximum) included."""
    generator = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(1, MAX_CONTEXT_TOKENS + 1, (batch_size,), generator=generator).tolist()
    edges = [MAX_CONTEXT_TOKENS, 0, 1, 512, 513]
    return edges[:batch_size] + seq_lens[len(edges) :]


@pytest.mark.parametrize("batch_size", [1, 7, 64, 256])
def test_llama_shapes_bf16(batch_size):
    inputs = make_inputs(
        random_seq_lens(batch_size, seed=batch_size),
        NUM_Q_HEADS,
        NUM_KV_HEADS,
        HEAD_DIM,
        BLOCK_SIZE,
        torch.bfloat16,
        device="cuda",
        seed=batch_size,
    )
    check_against_reference(inputs, DecodeTuning(), BF16_TOLERANCE)


@pytest.mark.parametrize("head_dim,block_size", [(64, 8), (80, 16), (96, 32), (128, 64), (256, 16)])
def test_head_dims_and_block_sizes_bf16(head_dim, block_size):
    inputs = make_inputs(
        [0, 1, 100, 777, 1500], 16, 4, head_dim, block_size, torch.bfloat16, device="cuda", seed=head_dim
    )
    check_against_reference(inputs, DecodeTuning(), BF16_TOLERANCE)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.float16, 1e-2)])
def test_other_dtypes(dtype, tolerance):
    inputs = make_inputs([0, 3, 600, 1200], 8, 1, 128, 16, dtype, device="cuda")
    check_against_reference(inputs, DecodeTuning(), tolerance)


def test_cuda_graph_replay_with_new_inputs():
    batch_size = 32
    static = make_inputs(
        random_seq_lens(batch_size, seed=0),
        NUM_Q_HEADS,
        NUM_KV_HEADS,
        HEAD_DIM,
        BLOCK_SIZE,
        torch.bfloat16,
        device="cuda",
        seed=0,
    )
    static["max_seq_len"] = MAX_CONTEXT_TOKENS  # the bound a captured batch is sized for

    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):
        paged_decode_attention(**static)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(**static)

    for replay_seed in (1, 2):
        fresh = make_inputs(
            random_seq_lens(batch_size, seed=replay_seed),
            NUM_Q_HEADS,
            NUM_KV_HEADS,
            HEAD_DIM,
            BLOCK_SIZE,
            torch.bfloat16,
            device="cuda",
            seed=replay_seed,
        )
        for name in ("q", "k_cache", "v_cache", "block_tables", "seq_lens"):
            static[name].copy_(fresh[name])
        static["out"].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        out = static["out"]
        assert not out.isnan().any()
        ref = reference_decode_attention(
            static["q"],
            static["k_cache"],
            static["v_cache"],
            static["block_tables"],
            static["seq_lens"],
            static["scale"],
        )
        assert relative_error(out, ref) < BF16_TOLERANCE
        assert (out[static["seq_lens"] == 0] == 0).all()
