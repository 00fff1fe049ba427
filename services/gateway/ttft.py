"""A request's time to first token, split into where it went (one log line and tristage:ttft_part_seconds).

Every part is a duration measured on one clock; no timestamp crosses a process (hosts' clocks differ):

    gateway:  HTTP arrival ─queue─▶ sent to the workers ...........................................▶ first delta
    worker:                          arrival ─image_wait─▶ images in ─prefill_queue─▶ first step ─prefill─▶ first token
    other = measured TTFT - (queue + image_wait + prefill_queue + prefill): the request's and the first
            delta's trips between gateway and worker, and the loop turns either side spent on them

    queue          HTTP arrival -> the backend called (parse, admission, image fetch, tokenization) plus the
                   backend's dispatch (placement, any wait for decode KV room, the images sent to encoders)
    image_wait     the prefill (or colocated) worker: the request's arrival -> its last image's embedding in
      encoder_queue, decode, encode   the slowest image's (the last one in), on its encoder's clock
      transfer     image_wait - (encoder_queue + decode + encode), at least 0: encoder send -> prefill
                   receive has no clock of its own, so it is the remainder of a span measured on the prefill
                   worker. The gateway sends the images before the request, so an encoder may start before the
                   worker's image_wait does: then the encoder parts exceed image_wait (they overlap `queue`) and
                   transfer reads 0, clamped, not negative
    prefill_queue  handed to the engine -> its first step (the engine's "queue" phase)
    prefill        first step -> first token (the engine's "prefill" phase)

The top-level parts (queue, image_wait, prefill_queue, prefill, other) add up to the measured TTFT; the
four image sub-parts describe image_wait and are not added again. `other` is clamped at 0 too (only a
measurement error can make it negative: the worker's span lies inside the gateway's).

KV transfer is not a part: prefill streams the first token itself before it ships the KV, so the KV
transfer delays the second token, not the first. The decode worker measures it on its own clock (its
KVTransfer received -> the KV in place) and sends it on its first delta (RequestDelta.kv_transfer_s); the
gateway logs it then, after the fact, on a line of its own: `request <id> kv_transfer <ms> ms (...)`.
(tristage:kv_transfer_seconds, per prefill worker, has the sender's view: first byte to last.)
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.messages import TTFTBreakdown

TOP_PARTS = ("queue", "image_wait", "prefill_queue", "prefill", "other")  # they add up to the TTFT
IMAGE_PARTS = ("encoder_queue", "decode", "encode", "transfer")  # they describe image_wait


@dataclass(frozen=True)
class TTFTParts:
    total_s: float  # the measured TTFT
    queue_s: float
    image_wait_s: float
    encoder_queue_s: float
    decode_s: float
    encode_s: float
    transfer_s: float
    prefill_queue_s: float
    prefill_s: float
    other_s: float

    @classmethod
    def compose(cls, total_s: float, before_backend_s: float, worker: TTFTBreakdown | None) -> TTFTParts:
        """The parts of a TTFT of `total_s`: `before_backend_s` the gateway spent before calling its backend,
        `worker` what the backend and the worker reported on the first delta (None: nothing; all of it
        after the gateway's own part is `other`)."""
        w = worker or TTFTBreakdown()
        queue_s = before_backend_s + w.dispatch_s
        measured_s = queue_s + w.image_wait_s + w.prefill_queue_s + w.prefill_s
        encoder_s = w.encoder_queue_s + w.decode_s + w.encode_s
        return cls(
            total_s=total_s,
            queue_s=queue_s,
            image_wait_s=w.image_wait_s,
            encoder_queue_s=w.encoder_queue_s,
            decode_s=w.decode_s,
            encode_s=w.encode_s,
            transfer_s=max(w.image_wait_s - encoder_s, 0.0),
            prefill_queue_s=w.prefill_queue_s,
            prefill_s=w.prefill_s,
            other_s=max(total_s - measured_s, 0.0),
        )

    def seconds(self) -> dict[str, float]:
        """Part name -> seconds: the top-level parts, then image_wait's sub-parts."""
        return {name: getattr(self, f"{name}_s") for name in (*TOP_PARTS, *IMAGE_PARTS)}

    def log_line(self, request_id: str) -> str:
        ms = {name: f"{seconds * 1e3:.1f}" for name, seconds in self.seconds().items()}
        return (
            f"request {request_id} ttft {self.total_s * 1e3:.1f} ms: queue {ms['queue']} image_wait {ms['image_wait']} "
            f"(encoder queue {ms['encoder_queue']}, decode {ms['decode']}, encode {ms['encode']}, "
            f"transfer {ms['transfer']}) prefill_queue {ms['prefill_queue']} prefill {ms['prefill']} "
            f"other {ms['other']}"
        )
