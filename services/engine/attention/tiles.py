"""Host side of the varlen attention kernel (`triton_varlen`): launch shapes and the tile map.

Plain numpy, no Triton: the model runner builds a step's tile map on any install.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class VarlenTuning:
    block_m: int = 64
    tile_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "tile_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")


DEFAULT_TUNING = VarlenTuning()


def group_rows(num_q_heads: int, num_kv_heads: int) -> int:
    """Rows one token takes in a program: its GQA group, padded to a power of two."""
    return 1 << (num_q_heads // num_kv_heads - 1).bit_length()


def tokens_per_tile(num_q_heads: int, num_kv_heads: int, tuning: VarlenTuning = DEFAULT_TUNING) -> int:
    """BLOCK_Q: query tokens one program covers."""
    return max(1, tuning.block_m // group_rows(num_q_heads, num_kv_heads))


def max_num_tiles(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Bound on the tiles of any step of at most num_tokens tokens over num_seqs sequences:
    each sequence adds at most one partly filled tile."""
    return num_tokens // block_q + num_seqs


def build_tile_map(
    query_start_loc: np.ndarray, first_seq: int, block_q: int, num_tiles: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(tile_seqs, tile_token_starts), int32, for the sequences from `first_seq` on.

    Padded with -1 to `num_tiles` entries when given (a captured graph's fixed grid).
    """
    q_lens = np.diff(query_start_loc[first_seq:])
    counts = -(-q_lens // block_q)
    seqs = np.repeat(np.arange(first_seq, first_seq + len(q_lens)), counts)
    # a tile's index within its sequence: 0, 1, ... restarting at each sequence's first tile
    tile_starts = np.cumsum(counts) - counts
    within = np.arange(len(seqs)) - np.repeat(tile_starts, counts)
    token_starts = query_start_loc[seqs] + within * block_q
    size = len(seqs) if num_tiles is None else num_tiles
    if len(seqs) > size:
        raise ValueError(f"{len(seqs)} tiles do not fit a map of {size}")
    tile_seqs = np.full(size, -1, dtype=np.int32)
    tile_token_starts = np.zeros(size, dtype=np.int32)
    tile_seqs[: len(seqs)] = seqs
    tile_token_starts[: len(seqs)] = token_starts
    return tile_seqs, tile_token_starts
