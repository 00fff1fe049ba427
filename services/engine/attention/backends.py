"""Attention over the paged KV cache: the plain-torch reference and the fast GPU path.

The cache is one tensor per engine, `[num_layers, 2 (k|v), num_blocks, block_size, num_kv_heads,
head_dim]`; token t of a sequence lives at block `block_table[t // block_size]`, row
`t % block_size`, so its flat slot is `block_id * block_size + t % block_size`.

A step's tokens are flat and ordered by sequence, decodes (one query token each) first:

    tokens:  | d0 | d1 | d2 | p0 p0 p0 p0 | p1 p1 ... |
    seqs:    |<- num_decode_seqs ->|<- prefill chunks ->|

Each layer first writes all of the step's K/V into the cache, then attends. So a sequence may read
blocks another sequence of the same step writes (a prefix-cache hit on a block being computed).

Backends (chosen by `EngineConfig.attention_backend`):
  * `reference`: every sequence gathered and attended in plain torch, the way transformers' eager
    attention computes (scores in the model dtype, softmax in float32). CPU and GPU.
  * `triton`: decodes by the Triton paged-decode kernel (split-K); prefill chunks by the varlen
    Triton kernel in one launch when the metadata carries its inputs (`varlen`; in a captured mixed
    step the number of decodes is a device value), else one `scaled_dot_product_attention` call per
    chunk (fused flash / cuDNN kernels). GPU; checked against `reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64, flat cache slot of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    num_decode_seqs: int  # leading sequences with exactly one query token
    query_start_loc: list[int]  # host, [num_seqs + 1], offsets of each sequence's tokens
    seq_lens_host: list[int]
    max_seq_len: int  # bound on seq_lens (fixed for CUDA graphs: it sizes the decode grid)
    # The varlen kernel's inputs (triton backend): every sequence from num_decode_seqs on, one launch.
    # None: the prefill chunks go through one SDPA call each.
    varlen: VarlenInputs | None = None


@dataclass
class VarlenInputs:
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, on the device
    tile_seqs: torch.Tensor  # [num_tiles] int32 (triton_varlen.build_tile_map), -1 past the step's tiles
    tile_token_starts: torch.Tensor  # [num_tiles] int32
    zero_fill: bool = False  # tokens outside every sequence (a graph's padding) get zeros, not garbage
    # A captured mixed step: its leading decodes go to the decode kernel over the first `decode_rows`
    # rows, limited on the device to `num_decode_seqs` ([1] int32); the tile map starts after them.
    decode_rows: int = 0
    num_decode_seqs: torch.Tensor | None = None


class PagedAttention:
    """Base: owns the cache tensor and this step's metadata; subclasses implement `_attend`."""

    def __init__(self, kv_cache: torch.Tensor, scale: float) -> None:
        self.kv_cache = kv_cache  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        self.scale = scale
        self.block_size = kv_cache.shape[3]
        self.metadata: AttentionMetadata | None = None

    def forward(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim] -> like q."""
        meta = self.metadata
        assert meta is not None, "set metadata before the forward pass"
        k_cache, v_cache = self.kv_cache[layer_index]  # each [num_blocks, block_size, num_kv_heads, head_dim]
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        return self._attend(q, k, v, k_cache, v_cache, meta)

    def _attend(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len tokens of one sequence: [seq_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = cache[block_table[:num_blocks].long()]  # [num_blocks, block_size, heads, dim]
    return blocks.reshape(-1, cache.shape[2], cache.shape[3])[:seq_len]


class ReferenceAttention(PagedAttention):
    def _attend(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        for i, seq_len in enumerate(meta.seq_lens_host):
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            keys = gather_kv(k_cache, meta.block_tables[i], seq_len)
            values = gather_kv(v_cache, meta.block_tables[i], seq_len)
            out[start:end] = reference_attention(q[start:end], keys, values, self.scale)
        return out


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last len(q) positions over all len(k) positions, as eager transformers does.

    q: [num_queries, num_heads, head_dim]; k, v: [seq_len, num_kv_heads, head_dim].
    """
    num_queries, num_heads = q.shape[0], q.shape[1]
    seq_len, num_kv_heads = k.shape[0], k.shape[1]
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [heads, num_queries, seq_len]
    query_pos = torch.arange(seq_len - num_queries, seq_len, device=q.device)[:, None]
    key_pos = torch.arange(seq_len, device=q.device)[None, :]
    scores = scores.masked_fill(key_pos > query_pos, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("hqk,khd->qhd", probs, v)


class TritonAttention(PagedAttention):
    """GPU fast path. Decodes: Triton paged kernel. Prefill chunks: SDPA's fused kernels."""

    # Few sequences leave most SMs idle with 512-token partitions: split them finer (measured on an
    # H100 at batch 1, 1k context: 13 us -> 6 us per layer). Many sequences fill the GPU anyway.
    SMALL_BATCH_SEQS = 16
    SMALL_BATCH_PARTITION_TOKENS = 128

    def __init__(self, kv_cache: torch.Tensor, scale: float) -> None:
        super().__init__(kv_cache, scale)
        from services.engine.attention import triton_decode, triton_varlen

        self._decode = triton_decode.paged_decode_attention
        self._varlen = triton_varlen.varlen_paged_attention
        self._small_batch_tuning = triton_decode.DecodeTuning(partition_size=self.SMALL_BATCH_PARTITION_TOKENS)
        self._default_tuning = triton_decode.DEFAULT_TUNING

    def _attend(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        varlen = meta.varlen
        out = torch.zeros_like(q) if varlen is not None and varlen.zero_fill else torch.empty_like(q)
        nd = meta.num_decode_seqs
        if nd:
            tuning = self._small_batch_tuning if nd <= self.SMALL_BATCH_SEQS else self._default_tuning
            self._decode(
                q[:nd],
                k_cache,
                v_cache,
                meta.block_tables[:nd],
                meta.seq_lens[:nd],
                self.scale,
                out[:nd],
                meta.max_seq_len,
                tuning=tuning,
            )
        if varlen is not None:
            if varlen.num_decode_seqs is not None and varlen.decode_rows:
                rows = varlen.decode_rows
                self._decode(
                    q[:rows],
                    k_cache,
                    v_cache,
                    meta.block_tables[:rows],
                    meta.seq_lens[:rows],
                    self.scale,
                    out[:rows],
                    meta.max_seq_len,
                    tuning=self._default_tuning,
                    num_rows=varlen.num_decode_seqs,
                )
            self._varlen(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.seq_lens,
                varlen.query_start_loc,
                varlen.tile_seqs,
                varlen.tile_token_starts,
                self.scale,
                out,
            )
            return out
        for i in range(nd, len(meta.seq_lens_host)):
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            seq_len = meta.seq_lens_host[i]
            if end - start == seq_len:  # no cached prefix: the fresh K/V are the whole context
                keys, values = k[start:end], v[start:end]
            else:
                keys = gather_kv(k_cache, meta.block_tables[i], seq_len)
                values = gather_kv(v_cache, meta.block_tables[i], seq_len)
            out[start:end] = sdpa_causal(q[start:end], keys, values, self.scale)
        return out


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Bottom-right-aligned causal attention through SDPA; shapes as in reference_attention."""
    num_queries, seq_len = q.shape[0], k.shape[0]
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, heads, len, dim]
    if num_queries == seq_len:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
    else:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(num_queries, seq_len)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


BACKENDS: dict[str, type[PagedAttention]] = {"reference": ReferenceAttention, "triton": TritonAttention}


def create_attention(name: str, kv_cache: torch.Tensor, scale: float) -> PagedAttention:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name](kv_cache, scale)
