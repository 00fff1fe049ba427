"""KV transfer between a prefill worker and a decode worker: ZeroMQ for control, shared memory or frames for bytes.

    prefill                                         decode
    first token sampled, blocks held (hold_kv)
    KVTransfer (request, layout)  ───────────────▶  check layout, reserve blocks (import_request)
    stage layer groups into host staging (side CUDA stream); once staged, free the GPU blocks
    KVLayers [0, g)   + bytes ─────────────────────▶  write into its own paged cache (import_kv)
    KVLayers [g, 2g)  + bytes ─────────────────────▶  ...
    ...                                              all layers in: commit_import, start decoding
    free staging  ◀──────────────────────────────── KVAck(accepted), once the copies to its GPU are done

The two ends live in services.workers.kv_sender (KVSender) and services.workers.kv_receiver
(KVReceiver); this module holds what both share: the tunables, the counters, the layout check and
the side CUDA stream both copy on.

"+ bytes" is one of two things (services.workers.kv_staging):
  * same host (the decode worker's `host_id` equals ours): a StagingRef into our shared-memory
    staging file; the decode worker copies from that memory straight to its GPU (pinned on both
    sides, so both copies are DMA at PCIe speed and nothing is copied through a socket);
  * otherwise: a raw frame after the msgpack header (never pickled), over `KV_STREAMS` connections
    that take layer groups in turn.
Without room in the staging buffer (or with staging off) a request's groups are copied to the host
and sent as frames at once, and its GPU blocks stay held until the ack.

Failure policy: prefill holds what a request took (GPU blocks until staged, staging until the ack)
no longer than `lease_s`, so a decode worker that never answers cannot pin them. A decode worker
that refuses (no room, layout mismatch, staging file not visible) or whose transfer does not
complete within `timeout_s` recomputes the prompt itself (prompt plus the first token, which is not
streamed again): the client sees one complete stream. A decode worker that could not read the
staging file is sent frames from then on.

Tunables (defaults):
    LAYERS_PER_MESSAGE = 4     layers per KVLayers message
    KV_STREAMS = 4             connections per decode worker for frames
    lease_s = 30.0             longest a prefill worker holds a request's KV without an ack
    timeout_s = 10.0           longest a decode worker waits for a transfer before recomputing
    max_kv_frame_bytes(engine)     largest frame a decode worker's KV socket accepts: what the
                                   model's largest legitimate message needs (see there), not more
    MAX_EARLY_BYTES = 2 GiB    groups a decode worker keeps while their KVTransfer is still on the way
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from services.common.codec import MAX_HEADER_BYTES
from services.common.histogram import SecondsHistogram
from services.common.messages import KVLayout
from services.engine import LLMEngine

LAYERS_PER_MESSAGE = 4
KV_STREAMS = 4
MAX_EARLY_BYTES = 2 * 2**30


@dataclass
class TransferStats:
    """Counters a worker exports (tristage:kv_transfer_* metrics)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    # of those, the bytes that went through shared-memory staging on one host (the rest: frames)
    bytes_sent_shared_memory: int = 0
    bytes_received_shared_memory: int = 0
    transfers_completed: int = 0
    failures: int = 0  # refused, timed out, or lease expired
    fallbacks: int = 0  # decode recomputed the prompt instead
    staging_waits: int = 0  # transfers that found the staging buffer full and waited for room
    seconds: SecondsHistogram = field(default_factory=SecondsHistogram)  # one request's KV, first byte to ack


def engine_layout(engine: LLMEngine, model_name: str) -> KVLayout:
    spec = engine.runner.model.spec
    return KVLayout(
        model=model_name,
        num_layers=spec.num_layers,
        block_size=engine.config.block_size,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        dtype=engine.config.dtype,
    )


def max_kv_frame_bytes(engine: LLMEngine) -> int:
    """The largest frame a KV socket can legitimately carry between two workers of this model (the
    decode worker's ZMQ_MAXMSGSIZE: libzmq checks each frame, and drops a peer that sends a larger one
    before buffering it). The largest of:

        a KVLayers frame   min(LAYERS_PER_MESSAGE, num_layers) layers of one request, each
                           [2, num_blocks, block_size, num_kv_heads, head_dim] in the KV dtype, for a
                           request of max_model_len tokens: num_blocks = ceil(max_model_len / block_size)
        an image frame     one of a KVTransfer's embeddings: its placeholder rows lie inside the context,
                           so at most max_model_len rows of hidden_size in the engine dtype
        a header           any message header: the codec refuses one above MAX_HEADER_BYTES anyway (a
                           KVTransfer's carries up to max_model_len token ids and the request's strings)
    """
    spec, config = engine.runner.model.spec, engine.config
    itemsize = engine.runner.dtype.itemsize
    num_blocks = -(-engine.max_model_len // config.block_size)
    layers_per_frame = min(LAYERS_PER_MESSAGE, spec.num_layers)
    layer_group_bytes = layers_per_frame * 2 * num_blocks * config.block_size * spec.num_kv_heads * spec.head_dim
    image_bytes = engine.max_model_len * spec.hidden_size
    return max(layer_group_bytes * itemsize, image_bytes * itemsize, MAX_HEADER_BYTES)


# ----------------------------------------------------------------------------------------------
# The side stream both ends copy on (None on the CPU, where copies are synchronous)


def side_stream(engine: LLMEngine) -> torch.cuda.Stream | None:
    device = engine.runner.device
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def after_compute(stream: torch.cuda.Stream | None):
    """Run on `stream` after whatever the compute stream already queued: the KV a prefill step wrote,
    or the reads of blocks a decode step may still be running over the blocks a copy overwrites."""
    if stream is None:
        return contextlib.nullcontext()
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    return torch.cuda.stream(stream)


def copies_done(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    """An event for the copies queued so far on `stream` (None: they are done already)."""
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event
