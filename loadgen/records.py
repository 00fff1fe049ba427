"""The records passed between the load generator's modules.

    workloads --RequestSpec--> runner --RequestSpec--> client --RequestResult--> metrics, report

Times in a RequestResult are seconds, measured at the client with time.perf_counter: `start_s`
since the run started, the others since the request was sent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from loadgen.prompts import Prompt

# Error types, by what the client saw.
HTTP_4XX = "http_4xx"  # the server refused the request (bad request, rate limit, ...)
HTTP_5XX = "http_5xx"  # the server failed before streaming
STREAM_ERROR = "stream_error"  # an `error` object inside the stream
INCOMPLETE_STREAM = "incomplete_stream"  # the stream ended without `data: [DONE]`
INVALID_RESPONSE = "invalid_response"  # a chunk that is not JSON, or a response that is not SSE
TIMEOUT = "timeout"  # connect, read or whole-request timeout
CONNECTION = "connection"  # refused, reset or closed mid-stream
CANCELLED = "cancelled"  # in flight when the run's time limit passed (not an error of the server)


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload, before it is sent."""

    index: int
    prompt: Prompt  # the request's new text: in a multi-turn conversation, this turn's user message
    num_output_tokens: int
    images: tuple[str, ...] = ()  # data URLs
    offset_s: float | None = None  # arrival time read from a trace
    conversation: int | None = None  # multi-turn: earlier turns of the same conversation come first
    turn: int = 0
    prefix_group: int | None = None  # shared-prefix: which prefix
    tag: str = ""  # a class of request to break the summary down by ("short", "long")


@dataclass(frozen=True)
class RequestResult:
    index: int
    start_s: float
    ttft_s: float | None  # first content chunk
    itl_s: list[float]  # between consecutive content chunks
    e2e_s: float | None  # last byte of the stream; None when the request failed
    num_input_tokens: int  # usage.prompt_tokens, else what the workload generated
    num_output_tokens: int  # usage.completion_tokens, else the number of content chunks
    num_content_chunks: int
    expected_output_tokens: int  # max_tokens sent
    usage_reported: bool
    usage_mismatch: bool  # usage.completion_tokens != number of content chunks
    error_type: str | None = None
    error: str | None = None
    http_status: int | None = None
    tag: str = ""
    conversation: int | None = None
    turn: int = 0
    prefix_group: int | None = None
    output_text: str = field(default="", repr=False, compare=False)  # kept for multi-turn history only

    @property
    def ok(self) -> bool:
        return self.error_type is None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None for failed and one-token requests."""
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        del record["output_text"]
        record["ok"] = self.ok
        record["tpot_s"] = self.tpot_s
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> RequestResult:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})
