"""Paged decode attention in Triton, split over the sequence (flash-decoding).

One new query token per sequence attends to that sequence's whole KV history, stored in fixed-size
cache blocks listed by its block table. Decode is bound by memory traffic, not arithmetic: the
kernel's job is to read each K and V row once at close to full bandwidth.

Algorithm (Flash-Decoding, Dao et al. 2023; online softmax from Milakov & Gimelshein 2018):

    sequence i, tokens 0 .. seq_len-1, cut into partitions of S tokens:

    | partition 0 | partition 1 | ... | partition P-1 (partly filled) |
    |tile|tile|...|

    S = max(PARTITION_SIZE, cdiv(seq_len, G) rounded up to whole tiles), P = cdiv(seq_len, S) <= G,
    where G is the grid's partitions per (sequence, kv head): cdiv(max_seq_len, PARTITION_SIZE), but
    at most MAX_PROGRAMS programs in all. A tile is TILE_TOKENS tokens.

    Why G is capped: a captured graph is sized for the model's whole context (128k tokens for
    Llama-3.1), and a grid of cdiv(128k, 512) partitions x 256 sequences x 8 kv heads is half a
    million programs that nearly all exit at once, yet their launch cost 10+ ms a decode step.
    With the cap a long sequence takes longer partitions instead of more of them.

    token t -> k_cache[block_tables[i, t // block_size], t % block_size, kv_head, :]

1. `_partition_kernel`, one program per (sequence, kv head, partition): loads the query heads of
   that kv head's GQA group as one [GROUP_ROWS, head_dim] tile (the group padded to at least 16
   rows for `tl.dot`), then walks its partition tile by tile with an online softmax in float32
   (scores kept in log2 units so `exp2` applies). Each K/V tile is read once for the whole group.
   It writes the unnormalised partial output with the running max and sum of exponentials.
   Programs past their sequence's end return at once.
2. `_reduce_kernel`, one program per (sequence, query head): takes the global max over the
   partitions that exist for that sequence's length, rescales each partial output and sum by
   exp2(partition max - global max), and divides the summed outputs by the summed sums.

A partition's tile loop runs to a bound read at run time (its length); the reduction's to the
padded partition count, in chunks. Masks cover the ragged ends: masked loads move no data. (Triton's
interpreter, which runs the CPU tests, needs the patch in tests/conftest.py for run-time bounds.)

When G is 1, the first kernel normalises and writes `out` itself and the second is not launched
(the only branch; it depends on host-side values alone).

Rows with seq_len == 0 have no partition: their sum is 0 and the output is written as zeros.
The grid and the float32 workspace depend only on (num_seqs, num_heads, head_dim, max_seq_len),
and nothing reads device values on the host, so the call can be captured in a CUDA graph.

Tunables (module constants, gathered in `DEFAULT_TUNING`):
    PARTITION_SIZE = 512    fewest tokens of a split-K partition; smaller gives more programs at
                            small batch, larger gives less reduction work
    MAX_PROGRAMS = 16384    cap on partition programs (sequences x kv heads x G)
    TILE_TOKENS = 64        tokens per loop step (one K tile and one V tile in flight per stage)
    NUM_WARPS = 4           warps of a partition program
    NUM_STAGES = 2          software-pipelining depth of the K/V tile loads
    REDUCE_NUM_WARPS = 4    warps of a reduction program
    REDUCE_CHUNK_PARTITIONS = 16  partial outputs a reduction step loads at once
    MIN_GROUP_ROWS = 16     the query group is padded to at least this many rows (tl.dot minimum)

Measured on one H100 (device copy 3.0 TB/s counting read + write), Llama-3.1-8B shapes in bf16,
16-token blocks, 1024-token contexts, graph replay: K/V read at 2.72 TB/s (90 % of copy) at batch
64 and 2.84 TB/s (94 %) at batch 256 with the defaults; none of the other tile, warp and stage
choices tried was measurably faster. Batch 1 is bound by launch and tail, not bandwidth (13 us):
there `DecodeTuning(partition_size=128)` spreads the same reads over 4x the programs (6 us).
`benchmarks/attention_decode.py --sweep` repeats the comparison.

head_dim is padded to the next power of two with masks (64, 80, 96, 128, 256 all work); any
power-of-two block_size works (8, 16, 32, 64 are tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

PARTITION_SIZE = 512
TILE_TOKENS = 64
NUM_WARPS = 4
NUM_STAGES = 2
REDUCE_NUM_WARPS = 4
REDUCE_CHUNK_PARTITIONS = 16
MIN_GROUP_ROWS = 16
MAX_PROGRAMS = 16384

_LOG2_E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeTuning:
    """Launch shapes of the two kernels; `DEFAULT_TUNING` holds the module constants."""

    partition_size: int = PARTITION_SIZE
    tile_tokens: int = TILE_TOKENS
    num_warps: int = NUM_WARPS
    num_stages: int = NUM_STAGES
    reduce_num_warps: int = REDUCE_NUM_WARPS

    def __post_init__(self) -> None:
        for name in ("partition_size", "tile_tokens"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.partition_size % self.tile_tokens:
            raise ValueError("partition_size must be a multiple of tile_tokens")


DEFAULT_TUNING = DecodeTuning()


@triton.jit
def _token_offsets(block_table_row_ptr, tokens, token_mask, BLOCK_SIZE: tl.constexpr):
    """Element offset of each token's (block, slot) in a cache laid out [block, slot, ...]."""
    block_ids = tl.load(block_table_row_ptr + tokens // BLOCK_SIZE, mask=token_mask, other=0)
    return block_ids.to(tl.int64), tokens % BLOCK_SIZE


@triton.jit
def _split_tokens(seq_len, max_num_partitions, PARTITION_SIZE: tl.constexpr, TILE_TOKENS: tl.constexpr):
    """Tokens per partition of one sequence: at least PARTITION_SIZE, and few enough that its
    partitions fit the grid's max_num_partitions (a multiple of TILE_TOKENS)."""
    spread = tl.cdiv(tl.cdiv(seq_len, max_num_partitions), TILE_TOKENS) * TILE_TOKENS
    return tl.maximum(spread, PARTITION_SIZE)


@triton.jit
def _partition_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    num_rows_ptr,  # with LIMIT_ROWS: rows from this device count on are not this call's
    out_ptr,
    partial_acc_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    qk_scale_log2,  # softmax scale * log2(e)
    stride_q_seq,
    stride_q_head,
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_v_block,
    stride_v_slot,
    stride_v_head,
    stride_table_seq,
    stride_out_seq,
    stride_out_head,
    num_q_heads,
    max_num_partitions,
    GROUP_SIZE: tl.constexpr,
    GROUP_ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    TILE_TOKENS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DIRECT_OUTPUT: tl.constexpr,
    LIMIT_ROWS: tl.constexpr,
):
    seq_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    partition_idx = tl.program_id(2)
    if LIMIT_ROWS:  # noqa: SIM102 (a constexpr branch, compiled away)
        if seq_idx >= tl.load(num_rows_ptr):
            return
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    split_tokens = _split_tokens(seq_len, max_num_partitions, PARTITION_SIZE, TILE_TOKENS)
    start_token = partition_idx * split_tokens
    end_token = tl.minimum(start_token + split_tokens, seq_len)

    if not DIRECT_OUTPUT:  # noqa: SIM102 (a constexpr branch, compiled away; one `and` would mix it with a tensor)
        if start_token >= seq_len:
            return  # past this sequence's end; the reduction never reads this partition

    rows = tl.arange(0, GROUP_ROWS)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    row_mask = rows < GROUP_SIZE
    dim_mask = dims < HEAD_DIM
    q_heads = kv_head * GROUP_SIZE + rows
    q_offsets = seq_idx.to(tl.int64) * stride_q_seq + q_heads[:, None] * stride_q_head + dims[None, :]
    q_mask = row_mask[:, None] & dim_mask[None, :]
    q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0)  # [GROUP_ROWS, HEAD_DIM_PADDED]

    # A finite floor (not -inf) keeps a fully masked tile NaN-free: exp2(floor - floor) = 1 rescales
    # nothing and every masked score still gets probability exp2(-inf) = 0.
    max_score = tl.full([GROUP_ROWS], -1.0e30, tl.float32)  # log2 units
    sum_exp = tl.zeros([GROUP_ROWS], tl.float32)
    acc = tl.zeros([GROUP_ROWS, HEAD_DIM_PADDED], tl.float32)
    block_table_row_ptr = block_tables_ptr + seq_idx.to(tl.int64) * stride_table_seq
    # The last tile may run past end_token: its masked rows load nothing.
    for tile_idx in range(0, tl.cdiv(end_token - start_token, TILE_TOKENS)):
        tile_start = start_token + tile_idx * TILE_TOKENS
        tokens = tile_start + tl.arange(0, TILE_TOKENS)
        token_mask = tokens < end_token
        block_ids, slots = _token_offsets(block_table_row_ptr, tokens, token_mask, BLOCK_SIZE)
        kv_mask = token_mask[:, None] & dim_mask[None, :]
        k_offsets = block_ids * stride_k_block + slots * stride_k_slot + kv_head * stride_k_head
        k = tl.load(k_cache_ptr + k_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v_offsets = block_ids * stride_v_block + slots * stride_v_slot + kv_head * stride_v_head
        v = tl.load(v_cache_ptr + v_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        # k, v: [TILE_TOKENS, HEAD_DIM_PADDED]

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        scores = tl.where(token_mask[None, :], scores, float("-inf"))  # [GROUP_ROWS, TILE_TOKENS]
        new_max = tl.maximum(max_score, tl.max(scores, axis=1))
        rescale = tl.exp2(max_score - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        sum_exp = sum_exp * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
        max_score = new_max

    if DIRECT_OUTPUT:
        out_offsets = seq_idx.to(tl.int64) * stride_out_seq + q_heads[:, None] * stride_out_head + dims[None, :]
        normalised = acc / tl.where(sum_exp > 0, sum_exp, 1.0)[:, None]
        tl.store(out_ptr + out_offsets, normalised.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # workspace rows (seq, q_head, partition): [num_seqs, num_q_heads, max_num_partitions]
        stat_rows = (seq_idx.to(tl.int64) * num_q_heads + q_heads) * max_num_partitions + partition_idx
        tl.store(partial_max_ptr + stat_rows, max_score, mask=row_mask)
        tl.store(partial_sum_ptr + stat_rows, sum_exp, mask=row_mask)
        acc_offsets = stat_rows[:, None] * HEAD_DIM + dims[None, :]
        tl.store(partial_acc_ptr + acc_offsets, acc, mask=q_mask)


@triton.jit
def _reduce_kernel(
    out_ptr,
    partial_acc_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    seq_lens_ptr,
    num_rows_ptr,
    stride_out_seq,
    stride_out_head,
    num_q_heads,
    max_num_partitions,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    TILE_TOKENS: tl.constexpr,
    PARTITIONS_PADDED: tl.constexpr,
    CHUNK_PARTITIONS: tl.constexpr,
    LIMIT_ROWS: tl.constexpr,
):
    seq_idx = tl.program_id(0)
    q_head = tl.program_id(1)
    if LIMIT_ROWS:  # noqa: SIM102 (a constexpr branch, compiled away)
        if seq_idx >= tl.load(num_rows_ptr):
            return
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    num_partitions = tl.cdiv(seq_len, _split_tokens(seq_len, max_num_partitions, PARTITION_SIZE, TILE_TOKENS))
    first_row = (seq_idx.to(tl.int64) * num_q_heads + q_head) * max_num_partitions
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_mask = dims < HEAD_DIM

    # Pass 1: the global max and the total sum over the partitions that exist (log2 units).
    partitions = tl.arange(0, PARTITIONS_PADDED)
    partition_mask = partitions < num_partitions
    part_maxes = tl.load(partial_max_ptr + first_row + partitions, mask=partition_mask, other=float("-inf"))
    part_sums = tl.load(partial_sum_ptr + first_row + partitions, mask=partition_mask, other=0.0)
    global_max = tl.maximum(tl.max(part_maxes, axis=0), -1.0e30)  # finite when seq_len == 0
    total_sum = tl.sum(part_sums * tl.exp2(part_maxes - global_max), axis=0)

    # Pass 2: the rescaled partial outputs, CHUNK_PARTITIONS at a time to bound registers.
    acc = tl.zeros([HEAD_DIM_PADDED], tl.float32)
    for chunk_idx in range(PARTITIONS_PADDED // CHUNK_PARTITIONS):
        chunk = chunk_idx * CHUNK_PARTITIONS + tl.arange(0, CHUNK_PARTITIONS)
        chunk_mask = chunk < num_partitions
        chunk_maxes = tl.load(partial_max_ptr + first_row + chunk, mask=chunk_mask, other=float("-inf"))
        chunk_rows = first_row + chunk
        chunk_acc = tl.load(
            partial_acc_ptr + chunk_rows[:, None] * HEAD_DIM + dims[None, :],
            mask=chunk_mask[:, None] & dim_mask[None, :],
            other=0.0,
        )
        # chunk_acc: [CHUNK_PARTITIONS, HEAD_DIM_PADDED]
        weights = tl.exp2(chunk_maxes - global_max)
        acc += tl.sum(chunk_acc * weights[:, None], axis=0)

    out = acc / tl.where(total_sum > 0, total_sum, 1.0)
    out_offsets = seq_idx.to(tl.int64) * stride_out_seq + q_head * stride_out_head + dims
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=dim_mask)


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    out: torch.Tensor,  # [num_seqs, num_q_heads, head_dim], written
    max_seq_len: int,
    *,
    tuning: DecodeTuning = DEFAULT_TUNING,
    num_rows: torch.Tensor | None = None,
) -> None:
    """Write softmax(q·Kᵀ·scale)·V over each sequence's paged KV into `out`.

    `max_seq_len` is a host-side upper bound of `seq_lens`; it sizes the grid and the workspace.
    `num_rows` (a one-element int32 device tensor) limits the call to the first rows, leaving the
    others unwritten: a captured mixed step's decodes, whose count changes from step to step.
    Never synchronises with the device, so the call can be captured in a CUDA graph.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, out)
    if num_seqs == 0:
        return
    group_size = num_q_heads // num_kv_heads
    head_dim_padded = triton.next_power_of_2(head_dim)
    max_num_partitions = grid_partitions(num_seqs, num_kv_heads, max_seq_len, tuning)
    direct_output = max_num_partitions == 1

    partial_acc, partial_max, partial_sum = _workspace(
        num_seqs, num_q_heads, max_num_partitions, head_dim, q.device, direct_output
    )
    _partition_kernel[(num_seqs, num_kv_heads, max_num_partitions)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        seq_lens if num_rows is None else num_rows,
        out,
        partial_acc,
        partial_max,
        partial_sum,
        scale * _LOG2_E,
        *paged_strides(q, k_cache, v_cache, block_tables, out),
        num_q_heads,
        max_num_partitions,
        GROUP_SIZE=group_size,
        GROUP_ROWS=max(MIN_GROUP_ROWS, triton.next_power_of_2(group_size)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=head_dim_padded,
        BLOCK_SIZE=block_size,
        PARTITION_SIZE=tuning.partition_size,
        TILE_TOKENS=tuning.tile_tokens,
        # exact float32 products for float32 inputs; 16-bit inputs ignore the setting
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DIRECT_OUTPUT=direct_output,
        LIMIT_ROWS=num_rows is not None,
        num_warps=tuning.num_warps,
        num_stages=tuning.num_stages,
    )
    if direct_output:
        return
    # A power of two keeps the number of compiled variants to log2 of the longest context.
    partitions_padded = triton.next_power_of_2(max_num_partitions)
    _reduce_kernel[(num_seqs, num_q_heads)](
        out,
        partial_acc,
        partial_max,
        partial_sum,
        seq_lens,
        seq_lens if num_rows is None else num_rows,
        out.stride(0),
        out.stride(1),
        num_q_heads,
        max_num_partitions,
        HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=head_dim_padded,
        PARTITION_SIZE=tuning.partition_size,
        TILE_TOKENS=tuning.tile_tokens,
        PARTITIONS_PADDED=partitions_padded,
        CHUNK_PARTITIONS=min(REDUCE_CHUNK_PARTITIONS, partitions_padded),
        LIMIT_ROWS=num_rows is not None,
        num_warps=tuning.reduce_num_warps,
    )


def paged_strides(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, out: torch.Tensor
) -> tuple[int, ...]:
    """The strides the paged kernels take, in their order: q's token and head, each cache's block,
    slot and head, the block table's row, out's token and head (the last dimensions are unit)."""
    return (
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
    )


def grid_partitions(num_seqs: int, num_kv_heads: int, max_seq_len: int, tuning: DecodeTuning = DEFAULT_TUNING) -> int:
    """The grid's partitions per (sequence, kv head): enough for max_seq_len in partition_size pieces,
    but at most MAX_PROGRAMS programs in all (each sequence then spreads its tokens over them)."""
    wanted = max(1, triton.cdiv(max_seq_len, tuning.partition_size))
    return max(1, min(wanted, MAX_PROGRAMS // max(1, num_seqs * num_kv_heads)))


def _workspace(
    num_seqs: int,
    num_q_heads: int,
    max_num_partitions: int,
    head_dim: int,
    device: torch.device,
    direct_output: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 partial results; sized from host ints only (a one-element stub when unused)."""
    if direct_output:
        stub = torch.empty(1, dtype=torch.float32, device=device)
        return stub, stub, stub
    stats_shape = (num_seqs, num_q_heads, max_num_partitions)
    partial_acc = torch.empty(*stats_shape, head_dim, dtype=torch.float32, device=device)
    partial_max = torch.empty(stats_shape, dtype=torch.float32, device=device)
    partial_sum = torch.empty(stats_shape, dtype=torch.float32, device=device)
    return partial_acc, partial_max, partial_sum


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Shape, dtype and layout checks; metadata only, so nothing waits on the device."""
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if v_cache.shape != k_cache.shape or cache_head_dim != head_dim:
        raise ValueError(
            f"cache shapes {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not match head_dim {head_dim}"
        )
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype == out.dtype):
        raise ValueError("q, k_cache, v_cache and out must share one dtype")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("block_tables and seq_lens must be int32")
    if block_tables.shape[0] != num_seqs or seq_lens.shape != (num_seqs,):
        raise ValueError("block_tables and seq_lens need one row per sequence")
    if out.shape != q.shape:
        raise ValueError(f"out shape {tuple(out.shape)} differs from q shape {tuple(q.shape)}")
    for name, tensor in (
        ("q", q),
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("out", out),
        ("block_tables", block_tables),
    ):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")


__all__ = ["DEFAULT_TUNING", "DecodeTuning", "paged_decode_attention"]
