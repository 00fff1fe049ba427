"""What the engine consumes for an image request: already-computed embeddings placed on the prompt.

An image occupies a run of `length` placeholder tokens (the model's image token) at `offset` in the
prompt; its embedding has one row per placeholder token, and the language model reads row i in place
of the token embedding at prompt position `offset + i`:

    prompt:      | text ... | img img img img | text ... | img img | text |
    features:               ^offset=5, length=4           ^offset=12, length=2

A step that computes prompt positions [start, end) takes, from each image overlapping that range,
only the rows of the overlap (`MultiModalInputs.rows_in`), so chunked prefill may cut an image and a
prefix-cache hit may cover part of one.

Qwen2-VL also carries its M-RoPE positions for the whole prompt ([3, num_prompt_tokens]) and the delta
that continues them: a token at position p >= num_prompt_tokens (the output) rotates at p + delta in
all three components.

Invariant checked by `check_multimodal_inputs` before a request is queued: the features are ordered,
disjoint, inside the prompt, cover exactly the prompt's image tokens, and each has `length` rows of
the LM's hidden size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from services.common.block_hash import MultiModalSpan
from services.common.errors import InvalidRequestError
from services.engine.multimodal.spec import VisionLanguageSpec

PARAM = "multi_modal_data"  # the request field errors name


@dataclass(frozen=True)
class MultiModalFeature:
    """One image as the language model consumes it."""

    content_hash: str  # identifies the image's content (prefix caching keys on it)
    offset: int  # prompt position of its first placeholder token
    length: int  # placeholder tokens = embedding rows
    embeddings: torch.Tensor  # [length, lm_hidden_size]

    @property
    def span(self) -> MultiModalSpan:
        return MultiModalSpan(self.content_hash, self.offset, self.length)

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class MultiModalInputs:
    """A request's images (ordered by offset) and, for M-RoPE models, its rotary positions."""

    features: tuple[MultiModalFeature, ...]
    mrope_positions: torch.Tensor | None = None  # [3, num_prompt_tokens] int64 on the CPU; None: LLaVA
    mrope_delta: int = 0  # output token at position p rotates at p + mrope_delta (M-RoPE only)

    @property
    def spans(self) -> tuple[MultiModalSpan, ...]:
        return tuple(f.span for f in self.features)

    def to(self, device: torch.device, dtype: torch.dtype) -> MultiModalInputs:
        """Embeddings moved to where the model runs (positions stay on the CPU: the runner slices them there)."""
        features = tuple(replace(f, embeddings=f.embeddings.to(device=device, dtype=dtype)) for f in self.features)
        positions = None if self.mrope_positions is None else self.mrope_positions.to("cpu", torch.int64)
        return replace(self, features=features, mrope_positions=positions)

    def rows_in(self, start: int, end: int) -> list[tuple[int, torch.Tensor]]:
        """For prompt positions [start, end): (first position, its embedding rows) of each image overlap."""
        overlaps = []
        for f in self.features:
            lo, hi = max(start, f.offset), min(end, f.end)
            if lo < hi:
                overlaps.append((lo, f.embeddings[lo - f.offset : hi - f.offset]))
        return overlaps


def find_placeholder_runs(
    token_ids: Sequence[int], image_token_id: int, lengths: Sequence[int]
) -> list[tuple[int, int]]:
    """(offset, length) of each image's placeholder run, given how many tokens each image takes.

    The image tokens are assigned to images in order, `lengths[i]` to image i, so adjacent images whose
    runs touch are still told apart. Raises InvalidRequestError when the counts disagree or a run is
    interrupted by other tokens.
    """
    positions = [i for i, t in enumerate(token_ids) if t == image_token_id]
    if len(positions) != sum(lengths):
        raise InvalidRequestError(
            f"the prompt has {len(positions)} image placeholder tokens but its {len(lengths)} image(s) need "
            f"{sum(lengths)}",
            param=PARAM,
        )
    runs, cursor = [], 0
    for index, length in enumerate(lengths):
        if length < 1:
            raise InvalidRequestError(f"image {index + 1} takes no placeholder tokens", param=PARAM)
        run = positions[cursor : cursor + length]
        if run[-1] - run[0] != length - 1:
            raise InvalidRequestError(f"the placeholder tokens of image {index + 1} are not contiguous", param=PARAM)
        runs.append((run[0], length))
        cursor += length
    return runs


def check_multimodal_inputs(
    inputs: MultiModalInputs | None,
    token_ids: Sequence[int],
    spec: VisionLanguageSpec | None,
    hidden_size: int,
    max_model_len: int,
) -> None:
    """Raise InvalidRequestError unless `inputs` fit this prompt and this model (see the module invariant).

    M-RoPE positions must index the rotary tables: in [0, max_model_len), and the delta must keep every
    later position there too (it is never positive: images take fewer positions than tokens).
    """
    if spec is None:
        if inputs is not None and inputs.features:
            raise InvalidRequestError("this model takes no images (it is a text-only model)", param=PARAM)
        return
    features = inputs.features if inputs is not None else ()
    runs = find_placeholder_runs(token_ids, spec.image_token_id, [f.length for f in features])
    for index, (feature, (offset, _)) in enumerate(zip(features, runs)):
        if feature.offset != offset:
            raise InvalidRequestError(
                f"image {index + 1} is placed at prompt position {feature.offset} but its placeholder tokens "
                f"start at {offset}",
                param=PARAM,
            )
        if (
            tuple(feature.embeddings.shape) != (feature.length, hidden_size)
            or not feature.embeddings.is_floating_point()
        ):
            raise InvalidRequestError(
                f"image {index + 1} has embeddings of shape {tuple(feature.embeddings.shape)}; this model needs "
                f"({feature.length}, {hidden_size}) floats",
                param=PARAM,
            )
    if inputs is not None and features:
        _check_mrope(inputs, len(token_ids), spec, max_model_len)


def _check_mrope(
    inputs: MultiModalInputs, num_prompt_tokens: int, spec: VisionLanguageSpec, max_model_len: int
) -> None:
    positions = inputs.mrope_positions
    if not spec.uses_mrope:
        if positions is not None or inputs.mrope_delta:
            raise InvalidRequestError("this model uses no M-RoPE positions", param=PARAM)
        return
    if positions is None:
        raise InvalidRequestError("this model needs the M-RoPE positions of an image prompt", param=PARAM)
    if tuple(positions.shape) != (3, num_prompt_tokens) or positions.is_floating_point():
        raise InvalidRequestError(
            f"M-RoPE positions must be integers of shape (3, {num_prompt_tokens}), got {tuple(positions.shape)}",
            param=PARAM,
        )
    if int(positions.min()) < 0 or int(positions.max()) >= max_model_len:
        raise InvalidRequestError(f"M-RoPE positions must lie in [0, {max_model_len})", param=PARAM)
    if not -num_prompt_tokens <= inputs.mrope_delta <= 0:
        raise InvalidRequestError(
            f"an M-RoPE delta of {inputs.mrope_delta} is out of range [{-num_prompt_tokens}, 0]", param=PARAM
        )
