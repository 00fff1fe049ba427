"""Embedding-cache events: which encode worker holds which image embedding.

An encode worker keeps image embeddings keyed by the image's content hash (the same hex string the
gateway computes and puts in the block hashes' extra keys). It publishes these events in numbered
batches under the same discipline as KV events (services.common.kv_events): batch `seq` follows
`seq - 1`, a gap asks for a replay of the full state.

These are separate structs rather than reused BlockStored / BlockRemoved shapes: an embedding is
keyed by a string content hash, has no parent and no tokens, so the KV shapes would carry fields
that mean nothing here.
"""

from __future__ import annotations

import msgspec


class EmbeddingStored(msgspec.Struct, tag=True, frozen=True):
    """Embeddings now cached on the worker, by image content hash."""

    content_hashes: list[str]


class EmbeddingRemoved(msgspec.Struct, tag=True, frozen=True):
    """Embeddings evicted from the worker's cache."""

    content_hashes: list[str]


class AllEmbeddingsCleared(msgspec.Struct, tag=True, frozen=True):
    """The worker's whole embedding cache was reset."""


EmbeddingEvent = EmbeddingStored | EmbeddingRemoved | AllEmbeddingsCleared
