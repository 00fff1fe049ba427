"""The engine: one step at a time over a scheduler, a model runner and a sampler.

    launch:   schedule -> run the model -> queue the sampling on the device
    collect:  wait for the tokens -> append them -> apply stops (the next launch needs them)
    finish:   detokenize -> outputs

    step() without overlap_outputs:  launch N, collect N, finish N
    step() with overlap_outputs:     collect N-1, launch N, finish N-1 (while N runs on the device)

It is a library with no threads, sockets or Ray: workers wrap it and drive `step()` in their own
loop. The step-level API a worker needs:
  * add_request / abort_request / step / has_unfinished_requests;
  * disaggregated prefill: a request added with `prefill_only=True` ends after its first token
    with its own status, FINISHED_HANDOFF (unless a real stop or its length ends it first): the step
    streams that token unfinished and lists a `Handoff` in `StepOutputs.handoffs`; the request's
    blocks stay held until `release_kv`, and `export_kv(request_id, layer)` copies one layer of them
    (`hold_kv=True` keeps the blocks of a request that simply finished, for export);
  * KV import for disaggregated decode: `import_request` allocates blocks for a prompt computed
    elsewhere, `import_kv` writes one layer into them, `commit_import` starts decoding.

A request with n > 1 becomes n child requests (ids `<id>#<i>`) that share the prompt's full blocks
through the prefix cache; their outputs are merged back into one RequestOutput.

Vision-language models: a request's images arrive as `MultiModalInputs` (embeddings computed by a
VisionEncoder, in this process or an encode worker) whose features sit on the prompt's expanded
placeholder tokens; the engine checks the placement, keeps them with the request and feeds them to the
model where the prompt is computed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import AutoTokenizer

from services.common.control import CacheConfigInfo, KVTierStats, SchedulerStats
from services.common.errors import InvalidRequestError
from services.common.histogram import SecondsHistogram, TokensHistogram, iteration_tokens_buckets
from services.engine.config import EngineConfig
from services.engine.detokenizer import IncrementalDetokenizer, decode_tokens
from services.engine.kv_cache.manager import KVCacheManager
from services.engine.model_runner import ModelRunner
from services.engine.models.hub import local_model_dir, local_tokenizer_dir
from services.engine.models.loader import read_model_config
from services.engine.multimodal.inputs import MultiModalInputs, check_multimodal_inputs
from services.engine.multimodal.spec import VisionLanguageSpec
from services.engine.outputs import CompletionOutput, Handoff, Logprob, PromptLogprobs, RequestOutput, StepOutputs
from services.engine.prompt_logprobs import PromptLogprobSpan, StepPromptLogprobs
from services.engine.request import Request, RequestStatus
from services.engine.sampler import PendingSample, Sampler, TokenLogprobs, needs_history
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler
from services.engine.slo_admission import make_slo_admission
from services.engine.step_timings import StepTimings
from services.engine.structured import GrammarMasks

logger = logging.getLogger(__name__)

PHASES = ("queue", "prefill", "decode", "inference")  # SchedulerStats.phase_seconds
# vLLM's buckets for request latencies (seconds)
REQUEST_LATENCY_BUCKETS_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0
)  # fmt: skip

# text, token ids, or {"prompt_token_ids": [...], "prompt": optional text}
Prompt = str | Sequence[int] | dict[str, Any]


@dataclass(eq=False)
class _Child:
    request: Request
    detokenizer: IncrementalDetokenizer
    parent: _Parent
    index: int
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)  # all positions so far
    # sampled, not yet detokenized (text and logprob tokens): `_detokenize` takes them
    undecoded_token_ids: list[int] = field(default_factory=list)
    undecoded_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # launched steps' shares of its prompt logprobs, read once its first token is in (_take_prompt_logprobs)
    prompt_logprob_parts: list[tuple[StepPromptLogprobs, PromptLogprobSpan]] = field(default_factory=list)


@dataclass
class _Collected:
    """A finished step's requests, tokens appended and stops applied, before their outputs are built."""

    parents: list[_Parent]
    handoffs: list[Handoff]


@dataclass(eq=False)
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[_Child] = field(default_factory=list)
    awaits_prompt_logprobs: bool = False  # asked for and not yet in an output
    first_token_reported: bool = False  # an output carried first_token_phases

    @property
    def finished(self) -> bool:
        return all(c.request.finished for c in self.children)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **overrides) -> None:
        config = replace(config or EngineConfig(), **overrides).resolved()
        self.config = config
        # a Hub id is fetched here, in the process that runs the engine (once per node: models/hub.py)
        self.model_dir = local_model_dir(config)
        self.hf_config = read_model_config(self.model_dir)
        self.vision_language = VisionLanguageSpec.from_hf_config(self.hf_config)  # None: text only
        self.tokenizer = AutoTokenizer.from_pretrained(local_tokenizer_dir(config, self.model_dir))
        self.runner = ModelRunner(config, self.model_dir, self.hf_config)
        self.kv_cache = KVCacheManager(
            self.runner.num_blocks,
            config.block_size,
            config.enable_prefix_caching,
            num_host_blocks=self.runner.num_host_blocks,
        )
        self.scheduler = Scheduler(
            self.kv_cache,
            config.max_num_batched_tokens,
            config.max_num_seqs,
            max_prefill_tokens_beside_decodes=config.max_prefill_tokens_beside_decodes,
            scheduling_policy=config.scheduling_policy,
            slo=make_slo_admission(config.ttft_slo_ms, config.tpot_slo_ms, config.block_size),
        )
        self.sampler = Sampler()
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.model.spec.vocab_size
        self.eos_token_ids = _eos_token_ids(self.hf_config, self.tokenizer, self.model_dir)
        self.grammars = GrammarMasks(
            self.tokenizer, self.vocab_size, self.eos_token_ids, config.max_num_seqs, self.runner.device
        )
        self._children: dict[str, _Child] = {}
        self._parents: dict[str, _Parent] = {}
        self._in_flight: PendingSample | None = None  # the step launched and not yet collected
        self.phase_seconds = {phase: SecondsHistogram(REQUEST_LATENCY_BUCKETS_S) for phase in PHASES}
        self.iteration_tokens = TokensHistogram(iteration_tokens_buckets(config.max_num_batched_tokens))
        # SchedulerStats.recent_steps / recent_finished, for the router; and the SLO gate's step-time model
        step_model = self.scheduler.slo.step_model if self.scheduler.slo is not None else None
        self.timings = StepTimings(step_model=step_model)

    # ------------------------------------------------------------------ requests in

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        cache_salt: str | None = None,
        hold_kv: bool = False,
        output_token_ids: Sequence[int] = (),
        prefill_only: bool = False,
        multi_modal: MultiModalInputs | None = None,
    ) -> None:
        """Validate and queue a request. Raises InvalidRequestError before anything is allocated.

        `output_token_ids` resumes a request whose first tokens were produced (and streamed) elsewhere:
        it recomputes prompt plus those tokens, then continues; they are not emitted again.
        `prefill_only` hands the request off after its next token (FINISHED_HANDOFF, KV held, text not
        flushed: the decode worker goes on) unless a real stop or max_tokens ends it first.
        `hold_kv` keeps the blocks of a request that finishes, until `release_kv` (KV export).
        `multi_modal` gives a vision-language model's images for a prompt whose placeholders are
        already expanded (see services.engine.multimodal); the request keeps them until it ends.
        """
        params = params or SamplingParams()
        if (output_token_ids or prefill_only) and params.n != 1:
            raise InvalidRequestError("a resumed or prefill-only request must have n == 1", param="n")
        if output_token_ids and params.max_tokens is not None and len(output_token_ids) >= params.max_tokens:
            raise InvalidRequestError("a resumed request has no tokens left to generate", param="max_tokens")
        if request_id in self._parents:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        prompt_text, token_ids = self._tokenize(prompt)
        max_output_tokens = self._validate(token_ids, params, cache_salt)
        multi_modal = self._place_multi_modal(multi_modal, token_ids)
        spec = params.structured  # one matcher per child: each follows its own output
        grammars = [self.grammars.matcher_for(spec) if spec else None for _ in range(params.n)]
        parent = _Parent(request_id, prompt_text, token_ids)
        # a resumed request's prompt logprobs went out with its first token, wherever that was computed
        parent.awaits_prompt_logprobs = params.prompt_logprobs is not None and not output_token_ids
        for index in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{index}"
            child_params = self._child_params(params, index)
            request = Request(
                child_id,
                list(token_ids),
                child_params,
                self._primary_eos,
                max_output_tokens,
                cache_salt=cache_salt,
                prompt_text=prompt_text,
                generator=self._generator(child_params.seed),
                hold_kv=hold_kv,
                prefill_only=prefill_only,
                multi_modal=multi_modal,
                grammar=grammars[index],
            )
            child = self._track(parent, request, index)
            self._replay_outputs(child, output_token_ids)
            self.scheduler.add(request)
        self._parents[request_id] = parent

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, dict):
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        return None, list(prompt)

    def _validate(self, token_ids: list[int], params: SamplingParams, cache_salt: str | None) -> int:
        """Check a request against this engine; returns its max output tokens."""
        if not token_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {self.vocab_size})", param="prompt")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(token_ids)} tokens; this model's context is {self.max_model_len} tokens "
                f"and at least one must be left for the output",
                param="prompt",
            )
        params.validate(self.vocab_size)
        room = self.max_model_len - len(token_ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise InvalidRequestError(
                f"max_tokens is {params.max_tokens} but the prompt's {len(token_ids)} tokens leave room for "
                f"{room} in this model's {self.max_model_len}-token context",
                param="max_tokens",
            )
        if cache_salt is not None and not (isinstance(cache_salt, str) and cache_salt):
            raise InvalidRequestError("cache_salt must be a non-empty string", param="cache_salt")
        return params.max_tokens or room

    def _place_multi_modal(self, multi_modal: MultiModalInputs | None, token_ids: list[int]) -> MultiModalInputs | None:
        """Check images against the prompt and this model; their embeddings moved to the model's device."""
        check_multimodal_inputs(
            multi_modal, token_ids, self.vision_language, self.runner.model.spec.hidden_size, self.max_model_len
        )
        if multi_modal is None or not multi_modal.features:
            return None
        return multi_modal.to(self.runner.device, self.runner.dtype)

    def _child_params(self, params: SamplingParams, index: int) -> SamplingParams:
        seed = None if params.seed is None else params.seed + index
        stop_ids = list(params.stop_token_ids)
        if not params.ignore_eos:  # models with several end tokens stop on any of them
            stop_ids += [t for t in self.eos_token_ids if t != self._primary_eos and t not in stop_ids]
        return replace(params, n=1, seed=seed, stop_token_ids=stop_ids)

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.runner.device).manual_seed(seed)

    @property
    def _primary_eos(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def _track(self, parent: _Parent, request: Request, index: int) -> _Child:
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, request.sampling_params)
        child = _Child(request, detok, parent, index)
        parent.children.append(child)
        self._children[request.request_id] = child
        return child

    def _replay_outputs(self, child: _Child, token_ids: Sequence[int]) -> None:
        """Append tokens produced elsewhere without emitting them again (their text was already sent).

        Stops are not checked here: whoever produced them already did, and the request was not finished.
        """
        child.request.output_token_ids.extend(token_ids)
        if token_ids:  # so were its prompt logprobs
            child.request.num_prompt_logprob_positions = child.request.num_prompt_tokens
        for token_id in token_ids:  # one at a time, as they were streamed: what was held back stays held
            child.detokenizer.update([token_id])
        child.detokenizer.take_delta()

    # ------------------------------------------------------------------ the step

    def step(self) -> StepOutputs:
        """Run one step; returns the outputs of the requests it advanced.

        A step is launched (schedule, run the model, queue the sampling on the device), collected
        (wait for the tokens, append them, apply every stop the scheduler must know of) and finished
        (detokenize, build the outputs). With `overlap_outputs` a call collects the step the previous
        call launched, launches the next one, and finishes the collected one while the device runs:
        detokenizing, building outputs and whatever the caller does with them (a worker sends them)
        overlap the next step's forward. The next step is scheduled only after the previous one was
        collected, so both orders schedule the same batches and give the same tokens; stop strings
        are found at collection (their text is decoded there), so they also end a request before
        the next step is scheduled.

        With `async_scheduling` as well, a call launches the next step before collecting the one in
        flight, so collection and scheduling overlap the device too: the next step's decodes take
        their input tokens from the device (`Request.num_pending_tokens`). A request its step in flight
        ends by a stop is then computed one step too many, and that token is dropped at collection;
        one its length or a handoff ends is not scheduled again. The batches can differ from the other
        orders' (a finished request frees its blocks and seat a step later), the tokens cannot. While a
        running request's sampling reads its earlier tokens (penalties), steps are not launched ahead.
        """
        if not self.config.overlap_outputs:
            self._launch()
            return self._finish(self._collect(self._take_in_flight()))
        if self.config.async_scheduling and self._in_flight is not None and self._can_launch_ahead():
            in_flight = self._take_in_flight()
            self._launch(in_flight)
            return self._finish(self._collect(in_flight))
        collected = self._collect(self._take_in_flight())
        self._launch()
        return self._finish(collected)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self._in_flight is not None

    def awaits_first_step(self, request_id: str) -> bool:
        """The request is queued and no step has taken it yet (False once one has, once it has left, and for
        an id the engine does not know). It never turns True again: a preempted request waits again, counted
        as started."""
        parent = self._parents.get(request_id)
        return parent is not None and any(child.request.status is RequestStatus.WAITING for child in parent.children)

    def _take_in_flight(self) -> PendingSample | None:
        in_flight, self._in_flight = self._in_flight, None
        return in_flight

    def _can_launch_ahead(self) -> bool:
        """Whether the next step may be scheduled before the one in flight is collected: not while a
        running request's sampling reads its earlier tokens themselves (penalties). A grammar's mask needs
        them too, but only once the forward is queued (`_grammar_bitmask` waits for them there)."""
        return not any(needs_history(r.sampling_params) for r in self.scheduler.running)

    def _launch(self, in_flight: PendingSample | None = None) -> None:
        """Schedule and run a step, its sampling queued on the device. With `in_flight` (asynchronous
        scheduling) that step is not collected yet: its tokens are pending, and inputs of this one."""
        batch = self.scheduler.schedule()
        self._issue_kv_copies()
        if batch.empty:
            return
        self.iteration_tokens.observe(sum(batch.num_new_tokens))
        started_s = time.monotonic()
        logits, sampled, prompt_logprobs = self.runner.execute(batch, self.kv_cache.block_ids, in_flight)
        now = time.monotonic()
        for request, num_new in zip(batch.requests, batch.num_new_tokens):
            request.num_computed_tokens += num_new
            if request.scheduled_s is None:
                request.scheduled_s = now
        if prompt_logprobs is not None:
            self._hold_prompt_logprobs(prompt_logprobs)
        if sampled:
            bitmask = self._grammar_bitmask(sampled, in_flight)
            self._in_flight = self.sampler.sample(logits, sampled, token_bitmask=bitmask)
            for request in sampled:
                request.num_pending_tokens += 1
        self.timings.launched(started_s, batch.requests, batch.num_new_tokens, self._in_flight)

    def _issue_kv_copies(self) -> None:
        """Queue the host-tier copies the last allocations planned (blocks evicted to host memory, prefix
        blocks restored from it) on the stream the forward runs on, before the next forward or KV import
        writes the device cache. Stream order then makes them right: an evicted block is read after every
        step already queued (the one in flight under asynchronous scheduling included) and before the
        next one overwrites it; a restored block is written before that step reads it."""
        plan = self.kv_cache.take_copy_plan()
        if plan:
            self.runner.copy_kv_blocks(plan)

    def _grammar_bitmask(self, sampled: list[Request], in_flight: PendingSample | None) -> torch.Tensor | None:
        """The constrained rows' token masks, computed on the host while the device runs the forward
        queued just before. A mask needs every token before it: with a step in flight (asynchronous
        scheduling) its tokens are waited for here, which that step's end and this forward overlap."""
        states = [r.grammar for r in sampled]
        if all(state is None for state in states):
            return None
        outputs: list[list[int]] = []
        for request in sampled:
            pending = in_flight.token_of(request) if in_flight is not None and request.grammar else None
            outputs.append(request.output_token_ids if pending is None else [*request.output_token_ids, pending])
        return self.grammars.fill(states, outputs)

    def _collect(self, pending: PendingSample | None) -> _Collected | None:
        if pending is None:
            return None
        result = pending.resolve()
        self.timings.collected(pending)
        touched: dict[str, _Parent] = {}
        handoffs = []
        for request, token_id, logprobs in zip(pending.requests, result.token_ids, result.logprobs):
            request.num_pending_tokens -= 1
            if request.finished:  # aborted, or stopped by the step before, while this one ran: dropped
                continue
            child = self._children[request.request_id]
            self._accept_token(child, token_id, logprobs)
            touched[child.parent.request_id] = child.parent
            if request.handed_off:
                handoffs.append(Handoff(request.request_id, list(request.output_token_ids)))
        return _Collected(list(touched.values()), handoffs)

    def _finish(self, collected: _Collected | None) -> StepOutputs:
        if collected is None:
            return StepOutputs()
        for parent in collected.parents:
            for child in parent.children:
                self._detokenize(child)
        return StepOutputs([self._make_output(parent) for parent in collected.parents], collected.handoffs)

    def _accept_token(self, child: _Child, token_id: int, logprobs: TokenLogprobs | None) -> None:
        """Append a sampled token and end the request if a stop applies (its text is decoded now only
        when it has stop strings to look for)."""
        request = child.request
        request.output_token_ids.append(token_id)
        child.delta_token_ids.append(token_id)
        child.undecoded_token_ids.append(token_id)
        if request.first_token_s is None:
            request.first_token_s = time.monotonic()
        if logprobs is not None:
            request.output_logprobs.append(logprobs)
            child.undecoded_logprobs.append(logprobs)
        stop_string = self._detokenize(child) if request.sampling_params.stop else None
        grammar_ended = request.grammar is not None and self.grammars.advance(request.grammar, request.output_token_ids)
        status = self._check_stop(request, token_id, stop_string, grammar_ended)
        if status is not None:
            self.scheduler.finish(request, status)
            self._observe_phases(request)
            if status is not RequestStatus.FINISHED_HANDOFF:  # held-back text goes on with the decode worker
                self._detokenize(child)

    def _observe_phases(self, request: Request) -> None:
        """A request ended here (not aborted): how long it waited, prefilled, decoded and ran."""
        end, scheduled, first = time.monotonic(), request.scheduled_s, request.first_token_s
        if scheduled is None or first is None:
            return
        self.phase_seconds["queue"].observe(scheduled - request.arrival_time_s)
        self.phase_seconds["prefill"].observe(first - scheduled)
        self.phase_seconds["decode"].observe(end - first)
        self.phase_seconds["inference"].observe(end - scheduled)
        self.timings.finished(request, end)

    def _detokenize(self, child: _Child) -> str | None:
        """Decode the child's new tokens (and its logprob entries' tokens); the stop string matched, if any.

        A child that finished (not handed off) also releases the text held back for stop strings."""
        stop_string = None
        if child.undecoded_token_ids:
            stop_string = child.detokenizer.update(child.undecoded_token_ids)
            child.undecoded_token_ids = []
        for logprobs in child.undecoded_logprobs:
            entry = {
                tid: Logprob(lp, rank, decode_tokens(self.tokenizer, [tid], skip_special_tokens=False))
                for tid, (lp, rank) in logprobs.items()
            }
            child.logprobs.append(entry)
            child.delta_logprobs.append(entry)
        child.undecoded_logprobs = []
        request = child.request
        if request.finished and request.status is not RequestStatus.FINISHED_HANDOFF:
            child.detokenizer.finish()
        return stop_string

    def _check_stop(
        self, request: Request, token_id: int, stop_string: str | None, grammar_ended: bool = False
    ) -> RequestStatus | None:
        params = request.sampling_params
        past_min = request.num_output_tokens >= params.min_tokens
        if past_min and not params.ignore_eos and token_id == request.eos_token_id:
            return RequestStatus.FINISHED_STOPPED
        if past_min and token_id in params.stop_token_ids:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        if stop_string is not None:
            request.stop_reason = stop_string
            return RequestStatus.FINISHED_STOPPED
        if grammar_ended:  # the output is complete: nothing the grammar allows may follow
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_output_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.prefill_only:
            return RequestStatus.FINISHED_HANDOFF
        return None

    def _make_output(self, parent: _Parent) -> RequestOutput:
        outputs = [self._completion(child) for child in parent.children]
        prompt_logprobs = self._take_prompt_logprobs(parent)
        left = parent.finished  # every child has left this engine (a handoff too: it goes on elsewhere)
        if left:
            self._forget(parent)
        finished = left and not any(child.request.handed_off for child in parent.children)
        return RequestOutput(
            parent.request_id,
            parent.prompt,
            parent.prompt_token_ids,
            outputs,
            finished,
            num_cached_tokens=parent.children[0].request.num_cached_prompt_tokens,
            prompt_logprobs=prompt_logprobs,
            first_token_phases=self._take_first_token_phases(parent),
        )

    @staticmethod
    def _take_first_token_phases(parent: _Parent) -> tuple[float, float] | None:
        """(queue s, prefill s) of the parent's earliest first token, once: in the output that brings it."""
        if parent.first_token_reported:
            return None
        firsts = [c.request for c in parent.children if c.request.first_token_s is not None]
        if not firsts:
            return None
        parent.first_token_reported = True
        request = min(firsts, key=lambda r: r.first_token_s or 0.0)
        first_token_s, scheduled_s = request.first_token_s or 0.0, request.scheduled_s or request.arrival_time_s
        return scheduled_s - request.arrival_time_s, first_token_s - scheduled_s

    def _hold_prompt_logprobs(self, step: StepPromptLogprobs) -> None:
        """Keep each request's share of a launched step's prompt logprobs until its first token is in."""
        for span in step.spans:
            span.request.num_prompt_logprob_positions = span.first_position + span.num_positions
            child = self._children.get(span.request.request_id)
            if child is not None:
                child.prompt_logprob_parts.append((step, span))

    def _take_prompt_logprobs(self, parent: _Parent) -> PromptLogprobs | None:
        """The prompt logprobs, in the first output where a child has its first token (so before or with
        every child's first token: each child computes them), None in every other output.

        A child's first token comes from the step of its prompt's last chunk: every share is launched."""
        if not parent.awaits_prompt_logprobs:
            return None
        done = next((c for c in parent.children if c.request.num_output_tokens > 0), None)
        if done is None:
            return None
        parent.awaits_prompt_logprobs = False
        entries: PromptLogprobs = [None]
        for step, span in done.prompt_logprob_parts:
            entries += [self._decoded_logprobs(entry) for entry in step.entries(span)]
        for child in parent.children:  # the others need theirs no more
            child.prompt_logprob_parts = []
            child.request.num_prompt_logprob_positions = child.request.num_prompt_tokens
        return entries

    def _decoded_logprobs(self, logprobs: TokenLogprobs) -> dict[int, Logprob]:
        return {
            tid: Logprob(lp, rank, decode_tokens(self.tokenizer, [tid], skip_special_tokens=False))
            for tid, (lp, rank) in logprobs.items()
        }

    def _completion(self, child: _Child) -> CompletionOutput:
        request = child.request
        params = request.sampling_params
        # token_ids and logprobs are the request's own lists (no per-step copy): final once finished
        out = CompletionOutput(
            index=child.index,
            text=child.detokenizer.output_text,
            token_ids=request.output_token_ids,
            logprobs=child.logprobs if params.logprobs is not None else None,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            delta_text=child.detokenizer.take_delta(),
            delta_token_ids=child.delta_token_ids,
            delta_logprobs=child.delta_logprobs if params.logprobs is not None else None,
        )
        child.delta_token_ids, child.delta_logprobs = [], []
        return out

    def _forget(self, parent: _Parent) -> None:
        self._parents.pop(parent.request_id, None)
        for child in parent.children:
            self._children.pop(child.request.request_id, None)

    # ------------------------------------------------------------------ abort

    def abort_request(self, request_id: str) -> bool:
        """Stop a request at any moment and free everything it holds. False if it is unknown."""
        parent = self._parents.get(request_id)
        if parent is None:
            return self.release_kv(request_id)
        for child in parent.children:
            request = child.request
            request.hold_kv = False
            if not request.finished:
                self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
            else:
                self.kv_cache.free(request.request_id)
        self._forget(parent)
        return True

    # ------------------------------------------------------------------ KV export (prefill side)

    def export_kv(self, request_id: str, layer_index: int) -> torch.Tensor:
        """One layer of a held request's KV: [2, num_blocks, block_size, num_kv_heads, head_dim]."""
        return self.runner.read_kv(layer_index, self._held_block_ids(request_id))

    def release_kv(self, request_id: str) -> bool:
        """Free the blocks a handed-off or finished `hold_kv` request kept. False if it holds none."""
        if not self.kv_cache.holds(request_id):
            return False
        self.kv_cache.free(request_id)
        return True

    def _held_block_ids(self, request_id: str) -> list[int]:
        if not self.kv_cache.holds(request_id):
            raise KeyError(f"request {request_id!r} holds no KV blocks")
        return self.kv_cache.block_ids(request_id)

    # ------------------------------------------------------------------ KV import (decode side)

    def import_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        output_token_ids: list[int],
        params: SamplingParams,
        *,
        cache_salt: str | None = None,
        multi_modal: MultiModalInputs | None = None,
    ) -> list[int] | None:
        """Reserve blocks for a prompt whose KV was computed elsewhere.

        `output_token_ids` are tokens already sampled remotely (at least the first). Returns the block
        ids the KV must be imported into, or None when the cache has no room now (try again later).
        An image prompt passes its `multi_modal` inputs too: they key its blocks' hashes, give the
        M-RoPE delta of its decode positions, and serve a recompute after preemption.
        """
        if params.n != 1:
            raise InvalidRequestError("an imported request must have n == 1", param="n")
        max_output_tokens = self._validate(prompt_token_ids, params, cache_salt)
        multi_modal = self._place_multi_modal(multi_modal, list(prompt_token_ids))
        request = Request(
            request_id,
            list(prompt_token_ids),
            self._child_params(params, 0),
            self._primary_eos,
            max_output_tokens,
            cache_salt=cache_salt,
            generator=self._generator(params.seed),
            multi_modal=multi_modal,
            grammar=self.grammars.matcher_for(params.structured) if params.structured else None,
        )
        block_ids = self.kv_cache.allocate_for_import(request, len(prompt_token_ids))
        self._issue_kv_copies()  # the blocks it evicted are saved before import_kv overwrites them
        if block_ids is None:
            return None
        parent = _Parent(request_id, None, list(prompt_token_ids))
        self._replay_outputs(self._track(parent, request, 0), output_token_ids)
        self._parents[request_id] = parent
        return block_ids

    def import_kv(self, request_id: str, layer_index: int, kv: torch.Tensor) -> None:
        self.runner.write_kv(layer_index, self._held_block_ids(request_id), kv)

    def commit_import(self, request_id: str) -> None:
        """All layers are in: the request decodes from here on."""
        request = self._children[request_id].request
        request.num_computed_tokens = request.num_prompt_tokens
        self.kv_cache.commit_imported(request, request.num_prompt_tokens)
        if not request.finished:
            self.scheduler.add_running(request)

    # ------------------------------------------------------------------ introspection

    def scheduler_stats(self) -> SchedulerStats:
        """Queues, prefill work queued, KV blocks per tier, preemptions and prefix-cache tokens, for
        metrics and the router's load view. Safe to call from another thread (it only reads)."""
        scheduler, kv_cache = self.scheduler, self.kv_cache
        device = KVTierStats(
            tier="device", num_free_blocks=kv_cache.num_free_blocks(), num_total_blocks=kv_cache.pool.num_usable_blocks
        )
        tiers = [device]
        if kv_cache.host is not None:  # its free blocks are the slots holding no KV
            tiers.append(
                KVTierStats(
                    tier="host",
                    num_free_blocks=kv_cache.host.num_free_blocks,
                    num_total_blocks=kv_cache.host.num_blocks,
                )
            )
        bytes_per_block = self.runner.kv_bytes_per_block
        return SchedulerStats(
            num_running_requests=len(scheduler.running),
            num_waiting_requests=len(scheduler.waiting),
            num_decoding_requests=scheduler.num_decoding,
            queued_prefill_tokens=scheduler.queued_prefill_tokens,
            kv_tiers=tiers,
            num_preemptions=scheduler.num_preemptions_total,
            num_slo_held_admissions=scheduler.num_slo_held_total,
            prefix_cache_queried_tokens=kv_cache.prefix_cache_queried_tokens,
            prefix_cache_hit_tokens=kv_cache.prefix_cache_hit_tokens,
            host_hit_tokens=kv_cache.host_hit_tokens,
            kv_offloaded_bytes=kv_cache.num_offloaded_blocks * bytes_per_block,
            kv_onloaded_bytes=kv_cache.num_onloaded_blocks * bytes_per_block,
            phase_seconds={phase: histogram.snapshot() for phase, histogram in self.phase_seconds.items()},
            iteration_tokens=self.iteration_tokens.snapshot(),
            recent_steps=self.timings.recent_steps(),
            recent_finished=self.timings.recent_finished(),
            cache_config=CacheConfigInfo(
                block_size=self.config.block_size,
                num_gpu_blocks=device.num_total_blocks,
                enable_prefix_caching=self.config.enable_prefix_caching,
                cache_dtype=self.config.dtype,
                gpu_memory_utilization=self.config.gpu_memory_utilization,
            ),
        )

    def num_free_blocks(self) -> int:
        return self.kv_cache.num_free_blocks()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block, device and host tier (False, changing nothing, while a request holds
        blocks). The KV events say AllBlocksCleared."""
        return self.kv_cache.reset_prefix_cache()

    def num_usable_blocks(self) -> int:
        return self.kv_cache.pool.num_usable_blocks


def _eos_token_ids(hf_config, tokenizer, model_dir: str) -> list[int]:
    """End-of-sequence ids: generation_config.json first (it may list several), then the config, then the tokenizer."""
    from transformers import GenerationConfig

    candidates = None
    with contextlib.suppress(OSError):  # no generation_config.json
        candidates = GenerationConfig.from_pretrained(model_dir).eos_token_id
    if candidates is None:
        candidates = getattr(hf_config, "eos_token_id", None)
    if candidates is None:
        candidates = tokenizer.eos_token_id
    if candidates is None:
        return []
    return [candidates] if isinstance(candidates, int) else list(candidates)
