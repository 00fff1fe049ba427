"""Per-request sampling parameters, shaped like vLLM's `SamplingParams` so users know them.

`validate(vocab_size)` raises `InvalidRequestError` naming the offending parameter; the engine
calls it in `add_request` before anything is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.errors import InvalidRequestError
from services.common.messages import StructuredSpec
from services.common.structured import KINDS as STRUCTURED_KINDS

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # number of top logprobs besides the sampled token (0..20)
    # top logprobs at each prompt position besides the prompt token's own (0..20; services.engine.prompt_logprobs)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    structured: StructuredSpec | None = None  # a grammar the output must follow (services.engine.structured)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidRequestError naming the first parameter out of range."""
        _check(isinstance(self.n, int) and 1 <= self.n <= 128, "n", "n must be an integer in [1, 128]")
        _check(0.0 <= self.temperature <= 100.0, "temperature", "temperature must be in [0, 100]")
        _check(0.0 < self.top_p <= 1.0, "top_p", "top_p must be in (0, 1]")
        _check(
            isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 0),
            "top_k",
            "top_k must be -1, 0 (disabled) or a positive integer",
        )
        _check(0.0 <= self.min_p <= 1.0, "min_p", "min_p must be in [0, 1]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "presence_penalty must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "frequency_penalty must be in [-2, 2]")
        _check(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty", "repetition_penalty must be in (0, 2]")
        _check(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            "max_tokens",
            "max_tokens must be at least 1",
        )
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "min_tokens must be >= 0")
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            "min_tokens must not exceed max_tokens",
        )
        _check(
            self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
            "logprobs",
            f"logprobs must be in [0, {MAX_LOGPROBS}]",
        )
        _check(
            self.prompt_logprobs is None
            or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
            "prompt_logprobs",
            f"prompt_logprobs must be in [0, {MAX_LOGPROBS}]",
        )
        _check(self.seed is None or isinstance(self.seed, int), "seed", "seed must be an integer")
        _check(
            all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= 16,
            "stop",
            "stop must be at most 16 non-empty strings",
        )
        _check(
            all(isinstance(t, int) and 0 <= t < vocab_size for t in self.stop_token_ids),
            "stop_token_ids",
            f"stop_token_ids must be token ids in [0, {vocab_size})",
        )
        _check(
            all(
                isinstance(t, int) and 0 <= t < vocab_size and -100.0 <= b <= 100.0
                for t, b in (self.logit_bias or {}).items()
            ),
            "logit_bias",
            f"logit_bias must map token ids in [0, {vocab_size}) to values in [-100, 100]",
        )
        _check(
            self.structured is None or self.structured.kind in STRUCTURED_KINDS,
            "response_format",
            f"an output constraint's kind must be one of {', '.join(STRUCTURED_KINDS)}",
        )


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message, param=param)
