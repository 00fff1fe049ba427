"""A prefill worker's image embeddings, held from their arrival until the request that needs them starts.

    encoder ──ImageEmbedding──▶ embeddings[(request id, content hash)]
    gateway ──GenerateRequest (images)──▶ parked until every image's embedding is in
    all in: MultiModalInputs (with M-RoPE positions for Qwen2-VL) -> engine.add_request; entries dropped

The two arrive in either order (separate senders). Embeddings are kept only until consumed, and both
sides are bounded: `capacity_bytes` for embeddings (the worker stops draining its embedding socket
while full, which holds the encoders back), `timeout_s` for a parked request or an unclaimed
embedding (then the request fails, or the embedding is dropped).

Tunables (defaults): capacity_bytes = 1 GiB, timeout_s = 60 s.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.common.messages import GenerateRequest, ImageRef
from services.engine.multimodal import MultiModalFeature, MultiModalInputs, compute_mrope_positions
from services.engine.multimodal.spec import VisionLanguageSpec


@dataclass
class _Parked:
    message: GenerateRequest
    deadline: float  # monotonic


class MultiModalInbox:
    def __init__(self, spec: VisionLanguageSpec | None, capacity_bytes: int = 2**30, timeout_s: float = 60.0) -> None:
        self.spec = spec
        self.capacity_bytes = capacity_bytes
        self.timeout_s = timeout_s
        self._embeddings: dict[tuple[str, str], tuple[torch.Tensor, float]] = {}  # -> (rows, deadline)
        self._parked: dict[str, _Parked] = {}
        self.num_bytes = 0

    @property
    def has_room(self) -> bool:
        return self.num_bytes < self.capacity_bytes

    @property
    def num_pending(self) -> int:
        return len(self._parked) + len(self._embeddings)

    def add_embedding(self, request_id: str, content_hash: str, rows: torch.Tensor) -> bool:
        """Hold an image's rows for its request; True when they complete a parked request (take_ready's next)."""
        key = (request_id, content_hash)
        if key in self._embeddings:
            return False
        self._embeddings[key] = (rows, time.monotonic() + self.timeout_s)
        self.num_bytes += rows.numel() * rows.element_size()
        parked = self._parked.get(request_id)
        return parked is not None and self._complete(request_id, parked.message)

    def park(self, message: GenerateRequest) -> None:
        self._parked[message.request_id] = _Parked(message, time.monotonic() + self.timeout_s)

    def num_prompt_tokens(self, request_id: str) -> int:
        """A parked request's prompt length (0 for one not parked here)."""
        parked = self._parked.get(request_id)
        return len(parked.message.prompt_token_ids) if parked is not None else 0

    def parked(self, request_id: str) -> GenerateRequest | None:
        """The request, while it waits here for its embeddings."""
        parked = self._parked.get(request_id)
        return parked.message if parked is not None else None

    def take_ready(self) -> list[tuple[GenerateRequest, MultiModalInputs]]:
        """Parked requests whose every embedding has arrived, with their inputs (their entries leave)."""
        ready = []
        for request_id, parked in list(self._parked.items()):
            refs = parked.message.images
            if self._complete(request_id, parked.message):
                del self._parked[request_id]
                rows = [self._take(request_id, ref.content_hash) for ref in refs]
                ready.append((parked.message, self.inputs(parked.message.prompt_token_ids, refs, rows)))
        return ready

    def drop(self, request_id: str) -> None:
        self._parked.pop(request_id, None)
        for key in [k for k in self._embeddings if k[0] == request_id]:
            self._take(*key)

    def expire(self) -> list[GenerateRequest]:
        """Parked requests that waited too long (the caller fails them); stale embeddings are dropped."""
        now = time.monotonic()
        for key in [k for k, (_, deadline) in self._embeddings.items() if deadline < now]:
            self._take(*key)
        late = [p.message for p in self._parked.values() if p.deadline < now]
        for message in late:
            self.drop(message.request_id)
        return late

    def inputs(
        self, token_ids: Sequence[int], refs: Sequence[ImageRef], rows: Sequence[torch.Tensor]
    ) -> MultiModalInputs:
        """The engine's view of a prompt's images (M-RoPE positions computed here for Qwen2-VL)."""
        features = tuple(MultiModalFeature(ref.content_hash, ref.offset, ref.length, r) for ref, r in zip(refs, rows))
        if self.spec is None or not self.spec.uses_mrope:
            return MultiModalInputs(features)
        grids = [ref.grid_thw for ref in refs if ref.grid_thw is not None]
        positions, delta = compute_mrope_positions(
            token_ids, grids, image_token_id=self.spec.image_token_id, spatial_merge_size=self.spec.spatial_merge_size
        )
        return MultiModalInputs(features, positions, delta)

    def _complete(self, request_id: str, message: GenerateRequest) -> bool:
        return all((request_id, ref.content_hash) in self._embeddings for ref in message.images)

    def _take(self, request_id: str, content_hash: str) -> torch.Tensor:
        rows, _ = self._embeddings.pop((request_id, content_hash))
        self.num_bytes -= rows.numel() * rows.element_size()
        return rows
