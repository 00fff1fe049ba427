"""The TTFT breakdown: its arithmetic (services.gateway.ttft), where each side measures its parts, and
what the gateway logs and exports."""

from __future__ import annotations

import asyncio
import logging

import msgspec
import pytest

from services.common.codec import MessageCodec
from services.common.messages import (
    CompletionDelta,
    EmbeddingInbound,
    GenerateRequest,
    ImageEmbedding,
    OutputBatch,
    RequestDelta,
    SamplingSpec,
    TTFTBreakdown,
)
from services.gateway.admission import AdmissionController
from services.gateway.generation import Arrival, Generation
from services.gateway.metrics import GatewayMetrics
from services.gateway.ttft import IMAGE_PARTS, TOP_PARTS, TTFTParts
from services.workers.request_table import RequestRecord

WORKER = TTFTBreakdown(
    image_wait_s=0.300,
    encoder_queue_s=0.050,
    decode_s=0.020,
    encode_s=0.100,
    prefill_queue_s=0.040,
    prefill_s=0.200,
    dispatch_s=0.010,
)


def top_sum(parts: TTFTParts) -> float:
    return sum(parts.seconds()[name] for name in TOP_PARTS)


def test_top_parts_add_up_to_the_measured_ttft():
    parts = TTFTParts.compose(1.0, 0.030, WORKER)
    assert parts.queue_s == pytest.approx(0.040)  # before the backend + its dispatch
    assert parts.other_s == pytest.approx(1.0 - 0.040 - 0.300 - 0.040 - 0.200)
    assert top_sum(parts) == pytest.approx(1.0)


def test_transfer_is_the_rest_of_the_image_wait():
    parts = TTFTParts.compose(1.0, 0.0, WORKER)
    assert parts.transfer_s == pytest.approx(0.300 - 0.050 - 0.020 - 0.100)
    image = parts.seconds()
    assert sum(image[name] for name in IMAGE_PARTS) == pytest.approx(parts.image_wait_s)


def test_remainders_are_clamped_at_zero_never_negative():
    # the encoder started before the worker's wait did (images are sent ahead of the request)
    early = msgspec.structs.replace(WORKER, image_wait_s=0.1)
    assert TTFTParts.compose(1.0, 0.0, early).transfer_s == 0.0
    # the worker's parts exceed the gateway's measurement (only a measurement error can do that)
    assert TTFTParts.compose(0.5, 0.0, WORKER).other_s == 0.0


def test_without_a_worker_breakdown_the_rest_is_other():
    parts = TTFTParts.compose(0.25, 0.05, None)
    assert (parts.queue_s, parts.image_wait_s, parts.prefill_s) == (0.05, 0.0, 0.0)
    assert parts.other_s == pytest.approx(0.20) and top_sum(parts) == pytest.approx(0.25)


def test_log_line_names_the_request_and_every_part_in_ms():
    line = TTFTParts.compose(1.0, 0.030, WORKER).log_line("chatcmpl-1")
    assert line == (
        "request chatcmpl-1 ttft 1000.0 ms: queue 40.0 image_wait 300.0 (encoder queue 50.0, decode 20.0, "
        "encode 100.0, transfer 130.0) prefill_queue 40.0 prefill 200.0 other 420.0"
    )


def test_old_peers_interoperate():
    """The new fields have defaults: a message without them decodes, and one with them is read by a
    decoder that does not know them."""

    class OldEmbedding(msgspec.Struct, tag="embedding", tag_field="kind", kw_only=True):
        request_id: str
        content_hash: str
        num_rows: int
        hidden_size: int
        dtype: str
        error: str | None = None
        version: int = 2

    old = msgspec.msgpack.encode(OldEmbedding(request_id="r", content_hash="h", num_rows=0, hidden_size=0, dtype=""))
    decoded = msgspec.msgpack.decode(old, type=EmbeddingInbound)
    assert (decoded.encoder_queue_s, decoded.decode_s, decoded.encode_s) == (0.0, 0.0, 0.0)
    new = ImageEmbedding(request_id="r", content_hash="h", num_rows=0, hidden_size=0, dtype="", decode_s=0.5)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=OldEmbedding).request_id == "r"
    delta = RequestDelta(request_id="r", completions=[], finished=False, num_prompt_tokens=1, ttft=WORKER)
    codec = MessageCodec(OutputBatch)
    (back,) = codec.decode(codec.encode(OutputBatch(items=[delta]))).items
    assert back.ttft == WORKER


def test_worker_record_gives_its_parts_on_the_first_token_only():
    message = GenerateRequest(request_id="r", prompt_token_ids=[1], sampling=SamplingSpec(), reply_to="tcp://x:1")
    record = RequestRecord(message, arrived_s=10.0, images_in_s=10.3, encoder_seconds=(0.05, 0.02, 0.1))
    assert record.ttft_breakdown(0.04, 0.2) == TTFTBreakdown(
        image_wait_s=pytest.approx(0.3),
        encoder_queue_s=0.05,
        decode_s=0.02,
        encode_s=0.1,
        prefill_queue_s=0.04,
        prefill_s=0.2,
    )
    assert RequestRecord(message, arrived_s=10.0).ttft_breakdown(0.04, 0.2).image_wait_s == 0.0  # text only
    resumed = RequestRecord(message.resume_after([5]))  # its first token came from elsewhere
    assert resumed.ttft_breakdown(0.04, 0.2) is None


def test_engine_reports_its_phases_with_the_first_token_only(llama_dir):
    from services.engine import LLMEngine, SamplingParams

    engine = LLMEngine(model=llama_dir, block_size=8, num_kv_blocks=64)
    engine.add_request("r", list(range(20, 30)), SamplingParams(max_tokens=3, ignore_eos=True))
    phases = []
    while engine.has_unfinished_requests():
        phases += [out.first_token_phases for out in engine.step()]
    assert phases[0] is not None and all(p is None for p in phases[1:])
    queue_s, prefill_s = phases[0]
    assert queue_s >= 0.0 and prefill_s > 0.0


SMALL = TTFTBreakdown(
    image_wait_s=0.010,
    encoder_queue_s=0.002,
    decode_s=0.001,
    encode_s=0.004,
    prefill_queue_s=0.002,
    prefill_s=0.010,
    dispatch_s=0.001,
)


class _Backend:
    """One delta per request, with a worker's breakdown (SMALL: 23 ms), after `delay_s`."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def is_ready(self) -> bool:
        return True

    async def generate(self, request_id, *args, **kwargs):
        await asyncio.sleep(self.delay_s)
        completion = CompletionDelta(index=0, token_ids=[7], text="x", finish_reason="length")
        yield RequestDelta(
            request_id=request_id, completions=[completion], finished=True, num_prompt_tokens=1, ttft=SMALL
        )

    async def abort(self, request_id: str) -> None:
        pass


def test_gateway_logs_the_breakdown_and_observes_each_part(caplog):
    admission = AdmissionController(8, 1000, 8, 1000)
    metrics = GatewayMetrics("m", admission, max_model_len=256)

    async def run() -> None:
        loop_now = asyncio.get_running_loop().time  # time.monotonic on the default loop
        generation = Generation(
            _Backend(0.05),
            Arrival("req-1", loop_now()),
            [[1, 2]],
            SamplingSpec(max_tokens=1),
            None,
            admission.admit(1),
            metrics,
            abort_timeout_s=1.0,
        )
        generation.start()
        while await generation.next_delta() is not None:
            pass
        await generation.close()

    with caplog.at_level(logging.INFO, logger="services.gateway.generation"):
        asyncio.run(run())
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request req-1 ttft")]
    assert "image_wait 10.0 (encoder queue 2.0, decode 1.0, encode 4.0, transfer 3.0)" in line
    text = metrics.render([]).decode()
    for part in (*TOP_PARTS, *IMAGE_PARTS):
        assert f'tristage:ttft_part_seconds_count{{model_name="m",part="{part}"}} 1.0' in text
    ttft = float(next(s for s in text.splitlines() if s.startswith("vllm:time_to_first_token_seconds_sum")).split()[1])
    parts = {
        p: float(
            next(
                s
                for s in text.splitlines()
                if s.startswith(f'tristage:ttft_part_seconds_sum{{model_name="m",part="{p}"}}')
            ).split()[1]
        )
        for p in TOP_PARTS
    }
    assert sum(parts.values()) == pytest.approx(ttft, rel=1e-6)


def test_merged_deltas_keep_the_breakdown_and_the_kv_transfer():
    from services.gateway.generation import merge_deltas

    def one(start: int, **fields) -> RequestDelta:
        completion = CompletionDelta(index=0, token_ids=[start], text="x", start_index=start)
        return RequestDelta(request_id="r", completions=[completion], finished=False, num_prompt_tokens=1, **fields)

    merged = merge_deltas(one(0, ttft=SMALL), one(1, kv_transfer_s=0.02))
    assert (merged.ttft, merged.kv_transfer_s) == (SMALL, 0.02)


class _DisaggregatedBackend:
    """Prefill's first token with its breakdown, then the decode worker's with its KV transfer."""

    def is_ready(self) -> bool:
        return True

    async def generate(self, request_id, *args, **kwargs):
        first = CompletionDelta(index=0, token_ids=[7], text="x")
        yield RequestDelta(request_id=request_id, completions=[first], finished=False, num_prompt_tokens=1, ttft=SMALL)
        await asyncio.sleep(0.01)
        last = CompletionDelta(index=0, token_ids=[8], text="y", start_index=1, finish_reason="length")
        yield RequestDelta(
            request_id=request_id, completions=[last], finished=True, num_prompt_tokens=1, kv_transfer_s=0.0123
        )

    async def abort(self, request_id: str) -> None:
        pass


def test_gateway_logs_the_kv_transfer_after_the_first_token(caplog):
    admission = AdmissionController(8, 1000, 8, 1000)
    metrics = GatewayMetrics("m", admission, max_model_len=256)

    async def run() -> None:
        arrival = Arrival("req-2", asyncio.get_running_loop().time())
        generation = Generation(
            _DisaggregatedBackend(), arrival, [[1]], SamplingSpec(max_tokens=2), None, admission.admit(1), metrics, 1.0
        )
        generation.start()
        while await generation.next_delta() is not None:
            pass
        await generation.close()

    with caplog.at_level(logging.INFO, logger="services.gateway.generation"):
        asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request req-2")]
    assert [line.split()[2] for line in lines] == ["ttft", "kv_transfer"]
    assert lines[1].startswith("request req-2 kv_transfer 12.3 ms")


def test_encoder_batch_splits_an_image_into_decode_and_the_rest():
    from services.workers.encoder import EncodeBatch

    batch = EncodeBatch([], {})
    batch.started_s, batch.finished_s, batch.preprocess_s = 10.0, 10.5, {"a": 0.1, "b": 0.9}
    assert batch.item_seconds("a") == pytest.approx((0.1, 0.4))
    assert batch.item_seconds("b") == pytest.approx((0.5, 0.0))  # clamped: never past the span
    assert batch.item_seconds("cached") == pytest.approx((0.0, 0.5))
