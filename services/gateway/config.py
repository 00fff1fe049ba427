"""The gateway's settings, built once (by the CLI or a test) and passed to `create_app`."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.gateway.images import ImagePolicy
from services.gateway.tool_parsers import TOOL_CALL_PARSERS

MIB = 1024 * 1024
TOOL_CALL_PARSER_OPTIONS = ("auto", *TOOL_CALL_PARSERS, "none")


@dataclass(frozen=True)
class GatewayConfig:
    served_model_name: str  # the only `model` value requests may name; listed by /v1/models
    api_keys: tuple[str, ...] = ()  # accepted bearer keys on /v1 routes; empty: no authentication

    # Admission (services.gateway.admission). A request is queued from the moment it is admitted until
    # its first token arrives (or it ends); a new request that would push a total past its limit is
    # refused with 429, unless nothing else holds any of that budget.
    # The defaults queue a burst of thousands of requests (a batch job, a benchmark at rate inf) rather
    # than refuse it: 2M prompt tokens is about a minute of prefill for an 8B model on one H100.
    max_queued_requests: int = 4096  # requests
    # sequences (n x prompts) of the queued requests; the default fits the largest request allowed,
    # max_prompts_per_request x max_n, and four times max_queued_requests' worth of n=1 requests
    max_queued_sequences: int = 16384
    max_queued_tokens: int = 2**21  # prompt tokens of the queued requests
    # UTF-8 bytes of prompt text admitted and not yet tokenized (what waits for the tokenizer threads);
    # the default equals max_body_bytes, so a largest request passes alone, and is ~10x the text a full
    # token budget holds, so it binds only on prompts far beyond what the tokens would admit
    max_queued_prompt_bytes: int = 16 * MIB
    retry_after_s: int = 1  # seconds, sent in Retry-After with 429 and 503

    # HTTP server (services.gateway.http_server): connections served at once (one past the cap gets a
    # 503 with Retry-After and is closed), seconds a request head may take to arrive, and seconds an
    # idle keep-alive connection is kept
    max_connections: int = 2048
    header_read_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 5.0
    # Host header names accepted (services.gateway.hosts): None accepts any; `tristage serve` passes
    # the loopback names when it binds a loopback address (DNS rebinding)
    allowed_hosts: tuple[str, ...] | None = None

    max_body_bytes: int = 16 * MIB  # request body limit in bytes (413 above it)
    # seconds the whole body may take to arrive; a client stalled mid-upload gets 408 and its
    # connection closed, instead of holding a connection and a request slot forever
    body_read_timeout_s: float = 30.0
    # tokenizer threads (services.gateway.tokenizer_pool): bounds the cores long prompts can take
    tokenizer_threads: int = 4
    # /metrics, /openapi.json and /docs need the API key too (when api_keys is not empty); off by
    # default because Prometheus scrapers usually carry no key
    protect_metrics_and_docs: bool = False
    max_n: int = 16  # completions per prompt
    max_prompts_per_request: int = 64  # prompts in one /v1/completions batch
    abort_timeout_s: float = 5.0  # seconds to wait for backend.abort after a client leaves
    snapshot_timeout_s: float = 2.0  # seconds /metrics waits for backend.snapshot()
    # per-worker series on the gateway's /metrics; off when workers serve their own (no double counting)
    export_worker_metrics: bool = True
    # image_url parts of vision-language chats: limits, and remote hosts allowed (none by default)
    image_policy: ImagePolicy = field(default_factory=ImagePolicy)
    # encoded bytes of images sent with a uuid, kept so a later part naming the uuid alone skips the
    # upload (ImageReferences); 0 keeps none
    image_reference_cache_bytes: int = 256 * MIB
    # how tool_choice "auto" reads tool calls in the model's output (services.gateway.tool_parsers):
    # "auto" detects the format from the chat template; "none" reads none (tool_choice "auto" is refused)
    tool_call_parser: str = "auto"

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        if self.tool_call_parser not in TOOL_CALL_PARSER_OPTIONS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSER_OPTIONS)}")
        if any(not key for key in self.api_keys):
            raise ValueError("api_keys must not contain an empty key")
        for name in (
            "max_queued_requests",
            "max_queued_sequences",
            "max_queued_tokens",
            "max_queued_prompt_bytes",
            "max_connections",
            "max_body_bytes",
            "max_n",
            "max_prompts_per_request",
            "tokenizer_threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.image_reference_cache_bytes < 0:
            raise ValueError("image_reference_cache_bytes must be >= 0")
        if self.retry_after_s < 0:
            raise ValueError("retry_after_s must be >= 0")
        for name in (
            "abort_timeout_s",
            "snapshot_timeout_s",
            "body_read_timeout_s",
            "header_read_timeout_s",
            "keep_alive_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.allowed_hosts is not None and not all(self.allowed_hosts):
            raise ValueError("allowed_hosts must not contain an empty name")
