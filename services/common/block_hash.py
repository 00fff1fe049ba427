"""Chained block hashes: the one definition of "the same KV block" for engine and router alike.

A request's tokens are cut into full blocks of `block_size` tokens. Block i's hash covers its
parent's hash, its own token ids and its extra keys, so equal hashes mean equal prefixes:

    tokens:  | block 0          | block 1          | block 2   (partial: never hashed)
    hash:      h0 = H(SEED, t0, x0)  h1 = H(h0, t1, x1)

Extra keys keep apart blocks whose token ids agree but whose KV must not be shared:
  * a `cache_salt` (tenants that must not share cache) enters block 0's keys, and so every
    descendant through the chain;
  * image content hashes enter the keys of every block that overlaps the image's placeholder
    tokens, with the placeholder's offset, so the same placeholder text with different images
    never shares KV.

Hashes are 64-bit integers from BLAKE2b over a canonical byte encoding, identical in every
process and on every host (Python's `hash()` is salted per process, so it is never used).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

# Parent of block 0. Any fixed value works; it only has to be the same everywhere.
ROOT_PARENT_HASH = 0

ExtraKey = str | int | bytes


@dataclass(frozen=True)
class MultiModalSpan:
    """An image (or other item) whose embedding replaces `length` placeholder tokens at `offset`."""

    content_hash: str
    offset: int
    length: int


def hash_block_tokens(parent_hash: int, token_ids: Sequence[int], extra_keys: Sequence[ExtraKey] = ()) -> int:
    """Hash of one full block given its parent's hash (ROOT_PARENT_HASH for block 0)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<Q", parent_hash))
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    for key in extra_keys:
        h.update(_encode_extra_key(key))
    return int.from_bytes(h.digest(), "little")


def block_extra_keys(
    block_index: int,
    block_size: int,
    cache_salt: str | None = None,
    mm_spans: Sequence[MultiModalSpan] = (),
) -> tuple[ExtraKey, ...]:
    """Extra keys of block `block_index`: the salt on block 0, then overlapping images."""
    keys: list[ExtraKey] = []
    if block_index == 0 and cache_salt:
        keys.append("salt:" + cache_salt)
    start, end = block_index * block_size, (block_index + 1) * block_size
    for span in mm_spans:
        if span.offset < end and start < span.offset + span.length:
            keys.append(f"mm:{span.content_hash}:{span.offset}")
    return tuple(keys)


def hash_request_blocks(
    token_ids: Sequence[int],
    block_size: int,
    cache_salt: str | None = None,
    mm_spans: Sequence[MultiModalSpan] = (),
    known_hashes: Sequence[int] = (),
) -> list[int]:
    """Hashes of every full block of `token_ids`.

    `known_hashes` are hashes already computed for the leading blocks (they are reused, so a
    growing request only hashes its new blocks).
    """
    hashes = list(known_hashes)
    num_full_blocks = len(token_ids) // block_size
    parent = hashes[-1] if hashes else ROOT_PARENT_HASH
    for i in range(len(hashes), num_full_blocks):
        block = token_ids[i * block_size : (i + 1) * block_size]
        parent = hash_block_tokens(parent, block, block_extra_keys(i, block_size, cache_salt, mm_spans))
        hashes.append(parent)
    return hashes


def _encode_extra_key(key: ExtraKey) -> bytes:
    if isinstance(key, bytes):
        return b"b" + struct.pack("<I", len(key)) + key
    if isinstance(key, int):
        return b"i" + struct.pack("<q", key)
    data = key.encode("utf-8")
    return b"s" + struct.pack("<I", len(data)) + data
