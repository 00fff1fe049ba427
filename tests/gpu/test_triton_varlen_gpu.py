"""Varlen paged attention (Triton) on a GPU: Llama-3.1-8B attention shapes in bf16, long chunks after
cached prefixes, decodes among them, and CUDA-graph replay with a new tile map."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from services.engine.attention.tiles import VarlenTuning, build_tile_map, max_num_tiles, tokens_per_tile  # noqa: E402
from services.engine.attention.triton_varlen import varlen_paged_attention  # noqa: E402
from tests.unit.test_triton_varlen import make_inputs, reference, relative_error, run  # noqa: E402

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
BF16_TOLERANCE = 1e-2
# (cached, new): a whole 2k chunk, a chunk after a long prefix, a short prompt, decodes at 1k and 4k
MIXED = [(0, 2048), (1500, 300), (0, 7), *[(1023, 1)] * 20, (4000, 1), (4000, 17), (0, 0)]


@pytest.mark.parametrize("tuning", [VarlenTuning(), VarlenTuning(block_m=128, tile_n=64, num_warps=8)])
def test_llama_shapes_bf16(tuning):
    inputs = make_inputs(MIXED, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, torch.bfloat16, device="cuda")
    out = run(inputs, tuning)
    assert not out.isnan().any()
    assert relative_error(out, reference(inputs, 0)) < BF16_TOLERANCE


@pytest.mark.parametrize("head_dim,block_size,num_kv_heads", [(64, 8, 8), (80, 32, 2), (256, 16, 1)])
def test_head_dims_block_sizes_and_groups(head_dim, block_size, num_kv_heads):
    inputs = make_inputs(
        [(0, 300), (77, 1), (500, 129)], 16, num_kv_heads, head_dim, block_size, torch.bfloat16, device="cuda"
    )
    out = run(inputs, VarlenTuning())
    assert relative_error(out, reference(inputs, 0)) < BF16_TOLERANCE


def test_float32_is_exact_to_rounding():
    inputs = make_inputs(MIXED[:6], NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, torch.float32, device="cuda")
    assert relative_error(run(inputs, VarlenTuning()), reference(inputs, 0)) < 1e-4


def test_cuda_graph_replay_with_a_new_tile_map():
    """A graph captured over a padded grid replays other steps: new lengths, new map, same buffers."""
    capacity_tokens, capacity_seqs = 1024, 16
    block_q = tokens_per_tile(NUM_Q_HEADS, NUM_KV_HEADS)
    num_tiles = max_num_tiles(capacity_tokens, capacity_seqs, block_q)
    steps = [[(0, 500), (100, 1), (30, 200)], [(700, 1), (0, 1000), (5, 3), (9, 1)]]
    step_inputs = [
        make_inputs(seqs, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, torch.bfloat16, seed=seed, device="cuda")
        for seed, seqs in enumerate(steps)
    ]
    num_blocks = max(inputs["k_cache"].shape[0] for inputs in step_inputs)
    cache_shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    width = 128
    static = dict(
        q=torch.zeros(capacity_tokens, NUM_Q_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda"),
        k_cache=torch.zeros(cache_shape, dtype=torch.bfloat16, device="cuda"),
        v_cache=torch.zeros(cache_shape, dtype=torch.bfloat16, device="cuda"),
        block_tables=torch.zeros(capacity_seqs, width, dtype=torch.int32, device="cuda"),
        seq_lens=torch.zeros(capacity_seqs, dtype=torch.int32, device="cuda"),
        query_start_loc=torch.zeros(capacity_seqs + 1, dtype=torch.int32, device="cuda"),
        tile_seqs=torch.full((num_tiles,), -1, dtype=torch.int32, device="cuda"),
        tile_token_starts=torch.zeros(num_tiles, dtype=torch.int32, device="cuda"),
        scale=HEAD_DIM**-0.5,
        out=torch.zeros(capacity_tokens, NUM_Q_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda"),
    )
    varlen_paged_attention(**static)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        varlen_paged_attention(**static)
    for fresh in step_inputs:
        num_tokens, num_seqs = fresh["q"].shape[0], fresh["seq_lens"].shape[0]
        fresh["block_tables"] = fresh["block_tables"].clamp(min=0)  # -1 past the end: any valid block
        tile_seqs, starts = build_tile_map(fresh["query_start_loc"], 0, block_q, num_tiles)
        static["k_cache"][: fresh["k_cache"].shape[0]].copy_(fresh["k_cache"])
        static["v_cache"][: fresh["v_cache"].shape[0]].copy_(fresh["v_cache"])
        static["q"][:num_tokens].copy_(fresh["q"])
        static["block_tables"][:num_seqs, : fresh["block_tables"].shape[1]].copy_(fresh["block_tables"])
        static["seq_lens"][:num_seqs].copy_(fresh["seq_lens"])
        static["query_start_loc"][: num_seqs + 1].copy_(torch.from_numpy(fresh["query_start_loc"]))
        static["tile_seqs"].copy_(torch.from_numpy(tile_seqs))
        static["tile_token_starts"].copy_(torch.from_numpy(starts))
        static["out"].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(static["out"][:num_tokens], reference(fresh, 0)) < BF16_TOLERANCE
        assert static["out"][num_tokens:].isnan().all()  # padding tokens are left alone
