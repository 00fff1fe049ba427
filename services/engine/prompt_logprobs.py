"""Prompt logprobs: every prompt token's log-probability given the tokens before it, with the top-k
alternatives (vLLM's `prompt_logprobs`; `echo` with `logprobs` on /v1/completions reads them too).

A request that asks (`SamplingParams.prompt_logprobs = k`) has them computed during its prefill, from
the hidden states its steps compute anyway: the row of prompt position p predicts prompt token p + 1.
Chunked prefill spreads them over steps, each chunk contributing the rows of its positions; the last
row of a chunk predicts the next chunk's first token, and the prompt's last row is the sampler's:

    prompt tokens    t0    t1   t2   t3 | t4   t5   t6        chunks [0, 4) and [4, 7)
    row position p   0     1    2    3  | 4    5    6
    predicts         t1    t2   t3   t4 | t5   t6   (the first output token: sampled, not here)
    entries          None  e1   e2   e3   e4 | e5   e6         e_j = {t_j, then the top k by rank}

Values follow the sampler's logprobs: log_softmax of the raw logits in float32, ranks 1-based over the
whole vocabulary (1 + the number of tokens strictly more likely). Cached prefix blocks have no logits,
so a request still computing them adopts none (services.engine.scheduler); positions a launched step
already covers are never computed again (a preempted request recomputes its KV, not these).

Memory: logits exist for at most MAX_SLICE_BYTES // (4 * vocab_size) rows at once, so a 2048-token
chunk of a 128k-token vocabulary never holds its [2048, 128k] float32 logits (1 GiB) in one piece.
Tunable: MAX_SLICE_BYTES = 64 MiB (128 rows of a 128k vocabulary; beside them the log_softmax and a
comparison of the same shape).

A step's results start their copy to the host at once (non-blocking; an event marks its end) and are
read when the request's first token is collected, long after they landed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from services.engine.request import Request
from services.engine.sampler import TokenLogprobs

MAX_SLICE_BYTES = 64 * 2**20


@dataclass
class PromptLogprobSpan:
    """One request's share of a step: entries first_position .. first_position + num_positions - 1,
    results offset .. offset + num_positions - 1 of the step."""

    request: Request
    first_position: int  # the prompt position of the first entry (>= 1; its row is first_position - 1)
    num_positions: int
    offset: int


@dataclass
class PromptLogprobRows:
    """The rows of a step's hidden states that compute prompt logprobs, request by request."""

    rows: list[np.ndarray] = field(default_factory=list)  # per span: its hidden-state rows
    target_ids: list[int] = field(default_factory=list)  # per row: the prompt token it predicts
    spans: list[PromptLogprobSpan] = field(default_factory=list)

    def add(self, request: Request, first_row: int, chunk_start: int, chunk_end: int) -> None:
        """A request's chunk [chunk_start, chunk_end) laid out from hidden row `first_row`: the span of
        positions it still needs, if any (its rows predict positions chunk_start + 1 .. chunk_end)."""
        first = max(chunk_start, request.num_prompt_logprob_positions - 1)  # the first row position to compute
        end = min(chunk_end, request.num_prompt_tokens - 1)  # rows past it predict output tokens
        if first >= end:
            return
        self.spans.append(PromptLogprobSpan(request, first + 1, end - first, offset=len(self.target_ids)))
        self.rows.append(np.arange(first_row + first - chunk_start, first_row + end - chunk_start))
        self.target_ids += request.prompt_token_ids[first + 1 : end + 1]


class StepPromptLogprobs:
    """A step's prompt logprobs on their way to the host: one row per computed position."""

    def __init__(self, spans: list[PromptLogprobSpan], tensors: tuple[torch.Tensor, ...]) -> None:
        self.spans = spans
        self._copied: torch.cuda.Event | None = None
        if tensors[0].device.type == "cuda":
            tensors = tuple(t.to("cpu", non_blocking=True) for t in tensors)
            self._copied = torch.cuda.Event()
            self._copied.record()
        self._tensors = tensors
        self._entries: list[TokenLogprobs] | None = None

    def entries(self, span: PromptLogprobSpan) -> list[TokenLogprobs]:
        """The span's entries in position order: {prompt token: (logprob, rank), then the top k by rank}."""
        if self._entries is None:
            self._entries = self._resolve()
        return self._entries[span.offset : span.offset + span.num_positions]

    def _resolve(self) -> list[TokenLogprobs]:
        if self._copied is not None:
            self._copied.synchronize()
        target_ids, target_logprobs, target_ranks, top_ids, top_logprobs, top_ranks = (
            t.tolist() for t in self._tensors
        )
        num_tops = [s.request.sampling_params.prompt_logprobs or 0 for s in self.spans for _ in range(s.num_positions)]
        entries = []
        for row, num_top in enumerate(num_tops):
            entry = {target_ids[row]: (target_logprobs[row], target_ranks[row])}
            for tid, logprob, rank in zip(
                top_ids[row][:num_top], top_logprobs[row][:num_top], top_ranks[row][:num_top]
            ):
                entry.setdefault(tid, (logprob, rank))
            entries.append(entry)
        return entries


def compute_prompt_logprobs(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    rows: PromptLogprobRows,
    vocab_size: int,
    max_slice_bytes: int = MAX_SLICE_BYTES,
) -> StepPromptLogprobs:
    """Queue the logprobs of `rows` of `hidden` ([num_tokens, hidden_size]) on its device, slice by slice."""
    row_index = _upload(np.concatenate(rows.rows), hidden.device)  # [n]
    target_ids = _upload(np.asarray(rows.target_ids, dtype=np.int64), hidden.device)  # [n]
    num_top = max(s.request.sampling_params.prompt_logprobs or 0 for s in rows.spans)
    slice_rows = max(1, max_slice_bytes // (4 * vocab_size))
    slices = [
        _slice_logprobs(
            compute_logits, hidden, row_index[lo : lo + slice_rows], target_ids[lo : lo + slice_rows], num_top
        )
        for lo in range(0, len(target_ids), slice_rows)
    ]
    tensors = tuple(torch.cat(parts) for parts in zip(*slices))
    return StepPromptLogprobs(rows.spans, tensors)


def _upload(values: np.ndarray, device: torch.device) -> torch.Tensor:
    # through pinned memory: a plain host-to-GPU copy would wait for the forward queued before it
    tensor = torch.from_numpy(values.astype(np.int64, copy=False))
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


def _slice_logprobs(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    row_index: torch.Tensor,
    target_ids: torch.Tensor,
    num_top: int,
) -> tuple[torch.Tensor, ...]:
    """(target ids, their logprobs and ranks [rows], top ids, logprobs and ranks [rows, num_top])."""
    logits = compute_logits(hidden.index_select(0, row_index))  # [rows, vocab_size]
    logprobs = torch.log_softmax(logits.to(torch.float32), dim=-1)
    del logits
    target_logprobs = logprobs.gather(1, target_ids.unsqueeze(1))  # [rows, 1]
    target_ranks = 1 + (logprobs > target_logprobs).sum(dim=-1)  # [rows]
    top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)  # [rows, num_top], descending
    # sorted descending, every value strictly above top[j] is in top[:j]: counting there gives the rank
    top_ranks = 1 + (top_logprobs.unsqueeze(1) > top_logprobs.unsqueeze(2)).sum(dim=-1)  # [rows, num_top]
    return target_ids, target_logprobs.squeeze(1), target_ranks, top_ids, top_logprobs, top_ranks
