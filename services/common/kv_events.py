"""KV cache events: which worker holds which blocks (the router's only source of truth).

The shapes follow the events vLLM publishes, so routers built for one can read the other. A
worker numbers its event batches; a consumer that sees a gap asks for a replay.
"""

from __future__ import annotations

import msgspec


class BlockStored(msgspec.Struct, tag=True, frozen=True):
    """Full blocks whose KV is now cached, in chain order: block_hashes[0]'s parent is parent_block_hash."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    extra_keys: list[str] = []


class BlockRemoved(msgspec.Struct, tag=True, frozen=True):
    """Cached blocks evicted (their KV is gone)."""

    block_hashes: list[int]


class AllBlocksCleared(msgspec.Struct, tag=True, frozen=True):
    """The whole prefix cache was reset."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
