"""Varlen paged attention (Triton) against a plain-torch reference, under Triton's interpreter.

Each case is a list of (cached tokens, new tokens) per sequence: decodes (one new token), whole
prompts, chunks after a cached prefix that cross tiles, and empty sequences (a graph's padding).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from services.engine.attention.backends import reference_attention
from services.engine.attention.triton_varlen import (
    VarlenTuning,
    build_tile_map,
    max_num_tiles,
    tokens_per_tile,
    varlen_paged_attention,
)

SMALL_TUNING = VarlenTuning(block_m=16, tile_n=16)
# (cached, new): a decode, a prompt, a chunk after a prefix crossing tiles, an empty row, one token
SEQS = [(9, 1), (0, 21), (17, 35), (0, 0), (0, 1), (40, 1)]


def make_inputs(seqs, num_q_heads, num_kv_heads, head_dim, block_size, dtype, seed=0, device="cpu") -> dict:
    """Random q and cache, shuffled block tables (-1 past each sequence's blocks), NaN-poisoned out."""
    generator = torch.Generator().manual_seed(seed)
    seq_lens = [cached + new for cached, new in seqs]
    width = max(1, -(-max(seq_lens) // block_size)) + 1
    num_blocks = len(seqs) * width + 2
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=generator).to(dtype)
    v_cache = torch.randn(cache_shape, generator=generator).to(dtype)
    query_start_loc = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum([new for _, new in seqs], out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])
    q = torch.randn((num_tokens, num_q_heads, head_dim), generator=generator).to(dtype)
    tables = torch.randperm(num_blocks, generator=generator)[: len(seqs) * width].view(len(seqs), width)
    used = torch.tensor([-(-n // block_size) for n in seq_lens])
    tables = tables.masked_fill(torch.arange(width)[None, :] >= used[:, None], -1).to(torch.int32)
    return dict(
        q=q.to(device),
        k_cache=k_cache.to(device),
        v_cache=v_cache.to(device),
        block_tables=tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=query_start_loc,
        scale=head_dim**-0.5,
        out=torch.full_like(q, float("nan"), device=device),
    )


def reference(inputs: dict, first_seq: int) -> torch.Tensor:
    """Causal attention per sequence through the engine's reference backend, in float32."""
    q, qsl, block_size = inputs["q"].float(), inputs["query_start_loc"], inputs["k_cache"].shape[1]
    out = torch.full_like(q, float("nan"))
    tables = inputs["block_tables"].long()
    for i in range(first_seq, len(qsl) - 1):
        lo, hi, seq_len = int(qsl[i]), int(qsl[i + 1]), int(inputs["seq_lens"][i])
        if hi == lo:
            continue
        positions = torch.arange(seq_len, device=q.device)
        blocks = tables[i, positions // block_size]
        keys = inputs["k_cache"][blocks, positions % block_size].float()
        values = inputs["v_cache"][blocks, positions % block_size].float()
        out[lo:hi] = reference_attention(q[lo:hi], keys, values, inputs["scale"])
    return out


def run(inputs: dict, tuning: VarlenTuning, first_seq: int = 0, num_tiles: int | None = None) -> torch.Tensor:
    num_q_heads, num_kv_heads = inputs["q"].shape[1], inputs["k_cache"].shape[2]
    block_q = tokens_per_tile(num_q_heads, num_kv_heads, tuning)
    tile_seqs, tile_starts = build_tile_map(inputs["query_start_loc"], first_seq, block_q, num_tiles)
    device = inputs["q"].device
    args = dict(inputs, query_start_loc=torch.from_numpy(inputs["query_start_loc"]).to(device))
    tiles = dict(
        tile_seqs=torch.from_numpy(tile_seqs).to(device), tile_token_starts=torch.from_numpy(tile_starts).to(device)
    )
    varlen_paged_attention(**args, **tiles, tuning=tuning)
    return inputs["out"]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (8, 2), (4, 1)])
@pytest.mark.parametrize("block_size,head_dim", [(16, 64), (8, 80)])
def test_matches_reference_float32(num_q_heads, num_kv_heads, block_size, head_dim):
    inputs = make_inputs(SEQS, num_q_heads, num_kv_heads, head_dim, block_size, torch.float32)
    out = run(inputs, SMALL_TUNING)
    assert not out.isnan().any(), "some rows were never written"
    assert relative_error(out, reference(inputs, 0)) < 1e-4


def test_float16_with_default_tiles():
    inputs = make_inputs(SEQS, 8, 2, 64, 16, torch.float16, seed=1)
    out = run(inputs, VarlenTuning())
    assert relative_error(out, reference(inputs, 0)) < 1e-2


def test_only_sequences_from_first_seq_are_written():
    """The eager path leaves the leading decodes to the decode kernel."""
    inputs = make_inputs(SEQS, 8, 2, 64, 16, torch.float32, seed=2)
    first_seq = 2
    out = run(inputs, SMALL_TUNING, first_seq=first_seq)
    untouched = int(inputs["query_start_loc"][first_seq])
    assert out[:untouched].isnan().all()
    assert relative_error(out[untouched:], reference(inputs, first_seq)[untouched:]) < 1e-4


def test_a_padded_tile_map_leaves_padding_tokens_alone():
    """A captured graph's grid: more tiles than the step has, and tokens past the sequences."""
    inputs = make_inputs(SEQS, 8, 2, 64, 16, torch.float32, seed=3)
    num_tokens = inputs["q"].shape[0]
    padding = 5
    inputs["q"] = torch.cat([inputs["q"], torch.randn(padding, 8, 64)])
    inputs["out"] = torch.full_like(inputs["q"], float("nan"))
    block_q = tokens_per_tile(8, 2, SMALL_TUNING)
    out = run(inputs, SMALL_TUNING, num_tiles=max_num_tiles(num_tokens + padding, len(SEQS), block_q))
    assert out[num_tokens:].isnan().all()
    assert relative_error(out[:num_tokens], reference(inputs, 0)[:num_tokens]) < 1e-4


def test_tile_map():
    query_start_loc = np.array([0, 1, 6, 6, 23], dtype=np.int32)  # lengths 1, 5, 0, 17
    tile_seqs, starts = build_tile_map(query_start_loc, 0, block_q=4, num_tiles=12)
    assert tile_seqs.tolist() == [0, 1, 1, 3, 3, 3, 3, 3, -1, -1, -1, -1]
    assert starts[:8].tolist() == [0, 1, 5, 6, 10, 14, 18, 22]
    assert int((tile_seqs >= 0).sum()) <= max_num_tiles(23, 4, 4)
    with pytest.raises(ValueError, match="do not fit"):
        build_tile_map(query_start_loc, 0, block_q=4, num_tiles=7)
