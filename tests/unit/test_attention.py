"""The SDPA prefill path against the plain-torch reference (the Triton decode kernel has its own tests)."""

import pytest
import torch

from services.engine.attention.backends import reference_attention, sdpa_causal


@pytest.mark.parametrize(
    "num_queries, seq_len, num_heads, num_kv_heads",
    [
        (7, 7, 4, 4),  # a prompt with no cached prefix
        (3, 19, 8, 2),  # a chunk after a cached prefix, GQA
        (1, 33, 4, 1),  # one token over a long context, MQA
    ],
)
def test_sdpa_bottom_right_causal_matches_reference(num_queries, seq_len, num_heads, num_kv_heads):
    g = torch.Generator().manual_seed(num_queries * 100 + seq_len)
    q = torch.randn(num_queries, num_heads, 16, generator=g)
    k = torch.randn(seq_len, num_kv_heads, 16, generator=g)
    v = torch.randn(seq_len, num_kv_heads, 16, generator=g)
    ref = reference_attention(q, k, v, 0.25)
    out = sdpa_causal(q, k, v, 0.25)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


# ------------------------------------------------------------------ the triton backend's three ways


def mixed_step(num_padding_tokens: int = 0):
    """Two decodes, a whole prompt and a chunk after a cached prefix; K/V of earlier tokens in the cache.

    Returns (cache, q, k, v, metadata pieces) with block_size 8, 8 query heads over 2 kv heads, head_dim 16.
    """
    g = torch.Generator().manual_seed(7)
    block_size, heads, kv_heads, dim, num_blocks = 8, 8, 2, 16, 32
    cached = [9, 20, 0, 13]  # tokens each sequence computed before this step
    new = [1, 1, 11, 6]  # tokens it computes now: decodes first
    cache = torch.randn(1, 2, num_blocks, block_size, kv_heads, dim, generator=g)
    tables = torch.randperm(num_blocks - 1, generator=g)[:16].add(1).view(4, 4).to(torch.int32)  # 0: padding
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(cached, new)])
    rows = torch.repeat_interleave(torch.arange(4), torch.tensor(new))
    slots = tables[rows, positions // block_size].long() * block_size + positions % block_size
    num_tokens = sum(new)
    q, k, v = (torch.randn(num_tokens, n, dim, generator=g) for n in (heads, kv_heads, kv_heads))
    pad = torch.Generator().manual_seed(8)  # padding rows from their own stream: the real rows stay the same
    q, k, v = (torch.cat([x, torch.randn(num_padding_tokens, *x.shape[1:], generator=pad)]) for x in (q, k, v))
    slots = torch.cat([slots, torch.zeros(num_padding_tokens, dtype=torch.long)])  # padding writes block 0
    query_start_loc = [0, 1, 2, 13, 19]
    seq_lens = [c + n for c, n in zip(cached, new)]
    return cache, q, k, v, slots, tables, query_start_loc, seq_lens


def attend(backend_name: str, num_decode_seqs: int, varlen: str | None, num_padding_tokens: int = 0):
    import numpy as np

    from services.engine.attention.backends import AttentionMetadata, VarlenInputs, create_attention
    from services.engine.attention.tiles import build_tile_map, max_num_tiles, tokens_per_tile

    cache, q, k, v, slots, tables, qsl, seq_lens = mixed_step(num_padding_tokens)
    backend = create_attention(backend_name, cache, 0.25)
    varlen_inputs = None
    if varlen is not None:
        block_q = tokens_per_tile(8, 2)
        first = 2  # the decodes go to the decode kernel either way
        num_tiles = max_num_tiles(q.shape[0], 4, block_q) if varlen == "graph" else None
        tile_seqs, starts = build_tile_map(np.array(qsl, dtype=np.int32), first, block_q, num_tiles)
        varlen_inputs = VarlenInputs(
            torch.tensor(qsl, dtype=torch.int32),
            torch.from_numpy(tile_seqs),
            torch.from_numpy(starts),
            zero_fill=varlen == "graph",
            decode_rows=4 if varlen == "graph" else 0,
            num_decode_seqs=torch.tensor([2], dtype=torch.int32) if varlen == "graph" else None,
        )
    backend.metadata = AttentionMetadata(
        slot_mapping=slots,
        block_tables=tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        num_decode_seqs=num_decode_seqs,
        query_start_loc=qsl,
        seq_lens_host=seq_lens,
        max_seq_len=64 if varlen == "graph" else max(seq_lens),  # a graph's bound is the model's context
        varlen=varlen_inputs,
    )
    return backend.forward(0, q, k, v)


@pytest.mark.parametrize(
    "num_decode_seqs, varlen, padding",
    [
        (2, None, 0),  # eager: decode kernel, then SDPA per chunk (the plain path)
        (2, "eager", 0),  # eager: decode kernel, then one varlen launch
        (0, "graph", 5),  # captured: decodes counted on the device, padded tokens and tiles, zero fill
    ],
)
def test_the_triton_backend_matches_the_reference_on_a_mixed_step(num_decode_seqs, varlen, padding):
    """Under Triton's interpreter on CPU: what the GPU's eager and captured mixed steps compute."""
    pytest.importorskip("triton")
    ref = attend("reference", 2, None)
    out = attend("triton", num_decode_seqs, varlen, padding)
    num_tokens = ref.shape[0]
    assert ((out[:num_tokens] - ref).norm() / ref.norm()).item() < 1e-4
    assert (out[num_tokens:] == 0).all()  # padding tokens: zeros, not garbage
