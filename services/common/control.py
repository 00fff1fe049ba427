"""The control plane's typed messages: what a worker says about itself, its load and its caches.

Three ways out of a worker, one set of structs (msgspec; Ray pickles them, sockets carry msgpack):

    Ray call            info() -> WorkerInfo            once per (re)start: addresses, model facts
                        stats() -> WorkerStats          on demand (/metrics, liveness fallback)
                        kv_events(next_seq) -> KVEventsReply
                                                        a replay after a gap, or a snapshot
                        embedding_cache() -> EmbeddingCacheSnapshot     (encode workers)
    ZeroMQ PUB          the worker's state socket (WorkerInfo.state_address), as things happen:
    (StateCodec)          topic             payload                    when
                          kv-events         KVEventBatch (vLLM's)      each loop turn that changed the cache
                          worker-stats      WorkerStats                on change, at most every ~20 ms,
                                                                       at least every ~1 s (heartbeat)
                          admitted          AdmittedRequest            each GenerateRequest the worker takes
                          embedding-cache   EmbeddingCacheSnapshot     on change, and with each heartbeat
                                                                       (encode workers)

Every message on the state socket is three frames, [topic, seq as 8 bytes big-endian, msgpack
payload]: on the kv-events topic exactly the frames of vLLM's ZmqEventPublisher, so a router that
reads vLLM's KV events subscribes to `kv-events` and reads ours. Each topic numbers its own messages
from 0; only the kv-events numbers matter for correctness (a gap there asks the worker for a replay
over Ray, and they are the numbers KVEventLog and the router's PrefixIndex use).

Every field means something for every role that carries it; a part a role does not have is None
(`WorkerInfo.engine` of an encode worker, `WorkerStats.scheduler` of one, `WorkerStats.encode` of an
engine worker), never zeros that only look like data. Names carry their units (`_tokens`,
`_blocks`, `_bytes`, `_s`); counters are totals since the worker started.

No torch, no zmq: every process may import this, and it is checked by `mypy --strict`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgspec

from services.common.kv_events import KVEventBatch
from services.common.messages import PROTOCOL_VERSION

Stage = Literal["encode", "prefill", "decode", "colocated"]
KVTier = Literal["device", "host"]


# ----------------------------------------------------------------------------------------------
# Who a worker is (info)


class EngineFacts(msgspec.Struct, frozen=True, kw_only=True):
    """An engine worker's model and KV layout, fixed for the life of its process."""

    max_model_len: int  # tokens of context (prompt + output)
    vocab_size: int  # token ids are in [0, vocab_size)
    device: str  # "cpu", "cuda", "cuda:1"
    dtype: str  # the resolved engine dtype: "float32", "bfloat16", ...
    block_size: int  # tokens per KV block
    num_kv_blocks: int  # usable KV blocks on the device (the padding block excluded)


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """How to reach a worker and what it serves. A restarted worker (a new process) has new addresses."""

    name: str
    stage: Stage
    pid: int
    host_id: str  # equal on two workers of one host (services.workers.kv_staging.host_identity)
    # the model as configured: a directory, or a Hub id pinned to a commit ("org/name@<sha>"); serve checks
    # that attached pools serve the same one. Encode workers too: the vision tower comes from the same model
    model_dir: str
    input_address: str  # ZeroMQ PULL: GenerateRequest / EncodeRequest / AbortRequest / KVAck in
    state_address: str  # ZeroMQ PUB: KV events, stats, admitted requests out (module docstring)
    kv_address: str | None = None  # decode workers: ZeroMQ PULL for KV transfers
    embedding_address: str | None = None  # prefill / colocated workers of a vision-language model
    metrics_port: int | None = None  # the worker's own /metrics, when it serves one
    engine: EngineFacts | None = None  # None: an encode worker (a vision tower, no engine)
    num_restarts: int = 0  # Ray restarts of this worker so far (services.workers.restarts)


# ----------------------------------------------------------------------------------------------
# What a worker is doing (stats)


class SecondsHistogramSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """A duration histogram read out the Prometheus way (services.common.histogram.SecondsHistogram)."""

    buckets: list[tuple[float, int]]  # (upper bound s, observations at or below it), ascending, ending at +inf
    sum_s: float

    @property
    def count(self) -> int:
        return self.buckets[-1][1] if self.buckets else 0


class TokensHistogramSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """A token-count histogram read out the Prometheus way (services.common.histogram.TokensHistogram)."""

    buckets: list[tuple[float, int]]  # (upper bound in tokens, observations at or below it), ending at +inf
    sum_tokens: int

    @property
    def count(self) -> int:
        return self.buckets[-1][1] if self.buckets else 0


class CacheConfigInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An engine's KV cache configuration, fixed for the life of its process (vllm:cache_config_info)."""

    block_size: int  # tokens per KV block
    num_gpu_blocks: int  # usable blocks of the device tier (the padding block excluded)
    enable_prefix_caching: bool
    cache_dtype: str  # the KV cache's element type: the engine's resolved dtype ("bfloat16", ...)
    gpu_memory_utilization: float  # the configured share of device memory for weights, activations and KV


class KVTierStats(msgspec.Struct, frozen=True, kw_only=True):
    """One tier of a worker's KV cache, in blocks of `EngineFacts.block_size` tokens."""

    tier: KVTier
    # a new request can take them (cached blocks no request references count as free); the host tier's
    # blocks are never referenced by a request: its free blocks are the slots holding no KV
    num_free_blocks: int
    num_total_blocks: int  # usable blocks of the tier


class StepTiming(msgspec.Struct, frozen=True, array_like=True):
    """How long an engine took for some steps of its own (services.engine.step_timings).

    Usually one step; steps whose tokens were not waited for (prompt chunks that sample nothing) are
    timed with the next one that does, so num_steps may be more. duration_s runs from the launch of
    the first to the end of the last one's sampling; the router fits its prefill-time model on these.
    """

    seq: int  # numbers the engine's timings 0, 1, ... (a reader keeps the ones it has not seen)
    num_steps: int
    num_tokens: int  # tokens computed: prompt chunks and decodes
    num_attention_pairs: int  # sum over the steps' requests of new tokens x context (prefix + new)
    duration_s: float


class FinishedRequestTiming(msgspec.Struct, frozen=True, array_like=True):
    """A request that ended in this engine: its first token's latency, its decode pace, its length."""

    seq: int  # numbers the engine's finished requests 0, 1, ...
    request_id: str  # as the engine knows it (a child of an n > 1 request ends in "#<index>")
    num_output_tokens: int  # tokens it holds at the end (a prefill-only handoff: 1)
    ttft_s: float  # arrival in this engine to its first token collected here
    tpot_s: float  # mean time per output token after the first; 0.0 with fewer than two


class SchedulerStats(msgspec.Struct, frozen=True, kw_only=True):
    """An engine's queues and KV cache (services.engine.LLMEngine.scheduler_stats).

    queued_prefill_tokens is the prefill work the engine has accepted and not done: every token not
    yet computed of the waiting requests and of the running ones still in their prompt (a preempted
    request recomputes prompt and output). A prefix-cache hit found at scheduling time lowers it then.
    """

    num_running_requests: int  # in the running batch (prefilling or decoding)
    num_waiting_requests: int  # queued for the running batch (preempted ones included)
    num_decoding_requests: int  # running requests past their prompt: the decode batch
    queued_prefill_tokens: int
    kv_tiers: list[KVTierStats]  # the device tier first; a host tier may follow
    num_preemptions: int  # total
    prefix_cache_queried_tokens: int  # total prompt tokens looked up in the prefix cache
    prefix_cache_hit_tokens: int  # total of those found there
    # finished requests' phases in this engine (vllm:request_<phase>_time_seconds): "queue" (arrival to
    # first step), "prefill" (first step to first token), "decode" (first token to the end),
    # "inference" (first step to the end)
    phase_seconds: dict[str, SecondsHistogramSnapshot] = msgspec.field(default_factory=dict)
    # tokens scheduled per engine step, prompt chunks and decodes (vllm:iteration_tokens_total)
    iteration_tokens: TokensHistogramSnapshot | None = None
    cache_config: CacheConfigInfo | None = None
    # the engine's latest timings, newest last (a bounded ring: a reader dedups by seq)
    recent_steps: list[StepTiming] = msgspec.field(default_factory=list)
    recent_finished: list[FinishedRequestTiming] = msgspec.field(default_factory=list)
    num_slo_held_admissions: int = 0  # prefill chunks the TPOT SLO held back (total; services.engine.slo_admission)
    # the host KV tier (EngineConfig.kv_offloading_size; all 0 without one), totals: prompt tokens restored
    # from it instead of recomputed, and the KV bytes copied device -> host (evictions) and host -> device
    host_hit_tokens: int = 0
    kv_offloaded_bytes: int = 0
    kv_onloaded_bytes: int = 0

    @property
    def device_kv(self) -> KVTierStats:
        return self.kv_tiers[0]

    @property
    def kv_cache_usage(self) -> float:
        """Fraction (0..1) of the device tier's blocks referenced by requests (vllm:kv_cache_usage_perc)."""
        device = self.device_kv
        return 1.0 - device.num_free_blocks / device.num_total_blocks if device.num_total_blocks else 0.0

    @property
    def host_kv(self) -> KVTierStats | None:
        """The host tier, if the engine has one."""
        return next((tier for tier in self.kv_tiers if tier.tier == "host"), None)

    @property
    def kv_host_usage(self) -> float:
        """Fraction (0..1) of the host tier's blocks holding KV (tristage:kv_host_usage_perc); 0 without one."""
        host = self.host_kv
        return 1.0 - host.num_free_blocks / host.num_total_blocks if host is not None and host.num_total_blocks else 0.0


class TransferCounters(msgspec.Struct, frozen=True, kw_only=True):
    """An engine worker's KV transfers (tristage:kv_transfer_*): sent by prefill, received by decode
    (a colocated worker transfers nothing: its counters stay zero)."""

    bytes_sent: int
    bytes_received: int
    num_transfers_completed: int
    num_failures: int  # refused, timed out, or lease expired
    num_fallbacks: int  # requests a decode worker recomputed instead of importing their KV
    seconds: SecondsHistogramSnapshot  # one request's KV, first byte to acknowledgement
    # of bytes_sent / bytes_received, those staged in shared memory on one host (the rest went as frames)
    bytes_sent_shared_memory: int = 0
    bytes_received_shared_memory: int = 0
    num_staging_waits: int = 0  # transfers that found the prefill worker's staging buffer full and waited

    def bytes_by_path(self) -> list[tuple[str, str, int]]:
        """(end, path, bytes) for tristage:kv_transfer_path_bytes_total: end "sent" or "received",
        path "shared_memory" or "frames"."""
        return [
            ("sent", "shared_memory", self.bytes_sent_shared_memory),
            ("sent", "frames", self.bytes_sent - self.bytes_sent_shared_memory),
            ("received", "shared_memory", self.bytes_received_shared_memory),
            ("received", "frames", self.bytes_received - self.bytes_received_shared_memory),
        ]


class EncodeStats(msgspec.Struct, frozen=True, kw_only=True):
    """An encode worker's queue, vision tower and embedding cache (tristage:encode_* / embedding_*)."""

    num_images_queued: int  # taken off the input socket, waiting for the tower
    num_images_in_flight: int  # in the tower now
    num_requests_received: int  # EncodeRequests taken off the socket, total
    num_requests_aborted: int  # EncodeRequests (or their embeddings) dropped by an abort, total
    num_images_encoded: int  # images run through the tower, total
    num_tower_calls: int
    num_encode_errors: int  # images answered with an error, total
    encode_seconds: SecondsHistogramSnapshot  # one encode call that ran the tower
    embedding_cache_queries: int  # images looked up, total
    embedding_cache_hits: int
    embedding_cache_evictions: int
    embedding_cache_bytes: int  # held now
    embedding_cache_capacity_bytes: int
    embedding_bytes_sent: int  # handed to ZeroMQ for prefill (or colocated) workers, total
    outbox_bytes: int  # encoded, waiting for a destination with room
    # False while the outbox is over budget, or the queue is full of images for destinations that take no
    # more (services.workers.encode_worker): requests then wait in ZeroMQ
    taking_work: bool
    num_requests_given_up: int = 0  # dropped with a destination that took nothing for long, total


class WorkerStats(msgspec.Struct, frozen=True, kw_only=True):
    """One worker's load and counters, as of the moment it was taken.

    Engine workers (prefill, decode, colocated) carry `scheduler` and `transfer`; encode workers
    carry `encode`. `num_running` / `num_waiting` read the role's own queue: requests for an engine,
    images for an encoder.
    """

    name: str
    stage: Stage
    alive: bool  # the worker's loop thread runs
    scheduler: SchedulerStats | None = None
    transfer: TransferCounters | None = None
    encode: EncodeStats | None = None
    # engine workers: the number their next KV event batch will get. On the state socket stats follow
    # every batch numbered below it, so a reader whose next expected batch is lower lost some (the last
    # ones of a burst, or all of them for a reader that joined late) and asks for a replay.
    next_kv_event_seq: int | None = None
    version: int = PROTOCOL_VERSION

    @property
    def num_running(self) -> int:
        if self.scheduler is not None:
            return self.scheduler.num_running_requests
        return self.encode.num_images_in_flight if self.encode is not None else 0

    @property
    def num_waiting(self) -> int:
        if self.scheduler is not None:
            return self.scheduler.num_waiting_requests
        return self.encode.num_images_queued if self.encode is not None else 0


# ----------------------------------------------------------------------------------------------
# What a worker caches (KV events, the embedding cache) and takes (admitted requests)


class KVEventReplay(msgspec.Struct, tag="replay", frozen=True, kw_only=True):
    """The worker's KV event batches from the one asked for on: batch `first_seq + i` is batches[i]."""

    first_seq: int
    batches: list[KVEventBatch]


class KVEventSnapshot(msgspec.Struct, tag="snapshot", frozen=True, kw_only=True):
    """Every block hash cached on the worker, as of its batch `seq` (-1: before its first batch):
    block_hashes on the device, host_block_hashes on its host tier (the blocks its medium="CPU" events
    announce; empty without one). The reader installs it whole, then applies batch seq + 1 on."""

    seq: int
    block_hashes: list[int]
    host_block_hashes: list[int] = msgspec.field(default_factory=list)


# The answer to `kv_events(next_seq)`: a replay when the worker still has batch next_seq in its log,
# else (a new reader, next_seq None, or one that fell behind the log) a snapshot.
KVEventsReply = KVEventReplay | KVEventSnapshot


class EmbeddingCacheSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Every image embedding an encode worker caches, by content hash; `seq` grows with each change."""

    seq: int
    content_hashes: list[str]
    version: int = PROTOCOL_VERSION


class AdmittedRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A worker took a GenerateRequest: what another gateway's router needs to count the placement.

    block_hashes are the prompt's full blocks chained by services.common.block_hash (cache_salt and
    image spans included), the hashes the router matches; reply_to names the gateway that sent it.
    """

    worker: str
    request_id: str
    reply_to: str
    num_prompt_tokens: int
    block_hashes: list[int]
    decode_worker: str | None = None  # disaggregated: the decode worker its KV goes to (its kv_target)
    max_tokens: int | None = None  # as the request asks (None: up to the context length)
    version: int = PROTOCOL_VERSION


# ----------------------------------------------------------------------------------------------
# The state socket's frames


KV_EVENTS_TOPIC = b"kv-events"
STATS_TOPIC = b"worker-stats"
ADMITTED_TOPIC = b"admitted"
EMBEDDING_CACHE_TOPIC = b"embedding-cache"
STATE_TOPICS = (KV_EVENTS_TOPIC, STATS_TOPIC, ADMITTED_TOPIC, EMBEDDING_CACHE_TOPIC)

# The largest payload a reader accepts: a step's KV events, a long prompt's block hashes or a big
# embedding cache's hashes stay far below it (1M block hashes take 9 MiB).
MAX_STATE_PAYLOAD_BYTES = 16 * 2**20
SEQ_BYTES = 8

StateBody = KVEventBatch | WorkerStats | AdmittedRequest | EmbeddingCacheSnapshot


class StateDecodeError(ValueError):
    """Frames that are not a state message (unknown topic, bad sequence number, malformed payload)."""


@dataclass(frozen=True, slots=True)
class StateMessage:
    topic: bytes
    seq: int
    body: StateBody


class StateCodec:
    """Frames of the state socket, both ends: [topic, seq (8 bytes, big-endian), msgpack payload].

    Decoding checks the frame count, the topic, the sequence number's size and the payload's size
    before parsing, parses into the topic's one type (never pickle), and checks the protocol version
    of our own payloads (KVEventBatch is vLLM's shape and has none).
    """

    def __init__(self, max_payload_bytes: int = MAX_STATE_PAYLOAD_BYTES) -> None:
        self.max_payload_bytes = max_payload_bytes
        self._encoder = msgspec.msgpack.Encoder()
        self._decoders: dict[bytes, msgspec.msgpack.Decoder[StateBody]] = {
            KV_EVENTS_TOPIC: msgspec.msgpack.Decoder(KVEventBatch),
            STATS_TOPIC: msgspec.msgpack.Decoder(WorkerStats),
            ADMITTED_TOPIC: msgspec.msgpack.Decoder(AdmittedRequest),
            EMBEDDING_CACHE_TOPIC: msgspec.msgpack.Decoder(EmbeddingCacheSnapshot),
        }

    def encode(self, topic: bytes, seq: int, body: StateBody) -> list[bytes]:
        return [topic, seq.to_bytes(SEQ_BYTES, "big"), self._encoder.encode(body)]

    def decode(self, frames: list[bytes]) -> StateMessage:
        if len(frames) != 3:
            raise StateDecodeError(f"a state message has 3 frames, not {len(frames)}")
        topic, seq_bytes, payload = frames
        decoder = self._decoders.get(topic)
        if decoder is None:
            raise StateDecodeError(f"unknown topic {topic[:64]!r}")
        if len(seq_bytes) != SEQ_BYTES:
            raise StateDecodeError(f"a sequence number of {len(seq_bytes)} bytes, not {SEQ_BYTES}")
        if len(payload) > self.max_payload_bytes:
            raise StateDecodeError(f"a payload of {len(payload)} bytes exceeds the {self.max_payload_bytes}-byte limit")
        try:
            body = decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StateDecodeError(f"malformed {topic.decode()} payload: {exc}") from exc
        version = getattr(body, "version", PROTOCOL_VERSION)
        if version != PROTOCOL_VERSION:
            raise StateDecodeError(f"protocol version {version} is not {PROTOCOL_VERSION}")
        return StateMessage(topic, int.from_bytes(seq_bytes, "big"), body)
