"""The control plane's typed structs: exact round trips (msgpack, pickle as Ray carries them), the state
socket's frames and their checks, and the KV events' wire shape against vLLM's own declarations."""

from __future__ import annotations

import pickle
from typing import Any

import msgspec
import pytest

from services.common.control import (
    ADMITTED_TOPIC,
    EMBEDDING_CACHE_TOPIC,
    KV_EVENTS_TOPIC,
    STATS_TOPIC,
    AdmittedRequest,
    EmbeddingCacheSnapshot,
    EncodeStats,
    EngineFacts,
    KVEventReplay,
    KVEventSnapshot,
    KVEventsReply,
    KVTierStats,
    SchedulerStats,
    SecondsHistogramSnapshot,
    StateCodec,
    StateDecodeError,
    TransferCounters,
    WorkerInfo,
    WorkerStats,
)
from services.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

INF = float("inf")
HISTOGRAM = SecondsHistogramSnapshot(buckets=[(0.001, 1), (0.01, 3), (INF, 4)], sum_s=0.25)

ENGINE_INFO = WorkerInfo(
    name="decode-0",
    stage="decode",
    pid=4242,
    host_id="host-a",
    model_dir="/models/tiny",
    input_address="tcp://127.0.0.1:5001",
    state_address="tcp://127.0.0.1:5002",
    kv_address="tcp://127.0.0.1:5003",
    metrics_port=9100,
    engine=EngineFacts(
        max_model_len=2048, vocab_size=512, device="cpu", dtype="float32", block_size=16, num_kv_blocks=1000
    ),
)
ENCODER_INFO = WorkerInfo(
    name="encode-0",
    stage="encode",
    pid=4243,
    host_id="host-a",
    model_dir="/models/tiny",
    input_address="tcp://127.0.0.1:5004",
    state_address="tcp://127.0.0.1:5005",
)
ENGINE_STATS = WorkerStats(
    name="colocated-0",
    stage="colocated",
    alive=True,
    next_kv_event_seq=7,
    scheduler=SchedulerStats(
        num_running_requests=2,
        num_waiting_requests=5,
        num_decoding_requests=1,
        queued_prefill_tokens=6000,
        kv_tiers=[KVTierStats(tier="device", num_free_blocks=250, num_total_blocks=1000)],
        num_preemptions=3,
        prefix_cache_queried_tokens=900,
        prefix_cache_hit_tokens=320,
    ),
    transfer=TransferCounters(
        bytes_sent=10, bytes_received=0, num_transfers_completed=1, num_failures=0, num_fallbacks=0, seconds=HISTOGRAM
    ),
)
ENCODER_STATS = WorkerStats(
    name="encode-0",
    stage="encode",
    alive=True,
    encode=EncodeStats(
        num_images_queued=7,
        num_images_in_flight=3,
        num_requests_received=12,
        num_requests_aborted=1,
        num_images_encoded=9,
        num_tower_calls=2,
        num_encode_errors=1,
        encode_seconds=HISTOGRAM,
        embedding_cache_queries=11,
        embedding_cache_hits=2,
        embedding_cache_evictions=0,
        embedding_cache_bytes=4096,
        embedding_cache_capacity_bytes=2**30,
        embedding_bytes_sent=8192,
        outbox_bytes=0,
        taking_work=True,
    ),
)
BATCH = KVEventBatch(
    ts=1.5,
    events=[
        BlockStored([11, 12], None, [1, 2, 3, 4], 2, extra_keys=[["salt:t"], None]),
        BlockRemoved([9]),
        AllBlocksCleared(),
    ],
)


@pytest.mark.parametrize(
    "value",
    [
        ENGINE_INFO,
        ENCODER_INFO,
        ENGINE_STATS,
        ENCODER_STATS,
        BATCH,
        EmbeddingCacheSnapshot(seq=3, content_hashes=["ab", "cd"]),
        AdmittedRequest(
            worker="w", request_id="r", reply_to="tcp://127.0.0.1:1", num_prompt_tokens=40, block_hashes=[1, 2]
        ),
    ],
    ids=["engine-info", "encoder-info", "engine-stats", "encoder-stats", "kv-batch", "embedding-cache", "admitted"],
)
def test_every_struct_round_trips_through_msgpack_and_pickle(value):
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(value), type=type(value)) == value
    assert pickle.loads(pickle.dumps(value)) == value  # Ray carries the actors' answers pickled


def test_the_kv_events_reply_is_a_tagged_union_of_replay_and_snapshot():
    replay = KVEventReplay(first_seq=4, batches=[BATCH, KVEventBatch(ts=2.0, events=[])])
    snapshot = KVEventSnapshot(seq=-1, block_hashes=[])
    for reply in (replay, snapshot):
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(reply), type=KVEventsReply) == reply
        assert pickle.loads(pickle.dumps(reply)) == reply


def test_a_snapshot_from_a_worker_without_host_block_hashes_still_decodes():
    old = msgspec.msgpack.encode({"type": "snapshot", "seq": 3, "block_hashes": [1, 2]})
    reply = msgspec.msgpack.decode(old, type=KVEventsReply)
    assert reply == KVEventSnapshot(seq=3, block_hashes=[1, 2]) and reply.host_block_hashes == []
    with_host = KVEventSnapshot(seq=3, block_hashes=[1], host_block_hashes=[2])
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(with_host), type=KVEventsReply) == with_host


def test_load_reads_the_role_own_queue():
    assert (ENGINE_STATS.num_running, ENGINE_STATS.num_waiting) == (2, 5)
    assert ENGINE_STATS.scheduler.kv_cache_usage == 0.75
    assert ENGINE_STATS.scheduler.device_kv.tier == "device"
    assert (ENCODER_STATS.num_running, ENCODER_STATS.num_waiting) == (3, 7)  # images in the tower, queued
    assert HISTOGRAM.count == 4


# ----------------------------------------------------------------------------------------------
# The state socket's frames


@pytest.mark.parametrize(
    ("topic", "body"),
    [
        (KV_EVENTS_TOPIC, BATCH),
        (STATS_TOPIC, ENCODER_STATS),
        (
            ADMITTED_TOPIC,
            AdmittedRequest(worker="w", request_id="r", reply_to="a", num_prompt_tokens=1, block_hashes=[]),
        ),
        (EMBEDDING_CACHE_TOPIC, EmbeddingCacheSnapshot(seq=1, content_hashes=["x"])),
    ],
)
def test_state_frames_carry_topic_big_endian_seq_and_payload(topic, body):
    codec = StateCodec()
    frames = codec.encode(topic, 258, body)
    assert frames[:2] == [topic, b"\x00\x00\x00\x00\x00\x00\x01\x02"]  # vLLM's: seq as 8 bytes, big-endian
    message = codec.decode(frames)
    assert (message.topic, message.seq, message.body) == (topic, 258, body)


def test_state_decoding_refuses_what_is_not_a_state_message():
    codec = StateCodec(max_payload_bytes=64)
    good = codec.encode(STATS_TOPIC, 0, ENCODER_STATS)
    with pytest.raises(StateDecodeError, match="3 frames"):
        codec.decode(good[:2])
    with pytest.raises(StateDecodeError, match="unknown topic"):
        codec.decode([b"other", *good[1:]])
    with pytest.raises(StateDecodeError, match="8"):
        codec.decode([STATS_TOPIC, b"\x00", good[2]])
    with pytest.raises(StateDecodeError, match="64-byte limit"):
        codec.decode(good)  # the stats payload is larger than this codec's limit
    small = StateCodec()
    with pytest.raises(StateDecodeError, match="malformed"):
        small.decode([STATS_TOPIC, bytes(8), msgspec.msgpack.encode(BATCH)])  # a KV batch on the stats topic
    with pytest.raises(StateDecodeError, match="malformed"):
        small.decode([KV_EVENTS_TOPIC, bytes(8), pickle.dumps(BATCH)])  # never unpickled
    old = msgspec.structs.replace(EmbeddingCacheSnapshot(seq=1, content_hashes=[]), version=0)
    with pytest.raises(StateDecodeError, match="protocol version 0"):
        small.decode(small.encode(EMBEDDING_CACHE_TOPIC, 0, old))


# ----------------------------------------------------------------------------------------------
# vLLM's KV event shape


class VllmEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """vllm/distributed/kv_events.py's declarations (map-encoded events, PR #42892), copied as data."""

    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class VllmKVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class VllmBlockStored(VllmKVCacheEvent, tag="BlockStored"):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None


class VllmBlockRemoved(VllmKVCacheEvent, tag="BlockRemoved"):
    block_hashes: list[bytes | int]
    medium: str | None
    group_idx: int | None = None


class VllmAllBlocksCleared(VllmKVCacheEvent, tag="AllBlocksCleared"):
    pass


class VllmKVEventBatch(VllmEventBatch):
    events: list[VllmBlockStored | VllmBlockRemoved | VllmAllBlocksCleared]


def test_our_kv_event_batches_decode_with_vllms_declarations():
    payload = StateCodec().encode(KV_EVENTS_TOPIC, 0, BATCH)[2]
    raw = msgspec.msgpack.decode(payload)
    assert raw[0] == 1.5 and raw[2] is None and len(raw) == 3  # [ts, events, data_parallel_rank]
    assert raw[1][0] == {
        "type": "BlockStored",
        "block_hashes": [11, 12],
        "parent_block_hash": None,
        "token_ids": [1, 2, 3, 4],
        "block_size": 2,
        "lora_id": None,
        "medium": None,
        "lora_name": None,
        "extra_keys": [["salt:t"], None],
    }
    assert raw[1][1:] == [{"type": "BlockRemoved", "block_hashes": [9], "medium": None}, {"type": "AllBlocksCleared"}]
    vllm = msgspec.msgpack.decode(payload, type=VllmKVEventBatch)
    stored, removed, cleared = vllm.events
    assert (stored.block_hashes, stored.parent_block_hash, stored.token_ids, stored.block_size) == (
        [11, 12],
        None,
        [1, 2, 3, 4],
        2,
    )
    assert stored.extra_keys == [("salt:t",), None] and removed.block_hashes == [9]
    assert isinstance(cleared, VllmAllBlocksCleared)
    # and what vLLM publishes, we read
    theirs = VllmKVEventBatch(
        ts=2.0,
        events=[VllmBlockStored([5], 4, [7, 8], 2, None, "GPU", None), VllmBlockRemoved([5], "GPU")],
        data_parallel_rank=0,
    )
    ours = msgspec.msgpack.decode(msgspec.msgpack.encode(theirs), type=KVEventBatch)
    assert ours == KVEventBatch(
        ts=2.0,
        events=[BlockStored([5], 4, [7, 8], 2, medium="GPU"), BlockRemoved([5], medium="GPU")],
        data_parallel_rank=0,
    )
