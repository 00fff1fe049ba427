"""Paged decode attention (Triton) against a plain-torch reference, under Triton's interpreter.

A small partition size (32 tokens, tiles of 16) lets short sequences cross several partitions so
the split and the reduction are exercised at interpreter speed. The half-precision case is float16:
the interpreter's bfloat16 matrix products are not usable.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from services.engine.attention.triton_decode import (
    DEFAULT_TUNING,
    DecodeTuning,
    paged_decode_attention,
)

SMALL_TUNING = DecodeTuning(partition_size=32, tile_tokens=16)
# 0: padding row; 1: a single token; 31/32/33: around a partition edge; 100: four partitions
SEQ_LENS = [0, 1, 31, 33, 100, 32]


def reference_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor,  # [num_seqs]
    scale: float,
) -> torch.Tensor:  # [num_seqs, num_q_heads, head_dim] float32
    num_seqs, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group_size = num_q_heads // num_kv_heads
    out = torch.zeros(num_seqs, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    for seq_idx, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        tokens = torch.arange(seq_len, device=q.device)
        blocks = block_tables[seq_idx, tokens // block_size].long()
        slots = tokens % block_size
        # [seq_len, num_q_heads, head_dim] after repeating each kv head for its group
        keys = k_cache[blocks, slots].float().repeat_interleave(group_size, dim=1)
        values = v_cache[blocks, slots].float().repeat_interleave(group_size, dim=1)
        scores = torch.einsum("hd,thd->ht", q[seq_idx].float(), keys) * scale
        out[seq_idx] = torch.einsum("ht,thd->hd", scores.softmax(dim=-1), values)
    return out


def make_inputs(
    seq_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """Random q/K/V, shuffled block tables, and a NaN-poisoned `out`.

    Block-table entries past a sequence's last block are -1, so any read beyond seq_len would
    fault instead of passing silently.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    num_seqs = len(seq_lens)
    max_blocks_per_seq = max(1, -(-max(seq_lens) // block_size)) + 1  # one unused column
    num_blocks = num_seqs * max_blocks_per_seq + 3
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device).to(dtype)

    k_cache, v_cache = randn(*cache_shape), randn(*cache_shape)
    q = randn(num_seqs, num_q_heads, head_dim)
    block_ids = torch.randperm(num_blocks, generator=generator, device=device)
    block_tables = block_ids[: num_seqs * max_blocks_per_seq].view(num_seqs, max_blocks_per_seq)
    num_used_blocks = torch.tensor([-(-n // block_size) for n in seq_lens], device=device)
    unused = torch.arange(max_blocks_per_seq, device=device)[None, :] >= num_used_blocks[:, None]
    block_tables = block_tables.masked_fill(unused, -1)
    return dict(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables.to(torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        scale=head_dim**-0.5,
        out=torch.full_like(q, float("nan")),
        max_seq_len=max(seq_lens),
    )


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def check_against_reference(inputs: dict, tuning: DecodeTuning, tolerance: float) -> None:
    paged_decode_attention(**inputs, tuning=tuning)
    out = inputs["out"]
    assert not out.isnan().any(), "some output elements were never written"
    ref = reference_decode_attention(
        inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["block_tables"], inputs["seq_lens"], inputs["scale"]
    )
    assert relative_error(out, ref) < tolerance
    padding_rows = inputs["seq_lens"] == 0
    assert (out[padding_rows] == 0).all()


TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2}


# (num_q_heads, num_kv_heads): MHA, GQA 4, MQA
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (8, 2), (4, 1)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_matches_reference_float32(num_q_heads, num_kv_heads, block_size, head_dim):
    inputs = make_inputs(SEQ_LENS, num_q_heads, num_kv_heads, head_dim, block_size, torch.float32)
    check_against_reference(inputs, SMALL_TUNING, TOLERANCE[torch.float32])


@pytest.mark.parametrize("num_q_heads,num_kv_heads,block_size,head_dim", [(8, 2, 16, 80), (4, 1, 32, 64)])
def test_matches_reference_float16(num_q_heads, num_kv_heads, block_size, head_dim):
    inputs = make_inputs(SEQ_LENS, num_q_heads, num_kv_heads, head_dim, block_size, torch.float16)
    check_against_reference(inputs, SMALL_TUNING, TOLERANCE[torch.float16])


@pytest.mark.parametrize("block_size,head_dim", [(8, 96), (64, 128), (16, 256)])
def test_other_block_sizes_and_head_dims(block_size, head_dim):
    inputs = make_inputs(SEQ_LENS, 8, 2, head_dim, block_size, torch.float32, seed=4)
    check_against_reference(inputs, SMALL_TUNING, TOLERANCE[torch.float32])


def test_single_partition_writes_output_directly():
    """max_seq_len within one partition: the first kernel normalises and no reduction runs."""
    inputs = make_inputs([0, 5, 32, 17], 8, 2, 64, 16, torch.float32, seed=1)
    check_against_reference(inputs, SMALL_TUNING, TOLERANCE[torch.float32])


def test_default_tuning_crosses_a_partition():
    inputs = make_inputs([0, 600, 7], 4, 1, 64, 32, torch.float32, seed=2)
    check_against_reference(inputs, DEFAULT_TUNING, TOLERANCE[torch.float32])


def test_max_seq_len_above_every_length():
    """A CUDA-graph batch sizes the grid for its longest allowed context, not the actual one."""
    inputs = make_inputs([3, 40, 0], 8, 2, 64, 16, torch.float32, seed=3)
    inputs["max_seq_len"] = 200
    check_against_reference(inputs, SMALL_TUNING, TOLERANCE[torch.float32])


def test_rejects_mismatched_heads():
    inputs = make_inputs([4], 6, 4, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention(**inputs)


def test_tuning_rejects_partition_not_multiple_of_tile():
    with pytest.raises(ValueError):
        DecodeTuning(partition_size=32, tile_tokens=64)


@pytest.mark.parametrize("max_programs", [1, 24, 200])
def test_a_capped_grid_spreads_long_sequences_over_longer_partitions(monkeypatch, max_programs):
    """A graph sized for a huge context (max_seq_len far past every length) with the program cap
    binding: each sequence takes fewer, longer partitions and the result is unchanged."""
    from services.engine.attention import triton_decode

    monkeypatch.setattr(triton_decode, "MAX_PROGRAMS", max_programs)
    inputs = make_inputs(SEQ_LENS, 8, 2, 64, 16, torch.float32, seed=5)
    inputs["max_seq_len"] = 100_000
    check_against_reference(inputs, SMALL_TUNING, TOLERANCE[torch.float32])


@pytest.mark.parametrize("tuning", [SMALL_TUNING, DEFAULT_TUNING])
def test_num_rows_limits_the_call_to_the_leading_rows(tuning):
    """A captured mixed step: only its leading decodes, counted on the device, are written."""
    inputs = make_inputs(SEQ_LENS, 8, 2, 64, 16, torch.float32, seed=6)
    count = 3
    paged_decode_attention(**inputs, tuning=tuning, num_rows=torch.tensor([count], dtype=torch.int32))
    out = inputs["out"]
    assert out[count:].isnan().all()
    ref = reference_decode_attention(
        inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["block_tables"], inputs["seq_lens"], inputs["scale"]
    )
    assert relative_error(out[1:count], ref[1:count]) < TOLERANCE[torch.float32]
    assert (out[0] == 0).all()  # SEQ_LENS[0] == 0: a padding row
