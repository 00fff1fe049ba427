"""Paged attention for query chunks of any length, every sequence of a step in one launch (Triton).

A step's query tokens are flat and grouped by sequence (`query_start_loc`); sequence i has
`q_len = query_start_loc[i + 1] - query_start_loc[i]` new tokens whose K/V are already written to
the paged cache, after `seq_len - q_len` tokens computed earlier (a prefix-cache hit, earlier chunks
or earlier decode steps). Each new token attends causally to every cached token up to its own
position: the bottom-right-aligned causal mask of a chunked prefill. A decode is the case q_len = 1.

Work split (FlashAttention-2's forward, Dao 2023, over a paged cache; online softmax from Milakov &
Gimelshein 2018; the GQA row packing follows vLLM's unified Triton attention):

    sequence i's new tokens   | tile 0: BLOCK_Q tokens | tile 1 | ... | last tile (partly filled) |

    one program per (tile, kv head): its rows are the tile's tokens x the query heads of that kv
    head's GQA group, BLOCK_M = BLOCK_Q * GROUP_ROWS rows in one [BLOCK_M, head_dim] tile

        row r -> token  tile_token_start + r // GROUP_ROWS
                 head   kv_head * group_size + r % GROUP_ROWS   (rows past group_size are padding)

    It walks the cache in TILE_N-token tiles from position 0 to the tile's last token, so each K/V
    tile is read once for the whole group and all BLOCK_Q tokens; scores are kept in log2 units for
    `exp2`, masked where the key position is past the row's own.

The tile -> (sequence, first token) map is built on the host (`tiles.build_tile_map`, numpy, microseconds)
and padded with -1: the grid and every buffer then depend on host-side bounds only, nothing reads a
device value on the host, and the call can be captured in a CUDA graph with the map refilled per
step. Tokens that no tile covers (a graph's padding) are not written.

The K/V loop's trip count is read from the device (it is each tile's context length). Triton's
interpreter, which runs the CPU tests, needs the patch in tests/conftest.py for that.

Tunables (`tiles.VarlenTuning`, defaults in `DEFAULT_TUNING`):
    block_m = 64      query rows per program (tokens x group heads); BLOCK_Q = block_m / GROUP_ROWS
    tile_n = 64       cached tokens per loop step
    num_warps = 4
    num_stages = 2    software-pipelining depth of the K/V loads
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.engine.attention.tiles import (
    DEFAULT_TUNING,
    VarlenTuning,
    build_tile_map,
    group_rows,
    max_num_tiles,
    tokens_per_tile,
)
from services.engine.attention.triton_decode import paged_strides

_LOG2_E = 1.4426950408889634


@triton.jit
def _varlen_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    tile_seqs_ptr,
    tile_token_starts_ptr,
    out_ptr,
    qk_scale_log2,  # softmax scale * log2(e)
    stride_q_token,
    stride_q_head,
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_v_block,
    stride_v_slot,
    stride_v_head,
    stride_table_seq,
    stride_out_token,
    stride_out_head,
    GROUP_SIZE: tl.constexpr,
    GROUP_ROWS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tile_seqs_ptr + tile)
    if seq < 0:
        return  # past the step's tiles (a graph's fixed grid)
    token_start = tl.load(tile_token_starts_ptr + tile)
    q_first = tl.load(query_start_loc_ptr + seq)
    q_end = tl.load(query_start_loc_ptr + seq + 1)
    seq_len = tl.load(seq_lens_ptr + seq)
    cached = seq_len - (q_end - q_first)  # tokens of this sequence computed before this step

    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_mask = dims < HEAD_DIM
    tokens = token_start + rows // GROUP_ROWS
    heads_in_group = rows % GROUP_ROWS
    row_mask = (tokens < q_end) & (heads_in_group < GROUP_SIZE)
    q_heads = kv_head * GROUP_SIZE + heads_in_group
    positions = cached + tokens - q_first  # each row's own KV position: it sees keys 0 ..= position
    q_offsets = tokens.to(tl.int64)[:, None] * stride_q_token + q_heads[:, None] * stride_q_head + dims[None, :]
    q_mask = row_mask[:, None] & dim_mask[None, :]
    q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0)  # [BLOCK_M, HEAD_DIM_PADDED]

    last_position = cached + tl.minimum(token_start + BLOCK_Q, q_end) - 1 - q_first
    # A finite floor (not -inf) keeps a fully masked row NaN-free: exp2(floor - floor) = 1 rescales
    # nothing and every masked score still gets probability exp2(-inf) = 0.
    max_score = tl.full([BLOCK_M], -1.0e30, tl.float32)
    sum_exp = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], tl.float32)
    block_table_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    for kv_tile in range(0, tl.cdiv(last_position + 1, TILE_N)):
        kv_positions = kv_tile * TILE_N + tl.arange(0, TILE_N)
        kv_valid = kv_positions <= last_position
        block_ids = tl.load(block_table_row_ptr + kv_positions // BLOCK_SIZE, mask=kv_valid, other=0).to(tl.int64)
        slots = kv_positions % BLOCK_SIZE
        kv_mask = kv_valid[:, None] & dim_mask[None, :]
        k_offsets = block_ids * stride_k_block + slots * stride_k_slot + kv_head * stride_k_head
        k = tl.load(k_cache_ptr + k_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v_offsets = block_ids * stride_v_block + slots * stride_v_slot + kv_head * stride_v_head
        v = tl.load(v_cache_ptr + v_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_M, TILE_N]
        visible = (kv_positions[None, :] <= positions[:, None]) & kv_valid[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(max_score, tl.max(scores, axis=1))
        rescale = tl.exp2(max_score - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        sum_exp = sum_exp * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
        max_score = new_max

    out = acc / tl.where(sum_exp > 0, sum_exp, 1.0)[:, None]
    out_offsets = tokens.to(tl.int64)[:, None] * stride_out_token + q_heads[:, None] * stride_out_head + dims[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def varlen_paged_attention(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context after this step
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    tile_seqs: torch.Tensor,  # [num_tiles] int32, -1 past the step's tiles
    tile_token_starts: torch.Tensor,  # [num_tiles] int32
    scale: float,
    out: torch.Tensor,  # like q; the rows of the tiles' tokens are written
    *,
    tuning: VarlenTuning = DEFAULT_TUNING,
) -> None:
    """Causal (bottom-right aligned) softmax(q·Kᵀ·scale)·V of each sequence's new tokens over its paged KV.

    The tile map comes from `build_tile_map` with `tokens_per_tile(...)` tokens a tile.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shape {tuple(k_cache.shape)} does not match head_dim {head_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype == out.dtype) or out.shape != q.shape:
        raise ValueError("q, k_cache, v_cache and out must share one dtype, and out q's shape")
    for name, tensor in (("block_tables", block_tables), ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        if tensor.dtype != torch.int32:
            raise ValueError(f"{name} must be int32")
    num_tiles = tile_seqs.shape[0]
    if num_tokens == 0 or num_tiles == 0:
        return
    rows_per_token = group_rows(num_q_heads, num_kv_heads)
    block_q = tokens_per_tile(num_q_heads, num_kv_heads, tuning)
    _varlen_kernel[(num_tiles, num_kv_heads)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        tile_seqs,
        tile_token_starts,
        out,
        scale * _LOG2_E,
        *paged_strides(q, k_cache, v_cache, block_tables, out),
        GROUP_SIZE=num_q_heads // num_kv_heads,
        GROUP_ROWS=rows_per_token,
        BLOCK_Q=block_q,
        BLOCK_M=block_q * rows_per_token,
        HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        TILE_N=tuning.tile_n,
        # exact float32 products for float32 inputs; 16-bit inputs ignore the setting
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=tuning.num_warps,
        num_stages=tuning.num_stages,
    )


__all__ = [
    "DEFAULT_TUNING",
    "VarlenTuning",
    "build_tile_map",
    "max_num_tiles",
    "tokens_per_tile",
    "varlen_paged_attention",
]
