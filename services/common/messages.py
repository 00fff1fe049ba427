"""Typed messages between processes, in one place.

Every message is a msgspec Struct sent as one msgpack header frame (tensors, where a message has
them, follow as raw frames; see services.common.codec). Each carries the protocol version and a
request id. Nothing received from a socket is ever unpickled.

Gateway -> encoder: EncodeRequest (one image: its encoded bytes as one raw frame)
Encoder -> prefill: ImageEmbedding (one image's embedding rows as one raw frame)
Gateway -> worker:  GenerateRequest, AbortRequest
Worker -> gateway:  OutputBatch of RequestDelta / RequestError (one batch per engine step)
Prefill -> decode:  KVTransfer (the request to go on with and the KV layout), then KVLayers (header + one raw
                    frame per layer group, or a shared-memory reference on one host) until every
                    layer is sent
Decode -> prefill:  KVAck (the KV is in place, or refused: prefill may free its blocks)

Four of these name an address the receiver connects to (GenerateRequest.reply_to, KVTarget.kv_address,
KVTransfer.ack_to, EncodeRequest.deliver_to). A worker connects only to addresses a gateway registered
with it over Ray (DataPlanePeers, a Ray call: the control plane is authenticated, the data plane may
not be); a message naming any other is dropped, never followed.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

PROTOCOL_VERSION = 2  # 2: KVTransfer carries the GenerateRequest it resumes


class StructuredSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A constraint on a request's output, compiled by the engine (services.engine.structured).

    kind: "json" (value: a JSON schema, as JSON text), "json_object" (any JSON object; value unused),
    "regex" (value: a regular expression the whole output matches), "choice" (value: a JSON list of
    strings, one of which is the whole output) or "grammar" (value: a Lark grammar, llguidance's
    dialect). The gateway checks that it compiles before the request reaches any worker.
    """

    kind: str
    value: str = ""


class SamplingSpec(msgspec.Struct, frozen=True, kw_only=True):
    """The wire form of services.engine.SamplingParams (same fields, same defaults)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    structured: StructuredSpec | None = None


class KVTarget(msgspec.Struct, frozen=True, kw_only=True):
    """Where a prefill worker sends a request's KV: the chosen decode worker."""

    worker: str
    kv_address: str
    # the decode worker's host (services.workers.kv_staging.host_identity): equal to the prefill
    # worker's, the KV bytes stay in shared memory and only references cross the socket
    host_id: str = ""


class DataPlanePeers(msgspec.Struct, frozen=True, kw_only=True):
    """What one gateway registers with every worker over Ray (services.workers.peers.PeerRegistry): the
    addresses a worker may connect to on the data plane, as the gateway's WorkerInfo list has them.
    Sent again whenever a worker's addresses change (Ray restarted it), so a worker always knows its
    peers' current processes."""

    reply_address: str  # this gateway's results socket: GenerateRequest.reply_to
    input_addresses: list[str] = []  # engine workers' input sockets: KVTransfer.ack_to (prefill's)
    kv_addresses: list[str] = []  # decode workers' KV sockets: KVTarget.kv_address
    embedding_addresses: list[str] = []  # prefill / colocated embedding sockets: EncodeRequest.deliver_to


class ImageRef(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """An image of a prompt: its content hash and the placeholder run its embedding rows fill."""

    content_hash: str  # BLAKE2b-128 hex of the image's encoded bytes (services.common.images)
    offset: int  # first placeholder token
    length: int  # placeholder tokens = embedding rows
    grid_thw: tuple[int, int, int] | None = None  # Qwen2-VL patch grid (M-RoPE positions); None for LLaVA


class EncodeRequest(msgspec.Struct, tag="encode", tag_field="kind", kw_only=True):
    """Encode one image (the next frame: its encoded bytes, already checked by the gateway) and send its
    embedding to `deliver_to`, a prefill (or colocated) worker's embedding socket."""

    request_id: str
    image: ImageRef
    deliver_to: str
    version: int = PROTOCOL_VERSION


class ImageEmbedding(msgspec.Struct, tag="embedding", tag_field="kind", kw_only=True):
    """One image's embedding rows for a request; the next frame holds [num_rows, hidden_size] in `dtype`."""

    request_id: str
    content_hash: str
    num_rows: int
    hidden_size: int
    dtype: str
    error: str | None = None  # the encoder could not encode it (no frame follows): fail the request
    # the encoder's own durations for this image (its clock only; 0.0 from an encoder that does not say):
    # receipt -> its batch started, its decode and preprocessing (0 on a cache hit), and the rest of its
    # batch (waiting behind the batch ahead, the tower) until its rows were ready to send
    encoder_queue_s: float = 0.0
    decode_s: float = 0.0
    encode_s: float = 0.0
    version: int = PROTOCOL_VERSION


class GenerateRequest(msgspec.Struct, tag="generate", tag_field="kind", kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    reply_to: str  # address of the output socket the worker streams this request's tokens to
    cache_salt: str | None = None
    # disaggregated: the worker computes the prompt and the first token, then ships the KV here
    kv_target: KVTarget | None = None
    # tokens already produced elsewhere (a fallback or migration resumes after them)
    output_token_ids: list[int] = []
    # a vision-language prompt's images, in prompt order: their embeddings arrive as ImageEmbedding
    # messages from the encoders the gateway chose
    images: list[ImageRef] = []
    version: int = PROTOCOL_VERSION

    def resume_after(self, output_token_ids: Sequence[int]) -> GenerateRequest:
        """This request as another worker goes on with it, after `output_token_ids`: every token the
        client already has, counted from the first. The one way a request is resumed elsewhere: a
        decode worker taking over from prefill (with or without its KV), or a migration off a dead
        worker. It computes prompt plus those tokens and hands off nothing."""
        return msgspec.structs.replace(self, output_token_ids=list(output_token_ids), kv_target=None)


class AbortRequest(msgspec.Struct, tag="abort", tag_field="kind", kw_only=True):
    request_id: str
    version: int = PROTOCOL_VERSION


class KVLayout(msgspec.Struct, frozen=True, kw_only=True):
    """What both ends of a KV transfer must agree on; checked before any byte is written."""

    model: str
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str


class KVTransfer(msgspec.Struct, tag="kv_transfer", tag_field="kind", kw_only=True):
    """Opens a transfer: the decode worker reserves blocks for the prompt's KV, then goes on with
    `request` (GenerateRequest.resume_after: its output tokens are the ones prefill sampled, already
    streamed), with this KV or, if the transfer fails, by recomputing it.

    A vision-language prompt's images: their embeddings follow this header as raw frames, one per
    image of `request.images` ([length, hidden] in the layout's dtype), for the decode side's block
    hashes and recompute."""

    request: GenerateRequest
    layout: KVLayout
    ack_to: str  # the prefill worker's input address
    version: int = PROTOCOL_VERSION

    @property
    def request_id(self) -> str:
        return self.request.request_id


class StagingRef(msgspec.Struct, frozen=True, kw_only=True):
    """Bytes in a prefill worker's shared-memory staging buffer on the decode worker's own host."""

    name: str  # the buffer's reference name (services.workers.kv_staging: checked against its pattern, never a path)
    offset: int
    nbytes: int


class KVLayers(msgspec.Struct, tag="kv_layers", tag_field="kind", kw_only=True):
    """Layers [layer_start, layer_end) of one request, laid out as
    [layer_end - layer_start, 2, num_blocks, block_size, num_kv_heads, head_dim] in the layout's dtype:
    in the next frame, or, when `staging` is set, in shared memory (and no frame follows)."""

    request_id: str
    layer_start: int
    layer_end: int
    num_blocks: int
    staging: StagingRef | None = None
    version: int = PROTOCOL_VERSION


class KVAck(msgspec.Struct, tag="kv_ack", tag_field="kind", kw_only=True):
    request_id: str
    accepted: bool  # False: decode refused (layout mismatch, no room): it recomputes instead
    message: str = ""
    staging_unreadable: bool = False  # refused because the staging file is not visible: send frames from now on
    version: int = PROTOCOL_VERSION


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: int
    token: str
    logprob: float


class PositionLogprobs(msgspec.Struct, array_like=True):
    """Logprobs at one output position: the sampled token, and the asked top-k by rank."""

    sampled: TokenLogprob
    top: list[TokenLogprob]


class RankedLogprob(msgspec.Struct, array_like=True):
    token_id: int
    token: str
    logprob: float
    rank: int  # 1-based, in the model's whole distribution


# A prompt position's logprobs: the prompt token's first, then the top-k alternatives by rank (the
# prompt token appears once, where it first comes); None for the first position (nothing before it).
PromptPositionLogprobs = list[RankedLogprob] | None


class CompletionDelta(msgspec.Struct, kw_only=True):
    """What one of a request's n completions gained in one step."""

    index: int
    token_ids: list[int]
    text: str
    # tokens of this completion before this delta: prefill and decode send from two sockets, so the
    # gateway restores the order from it
    start_index: int = 0
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None


class TTFTBreakdown(msgspec.Struct, kw_only=True):
    """Where a request's time to first token went inside the worker that produced its first token, as
    durations on that worker's clock alone (the gateway's clock differs across hosts). On the request's
    first delta; the gateway adds its own parts (services.gateway.ttft).

        arrival here ──image_wait──▶ every embedding in ──prefill_queue──▶ first step ──prefill──▶ first token

    image_wait covers the slowest image (the one whose embedding came in last): its encoder's queue,
    decode and encode (as ImageEmbedding reported them) and its transfer, which no clock measures
    end to end: image_wait minus the three encoder durations (services.gateway.ttft clamps it at 0).
    """

    image_wait_s: float = 0.0  # arrival at this worker -> the last image's embedding in (0: no images)
    encoder_queue_s: float = 0.0  # of the slowest image
    decode_s: float = 0.0
    encode_s: float = 0.0
    prefill_queue_s: float = 0.0  # handed to the engine -> its first step
    prefill_s: float = 0.0  # first step -> first token
    # filled by the gateway's backend, never sent: its call -> the request sent to the workers (placement,
    # any wait for decode KV room, the image sends)
    dispatch_s: float = 0.0


class RequestDelta(msgspec.Struct, tag="delta", tag_field="kind", kw_only=True):
    request_id: str
    completions: list[CompletionDelta]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    # one entry per prompt token, when asked (SamplingSpec.prompt_logprobs): on the request's first delta
    # with tokens only, from whichever worker computed the prompt
    prompt_logprobs: list[PromptPositionLogprobs] | None = None
    # on the request's first delta with tokens, from the worker that computed its prompt (None: not measured)
    ttft: TTFTBreakdown | None = None
    # a decode worker's first delta of a request whose KV it imported: KVTransfer received -> KV in place,
    # on its clock (after the first token: not part of the TTFT)
    kv_transfer_s: float | None = None
    version: int = PROTOCOL_VERSION


class RequestError(msgspec.Struct, tag="error", tag_field="kind", kw_only=True):
    """A request the worker could not serve; `status` is the HTTP status the gateway should answer."""

    request_id: str
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    status: int = 400
    version: int = PROTOCOL_VERSION


class OutputBatch(msgspec.Struct, tag="batch", tag_field="kind", kw_only=True):
    items: list[RequestDelta | RequestError]
    worker: str = ""  # the sender: after a migration the gateway ignores what a replaced worker still sends
    version: int = PROTOCOL_VERSION


WorkerInbound = GenerateRequest | AbortRequest | KVAck | EncodeRequest
EmbeddingInbound = ImageEmbedding
EncoderInbound = EncodeRequest | AbortRequest
KVInbound = KVTransfer | KVLayers
WorkerOutbound = OutputBatch
