"""Turns one step's logits into one token per row.

Phases, applied to a float32 copy of `logits` ([num_rows, vocab_size]); row i belongs to
`requests[i]`:

  1. raw logprobs   `log_softmax` of the unprocessed logits, kept for rows that asked for
                    logprobs (the OpenAI API reports the model's distribution, not the sampled one)
  2. grammar        rows of constrained requests (structured outputs): tokens their grammar does
                    not allow next get -inf (a bitmask computed on the host, services.engine.structured)
  2b. min_tokens    while a request has fewer than `min_tokens` outputs, its eos token and
                    `stop_token_ids` get -inf so it cannot stop early
  3. penalties      repetition (HF/vLLM: over prompt + output tokens, positive logits divided by
                    the penalty, negative ones multiplied), then frequency × count and
                    presence × (count > 0) subtracted (OpenAI: output tokens only)
  4. greedy rows    argmax of the processed logits
  5. random rows    logits / temperature → top-k → top-p → min-p → exponential race

Top-p keeps the smallest prefix of the sorted distribution whose mass reaches `top_p` (the top
token is always kept); it runs on the distribution left by top-k. Min-p drops tokens whose
probability is below `min_p × max probability`.

Exponential race (Gumbel-max in another form): with q_i ~ Exponential(1) drawn independently,
argmax_i p_i / q_i is token i with probability p_i / Σp. It needs no normalisation and no cumsum.

Invariants:
  - A seeded row (request.generator is set) draws its own `vocab_size` exponentials from its own
    generator, and every other operation on it is row-wise, so its token depends only on its
    logits and generator, never on the batch around it.
  - Unseeded random rows share one batched draw from the default RNG.
  - Work that no row needs (penalty counts, the sort for top-k/top-p, min-p) is skipped.
  - Disabled settings are exact no-ops on a row (top_k ≤ 0, top_p = 1, min_p = 0, penalties at
    their neutral values), so a row's result does not depend on which paths the batch enabled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from services.engine.request import Request
from services.engine.sampling_params import SamplingParams

# A logprob entry: token id -> (logprob, 1-based rank in the raw distribution).
TokenLogprobs = dict[int, tuple[float, int]]


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one sampled token per row
    # per row: None when the request asked for no logprobs, else the sampled token plus the top
    # `params.logprobs` tokens as {token_id: (logprob, rank)}
    logprobs: list[TokenLogprobs | None]


@dataclass
class _RawLogprobs:
    rows: list[int]  # rows that asked for logprobs
    logprobs: torch.Tensor  # [len(rows), vocab_size], log_softmax of the raw logits


class Sampler:
    """Stateless; the per-request state it reads (outputs so far, generator) lives on `Request`.

    Mutates nothing it is given except the requests' generators, which advance on each seeded
    random draw.
    """

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> SamplerOutput:
        return self.sample(logits, requests).resolve()

    def sample(
        self, logits: torch.Tensor, requests: Sequence[Request], token_bitmask: torch.Tensor | None = None
    ) -> PendingSample:
        """Queue the sampling on the logits' device; nothing waits for it until `resolve()`.
        `token_bitmask` ([num_rows, ceil(vocab / 32)] int32, on the logits' device): the tokens each row
        may take (bit t % 32 of word t // 32); None: every token."""
        assert logits.dim() == 2 and logits.shape[0] == len(requests), "one logits row per request"
        logits = logits.to(torch.float32, copy=True)  # [num_rows, vocab_size]
        raw = _raw_logprobs(logits, requests)
        _apply_logit_bias(logits, requests)
        if token_bitmask is not None:
            _apply_token_bitmask(logits, token_bitmask)
        _mask_stops_before_min_tokens(logits, requests)
        _apply_penalties(logits, requests)
        token_ids = _sample(logits, requests)  # [num_rows]
        return PendingSample(token_ids, _logprob_tensors(raw, token_ids, requests), list(requests))


def _apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set to -inf every logit whose bit is clear (bits past the vocabulary are ignored)."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(bitmask.shape[0], -1)[:, : logits.shape[1]]
    logits.masked_fill_(allowed == 0, float("-inf"))


def needs_history(params: SamplingParams) -> bool:
    """Sampling reads the request's earlier tokens themselves (not just their count): penalties."""
    return _needs_penalties(params)


class PendingSample:
    """A step's sampled tokens (and logprobs) on their way to the host.

    The copies start at once, on the device's stream right after the sampling, and an event marks
    their end: `resolve()` waits for this step alone, not for a step queued after it (asynchronous
    scheduling launches the next step before collecting this one). `token_ids` stays on the device
    for the next step's inputs.
    """

    def __init__(self, token_ids: torch.Tensor, logprobs: _LogprobTensors | None, requests: list[Request]) -> None:
        self.token_ids = token_ids  # [num_rows], on the device
        self.requests = requests
        self._rows = {id(r): row for row, r in enumerate(requests)}
        self._logprobs = logprobs
        self._copied: torch.cuda.Event | None = None
        self._resolved: SamplerOutput | None = None
        if token_ids.device.type == "cuda":
            self._host_token_ids = token_ids.to("cpu", non_blocking=True)
            if logprobs is not None:
                self._logprobs = _LogprobTensors(
                    logprobs.rows, *(t.to("cpu", non_blocking=True) for t in _tensor_fields(logprobs))
                )
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._host_token_ids = token_ids

    def row_of(self, request: Request) -> int:
        """The batch row a request's token was sampled in."""
        return self._rows[id(request)]

    def resolve(self) -> SamplerOutput:
        """The tokens and logprobs on the host (waits for this step's copies; later calls return the same)."""
        if self._resolved is None:
            if self._copied is not None:
                self._copied.synchronize()
            self._resolved = SamplerOutput(
                token_ids=self._host_token_ids.tolist(), logprobs=_collect_logprobs(self._logprobs, self.requests)
            )
        return self._resolved

    def token_of(self, request: Request) -> int | None:
        """The token sampled for `request` in this step (waits for it), or None when it had no row."""
        row = self._rows.get(id(request))
        return None if row is None else self.resolve().token_ids[row]


# ---------------------------------------------------------------------------------------------
# Phase 1 and its result: logprobs of the raw distribution


def _raw_logprobs(logits: torch.Tensor, requests: Sequence[Request]) -> _RawLogprobs | None:
    rows = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
    if not rows:
        return None
    row_index = _index(rows, logits.device)
    return _RawLogprobs(rows, torch.log_softmax(logits[row_index], dim=-1))


@dataclass
class _LogprobTensors:
    """The logprobs a step returns, gathered on the device: one row per asking request."""

    rows: list[int]  # batch rows that asked for logprobs
    sampled_ids: torch.Tensor  # [n]
    sampled_logprobs: torch.Tensor  # [n]
    sampled_ranks: torch.Tensor  # [n]
    top_ids: torch.Tensor  # [n, max_top], by logprob, descending
    top_logprobs: torch.Tensor  # [n, max_top]
    top_ranks: torch.Tensor  # [n, max_top]


def _tensor_fields(t: _LogprobTensors) -> tuple[torch.Tensor, ...]:
    return (t.sampled_ids, t.sampled_logprobs, t.sampled_ranks, t.top_ids, t.top_logprobs, t.top_ranks)


def _logprob_tensors(
    raw: _RawLogprobs | None, token_ids: torch.Tensor, requests: Sequence[Request]
) -> _LogprobTensors | None:
    """Top-k tokens and the sampled token per asking row, computed on the device."""
    if raw is None:
        return None
    logprobs = raw.logprobs  # [n, vocab_size]
    sampled_ids = token_ids[_index(raw.rows, logprobs.device)].unsqueeze(1)  # [n, 1]
    sampled_logprobs = logprobs.gather(1, sampled_ids)  # [n, 1]
    sampled_ranks = 1 + (logprobs > sampled_logprobs).sum(dim=-1)  # [n]
    max_top = max(requests[row].sampling_params.logprobs or 0 for row in raw.rows)
    top_logprobs, top_ids = logprobs.topk(max_top, dim=-1)  # [n, max_top], sorted descending
    # Sorted descending, every value strictly above top[j] sits in top[:j], so counting within
    # the top-k list gives the rank over the whole vocabulary.
    top_ranks = 1 + (top_logprobs.unsqueeze(1) > top_logprobs.unsqueeze(2)).sum(dim=-1)  # [n, max_top]
    return _LogprobTensors(
        raw.rows, sampled_ids.squeeze(1), sampled_logprobs.squeeze(1), sampled_ranks, top_ids, top_logprobs, top_ranks
    )


def _collect_logprobs(tensors: _LogprobTensors | None, requests: Sequence[Request]) -> list[TokenLogprobs | None]:
    """The per-row entries, None for rows that asked for none; one device→host copy per tensor."""
    result: list[TokenLogprobs | None] = [None] * len(requests)
    if tensors is None:
        return result
    columns = zip(
        tensors.sampled_ids.tolist(),
        tensors.sampled_logprobs.tolist(),
        tensors.sampled_ranks.tolist(),
        tensors.top_ids.tolist(),
        tensors.top_logprobs.tolist(),
        tensors.top_ranks.tolist(),
    )
    for row, (sampled_id, sampled_lp, sampled_rank, ids, lps, ranks) in zip(tensors.rows, columns):
        num_top = requests[row].sampling_params.logprobs or 0
        entry = {tid: (lp, rank) for tid, lp, rank in zip(ids[:num_top], lps[:num_top], ranks[:num_top])}
        entry[sampled_id] = (sampled_lp, sampled_rank)
        result[row] = entry
    return result


# ---------------------------------------------------------------------------------------------
# Phases 2 and 3: logit processors, in place on [num_rows, vocab_size]


def _apply_logit_bias(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    """Add each request's logit_bias (OpenAI's: added to the logits before sampling, greedy included)."""
    rows: list[int] = []
    token_ids: list[int] = []
    biases: list[float] = []
    for row, request in enumerate(requests):
        for token_id, bias in (request.sampling_params.logit_bias or {}).items():
            rows.append(row)
            token_ids.append(token_id)
            biases.append(bias)
    if rows:
        bias_values = torch.tensor(biases, dtype=logits.dtype, device=logits.device)
        logits.index_put_((_index(rows, logits.device), _index(token_ids, logits.device)), bias_values, accumulate=True)


def _mask_stops_before_min_tokens(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    rows: list[int] = []
    token_ids: list[int] = []
    for row, request in enumerate(requests):
        params = request.sampling_params
        if request.num_output_tokens + request.num_pending_tokens >= params.min_tokens:
            continue
        stop_ids = list(params.stop_token_ids)
        if request.eos_token_id is not None:
            stop_ids.append(request.eos_token_id)
        rows += [row] * len(stop_ids)
        token_ids += stop_ids
    if rows:
        logits[_index(rows, logits.device), _index(token_ids, logits.device)] = float("-inf")


def _needs_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


def _apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    rows = [i for i, r in enumerate(requests) if _needs_penalties(r.sampling_params)]
    if not rows:
        return
    penalized = [requests[row] for row in rows]
    row_index = _index(rows, logits.device)
    vocab_size = logits.shape[1]
    sub = logits[row_index]  # [n, vocab_size]
    output_counts = _token_counts([r.output_token_ids for r in penalized], vocab_size, sub.device)

    repetition = _param_column(penalized, lambda p: p.repetition_penalty, sub.device)  # [n, 1]
    if bool((repetition != 1.0).any()):
        prompt_counts = _token_counts([r.prompt_token_ids for r in penalized], vocab_size, sub.device)
        seen = (prompt_counts > 0) | (output_counts > 0)  # [n, vocab_size]
        scaled = torch.where(sub > 0, sub / repetition, sub * repetition)
        sub = torch.where(seen, scaled, sub)

    frequency = _param_column(penalized, lambda p: p.frequency_penalty, sub.device)  # [n, 1]
    presence = _param_column(penalized, lambda p: p.presence_penalty, sub.device)  # [n, 1]
    sub = sub - frequency * output_counts - presence * (output_counts > 0).float()
    logits[row_index] = sub


def _token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab_size] float counts, built with one scatter_add.

    Lists are right-padded with the id `vocab_size`, which lands in a spare column cut off at the
    end.
    """
    max_len = max(len(tokens) for tokens in token_lists)
    padded = [tokens + [vocab_size] * (max_len - len(tokens)) for tokens in token_lists]
    index = torch.tensor(padded, dtype=torch.long, device=device).reshape(len(token_lists), max_len)
    counts = torch.zeros(len(token_lists), vocab_size + 1, device=device)  # [n, vocab_size + 1]
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=counts.dtype))
    return counts[:, :vocab_size]


# ---------------------------------------------------------------------------------------------
# Phases 4 and 5: choosing the token


def _sample(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """[num_rows] token ids: argmax for greedy rows, an exponential race for the rest."""
    token_ids = logits.argmax(dim=-1)  # [num_rows]
    rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
    if not rows:
        return token_ids
    random_requests = [requests[row] for row in rows]
    row_index = _index(rows, logits.device)
    probs = _filtered_probs(logits[row_index], random_requests)  # [n, vocab_size]
    token_ids[row_index] = _exponential_race(probs, [r.generator for r in random_requests])
    return token_ids


def _filtered_probs(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on [n, vocab_size] logits; returns unnormalised probs."""
    device = logits.device
    logits = logits / _param_column(requests, lambda p: p.temperature, device)
    top_k = [_effective_top_k(r.sampling_params.top_k, logits.shape[1]) for r in requests]
    top_p = [r.sampling_params.top_p for r in requests]
    if min(top_p) < 1.0 or min(top_k) < logits.shape[1]:
        _apply_top_k_top_p(logits, _index(top_k, device), torch.tensor(top_p, device=device))
    probs = logits.softmax(dim=-1)  # [n, vocab_size]
    if any(r.sampling_params.min_p > 0.0 for r in requests):
        _apply_min_p(probs, _param_column(requests, lambda p: p.min_p, device))
    return probs


def _effective_top_k(top_k: int, vocab_size: int) -> int:
    return vocab_size if top_k <= 0 else min(top_k, vocab_size)


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> None:
    """Set -inf outside each row's top-k, then outside its top-p nucleus, with one sort.

    In sorted order, position j is dropped by top-k when j >= k and by top-p when the mass of
    positions 0..j-1 already reaches top_p (so the kept prefix is the smallest one whose mass is
    >= top_p). Rows with top_p = 1 skip the top-p test so rounding in the cumsum cannot cut them.
    """
    vocab_size = logits.shape[1]
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # [n, vocab_size] each
    positions = torch.arange(vocab_size, device=logits.device)  # [vocab_size]
    drop = positions.unsqueeze(0) >= top_k.unsqueeze(1)  # [n, vocab_size], in sorted order
    sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # exclusive prefix sum
    top_p = top_p.unsqueeze(1)  # [n, 1]
    drop |= (mass_before >= top_p) & (top_p < 1.0)
    drop[:, 0] = False
    logits.masked_fill_(torch.zeros_like(drop).scatter_(1, sorted_ids, drop), float("-inf"))


def _apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> None:
    """Zero probs below min_p × the row's max; probs [n, vocab_size], min_p [n, 1]."""
    max_probs = probs.amax(dim=-1, keepdim=True)  # [n, 1]
    probs.masked_fill_(probs < min_p * max_probs, 0.0)


def _exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """[n] ids of argmax(probs / q), q ~ Exponential(1): seeded rows draw from their generator."""
    _num_rows, vocab_size = probs.shape
    q = torch.empty_like(probs)  # [n, vocab_size]
    unseeded = [row for row, g in enumerate(generators) if g is None]
    if unseeded:
        q[_index(unseeded, probs.device)] = torch.empty(len(unseeded), vocab_size, device=probs.device).exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            q[row] = torch.empty(vocab_size, device=probs.device).exponential_(generator=generator)
    # q == 0 is possible in principle; the floor keeps dropped tokens at 0 / tiny = 0, not NaN.
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    return (probs / q).argmax(dim=-1)


# ---------------------------------------------------------------------------------------------
# Small tensor helpers


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _param_column(
    requests: Sequence[Request], get: Callable[[SamplingParams], float], device: torch.device
) -> torch.Tensor:
    """[len(requests), 1] float32 column of one sampling parameter."""
    values = [float(get(r.sampling_params)) for r in requests]
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)
