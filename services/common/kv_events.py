"""KV cache events: which worker holds which blocks (the router's only source of truth).

The wire shape is vLLM's (vllm/distributed/kv_events.py), so routers built for vLLM's KV events
(llm-d's KV-cache indexer, Dynamo's KV router) can read a tristage worker's stream:

    ZeroMQ PUB multipart  [topic, seq (8 bytes, big-endian), msgpack(KVEventBatch)]
    KVEventBatch          [ts, [event, ...], data_parallel_rank]               an array
    event                 {"type": "BlockStored", "block_hashes": [...], ...}  a map, tagged

Events are tagged maps, as vLLM publishes them since its PR #42892 (before it, tagged arrays; the
consumers above read both); the batch stays an array. Every field vLLM declares without a default
(lora_id, medium, lora_name) is always written, null here, so vLLM's own msgspec types decode ours;
fields it added later with defaults (group_idx, kv_cache_spec_kind, ...) are left out and read as
their defaults. Block hashes are unsigned 64-bit integers (services.common.block_hash).

A worker numbers its batches (the `seq` frame); a consumer that sees a gap asks for a replay
(services.common.control.KVEventsReply).
"""

from __future__ import annotations

import msgspec


class BlockStored(msgspec.Struct, tag=True, frozen=True):
    """Full blocks whose KV is now cached, in chain order: block_hashes[0]'s parent is parent_block_hash."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None  # the cache tier; None: the worker's device (vLLM says "GPU"), "CPU": host memory
    lora_name: str | None = None
    # per block of block_hashes, the extra keys its hash covers (cache salt, images), or None for none
    extra_keys: list[list[str] | None] | None = None


class BlockRemoved(msgspec.Struct, tag=True, frozen=True):
    """Cached blocks evicted (their KV is gone)."""

    block_hashes: list[int]
    medium: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, frozen=True):
    """The whole prefix cache was reset."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True):
    """The events of one worker loop turn, as vLLM batches them: `ts` in seconds since the epoch."""

    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None  # vLLM's; null here (one engine per worker)
