"""Multimodal rotary positions (M-RoPE, Qwen2-VL and Qwen2.5-VL) from token ids and image grids alone.

Every token gets three position components (temporal, height, width). Text tokens advance all three
together; an image's tokens, a (t, h, w) grid of merged patches, share one starting position `s` and
take s + their coordinates; the text after the image resumes at s + max(t, h, w):

    tokens:     T T  [img 2x3 grid]   T  T
    temporal:   0 1  2 2 2 2 2 2      5  6
    height:     0 1  2 2 2 3 3 3      5  6
    width:      0 1  2 3 4 2 3 4      5  6

Positions past the prompt (the output) continue as p + delta in all three components, with
delta = max position + 1 - num_prompt_tokens (<= 0), so a decode step is plain rotary at p + delta.

This is transformers' `get_rope_index` for images (grid t is 1 for a still image, so the temporal
spacing of videos does not arise). It needs no pixels: the gateway, encode workers and the engine
can all compute it from the expanded token ids and each image's `image_grid_thw`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from services.engine.multimodal.inputs import find_placeholder_runs

GridTHW = tuple[int, int, int]  # patches along time, height, width (before the spatial merge)


def num_merged_tokens(grid_thw: Sequence[int], spatial_merge_size: int) -> int:
    """Placeholder tokens of an image whose patch grid is `grid_thw`."""
    t, h, w = grid_thw
    return t * (h // spatial_merge_size) * (w // spatial_merge_size)


def compute_mrope_positions(
    token_ids: Sequence[int], image_grid_thw: Sequence[GridTHW], *, image_token_id: int, spatial_merge_size: int
) -> tuple[torch.Tensor, int]:
    """(positions [3, num_tokens] int64, delta) of a prompt whose images have these patch grids, in order.

    Raises InvalidRequestError when the prompt's image tokens do not match the grids.
    """
    lengths = [num_merged_tokens(g, spatial_merge_size) for g in image_grid_thw]
    runs = find_placeholder_runs(token_ids, image_token_id, lengths)
    num_tokens = len(token_ids)
    positions = np.empty((3, num_tokens), dtype=np.int64)
    next_position, cursor = 0, 0  # next text position; first token not yet placed
    for (offset, length), (t, h, w) in zip(runs, image_grid_thw):
        positions[:, cursor:offset] = next_position + np.arange(offset - cursor)
        next_position += offset - cursor
        grid = (t, h // spatial_merge_size, w // spatial_merge_size)
        positions[:, offset : offset + length] = next_position + np.indices(grid).reshape(3, length)
        next_position += max(grid)
        cursor = offset + length
    positions[:, cursor:] = next_position + np.arange(num_tokens - cursor)
    delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return torch.from_numpy(positions), delta
