"""The model runner: turns a scheduled batch into flat model inputs, runs the model, returns logits.

It owns the device-side state: the weights, the KV cache tensor, the attention backend and the
captured CUDA graphs; and the host KV tier's bytes (`host_kv`, EngineConfig.kv_offloading_size), whose
copies `copy_kv_blocks` queues on the stream every forward runs on. Per step:

    prepare_inputs(batch) -> input_ids, positions, AttentionMetadata, rows to sample
    forward (eager, or a captured graph for decode-only batches)
    compute_logits(hidden[rows to sample])
    prompt logprobs from the rows of chunks that ask for them (services.engine.prompt_logprobs)

CUDA graphs, two kinds, sharing one memory pool and one set of static input buffers:
  * decode: decode-only batches up to `max_cuda_graph_batch_size` rows run a graph captured for the
    next larger size in `CUDA_GRAPH_BATCH_SIZES` (the split-K decode kernel); padding rows point at
    the padding block (0) with sequence length 0, so they write only there and read nothing.
  * mixed: a step with prefill chunks and at most `mixed_cuda_graph_max_tokens` tokens runs a graph
    captured for the next multiple of `MIXED_GRAPH_TOKEN_STEP` tokens and `max_num_seqs` sequences:
    the decode kernel over its leading decodes (their count a device value) and one varlen launch
    over the prefill chunks. Padding tokens write the padding block and belong to no sequence;
    padding sequences have no tokens and no tiles.
  Without graphs a mixed step runs eagerly: ~20 kernel launches a layer plus the attention.

Inputs travel in one pinned host buffer per integer width and one copy each (`_InputStaging`),
instead of one pinned allocation and copy per array.

Image requests add two inputs, both for prompt positions only:
  * embedding overrides: the rows of this step's tokens that are an image's placeholder tokens take
    that image's embedding rows (a chunk that cuts an image takes the matching slice);
  * rotary positions: a Qwen2-VL prompt's own M-RoPE positions ([3, ...]) where a chunk covers them,
    and p + delta for tokens past the prompt. A step whose chunks cover no M-RoPE prompt position
    keeps one row of positions, so decode steps run as before (CUDA graphs included).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

from services.engine.attention.backends import AttentionMetadata, VarlenInputs, create_attention
from services.engine.attention.tiles import build_tile_map, max_num_tiles, tokens_per_tile
from services.engine.config import CPU_KV_CACHE_BYTES, EngineConfig
from services.engine.kv_cache.host_tier import HostKVBuffer, KVCopyPlan
from services.engine.models import load_model
from services.engine.models.llama import DecoderLayer, DecoderLM, EmbeddingOverrides
from services.engine.prompt_logprobs import PromptLogprobRows, StepPromptLogprobs, compute_prompt_logprobs
from services.engine.sampler import PendingSample
from services.engine.scheduler import ScheduledBatch

logger = logging.getLogger(__name__)

CUDA_GRAPH_BATCH_SIZES = [1, 2, 4, 8] + list(range(16, 513, 16))
MIXED_GRAPH_TOKEN_STEP = 64  # mixed graphs are captured every this many tokens: padding < 64 tokens


@dataclass
class StepInputs:
    """One step's inputs as host arrays; `execute` sends them to the device for the path it takes."""

    input_ids: np.ndarray  # [num_tokens] int64
    positions: np.ndarray  # [num_tokens] rotary positions, or [3, num_tokens] with M-RoPE prompt chunks
    slot_mapping: np.ndarray  # [num_tokens] int64, flat cache slot of each token
    block_table: np.ndarray  # [num_seqs, width] int32
    seq_lens: np.ndarray  # [num_seqs] int32, context after this step
    query_start_loc: np.ndarray  # [num_seqs + 1] int32
    num_decode_seqs: int  # leading sequences with one new token
    sample_rows: np.ndarray  # [num_sampled] int64 rows of the hidden states to sample from
    sampled_requests: list  # the requests those rows belong to
    embedding_overrides: EmbeddingOverrides | None = None  # image rows of this step's tokens
    # rows whose input token is still on the device (asynchronous scheduling), and their requests
    pending_rows: list[int] = field(default_factory=list)
    pending_requests: list = field(default_factory=list)
    prompt_logprob_rows: PromptLogprobRows | None = None  # rows whose logits give prompt logprobs

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def graph_compatible(self) -> bool:
        """Plain token embeddings and one row of positions: what a captured graph takes."""
        return self.embedding_overrides is None and self.positions.ndim == 1


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: str, hf_config) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        start = time.perf_counter()
        # the fused Triton ops go with the Triton attention backend (the GPU fast path); torch otherwise.
        # Their products of few rows take the skinny kernel unless small_batch_linear is "torch".
        ops = "torch"
        if config.attention_backend == "triton":
            ops = "triton" if config.small_batch_linear == "triton" else "triton_torch_linear"
        self.model: DecoderLM = load_model(
            model_dir, hf_config, self.device, self.dtype, config.load_format, config.seed, ops=ops
        )
        logger.info("loaded %s in %.1f s", model_dir, time.perf_counter() - start)
        spec = self.model.spec
        self.kv_bytes_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * self.dtype.itemsize
        self.num_blocks = self._num_kv_blocks()
        self.kv_cache = torch.zeros(  # [layers, k|v, blocks, block_size, kv_heads, head_dim]
            spec.num_layers,
            2,
            self.num_blocks,
            self.block_size,
            spec.num_kv_heads,
            spec.head_dim,
            device=self.device,
            dtype=self.dtype,
        )
        self.attention = create_attention(config.attention_backend, self.kv_cache, spec.head_dim**-0.5)
        self.num_host_blocks = self._num_host_kv_blocks()
        self.host_kv: HostKVBuffer | None = None
        if self.num_host_blocks:
            self.host_kv = HostKVBuffer(self.num_host_blocks, self.kv_cache[:, :, 0].shape, self.dtype, self.device)
            logger.info("host KV tier: %d blocks, %.2f GiB", self.num_host_blocks, config.kv_offloading_size)
        self.max_model_len = self._max_model_len()
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self._staging = _InputStaging(self.device)
        # the varlen kernel: eager prefill chunks (unless SDPA is asked for) and every mixed graph
        use_triton = config.attention_backend == "triton"
        self._varlen_eager = use_triton and config.varlen_prefill_attention
        self._varlen_block_q = tokens_per_tile(spec.num_heads, spec.num_kv_heads) if use_triton else 0
        use_graphs = self.device.type == "cuda" and config.enable_cuda_graphs
        self._max_graph_seqs = config.max_num_seqs
        self._mixed_graph_sizes = _mixed_graph_sizes(
            min(config.mixed_cuda_graph_max_tokens, config.max_num_batched_tokens) if use_graphs and use_triton else 0
        )
        self._graphs: dict[int, _CapturedStep] = {}
        self._mixed_graphs: dict[int, _CapturedStep] = {}
        self.steps_by_path: Counter[str] = Counter()  # decode_graph | mixed_graph | eager: which path ran
        if use_graphs:
            self._capture_graphs()

    # ------------------------------------------------------------------ sizing

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        if cfg.kv_cache_memory_bytes is not None:
            budget = cfg.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            budget = self._profile_free_gpu_bytes()
        else:
            budget = CPU_KV_CACHE_BYTES
        num_blocks = budget // (self.kv_bytes_per_token * self.block_size)
        if num_blocks < 2:
            raise ValueError(f"a KV budget of {budget} bytes holds no block of {self.block_size} tokens")
        return int(num_blocks)

    @property
    def kv_bytes_per_block(self) -> int:
        """One block's KV over every layer, k and v."""
        return self.kv_bytes_per_token * self.block_size

    def _num_host_kv_blocks(self) -> int:
        """Blocks of the host tier: its budget over one block's bytes (0: off)."""
        budget = self.config.kv_offloading_bytes
        if budget == 0:
            return 0
        num_blocks = budget // self.kv_bytes_per_block
        if num_blocks < 1:
            raise ValueError(
                f"kv_offloading_size {self.config.kv_offloading_size} GiB holds no KV block of "
                f"{self.kv_bytes_per_block} bytes"
            )
        return int(num_blocks)

    def _profile_free_gpu_bytes(self) -> int:
        """Run the largest step once without a cache to measure peak activations; the rest is KV room."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        num_tokens = self.config.max_num_batched_tokens
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        hidden = self.model.embed_tokens(ids)
        spec = self.model.spec
        # an MLP pass of the largest step dominates activations; logits of max_num_seqs rows too
        layer = cast(DecoderLayer, self.model.layers[0])  # cast: nn.ModuleList indexes as a plain Module
        layer.mlp(hidden)
        layer.self_attn.qkv_proj(hidden)
        self.model.ops.add_rms_norm(hidden, hidden, layer.input_layernorm.weight, layer.input_layernorm.eps)
        self.model.compute_logits(hidden[: min(num_tokens, self.config.max_num_seqs)])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        total = torch.cuda.get_device_properties(self.device).total_memory
        del ids, hidden
        torch.cuda.empty_cache()
        headroom = int(0.25 * (peak - torch.cuda.memory_allocated())) + 256 * 2**20  # graphs, sampler, fragmentation
        budget = int(total * self.config.gpu_memory_utilization) - peak - headroom
        logger.info(
            "GPU memory: total %.1f GiB x utilization %.4f, peak after load %.1f GiB, KV budget %.1f GiB "
            "(%d layers, %d kv heads)",
            total / 2**30,
            self.config.gpu_memory_utilization,
            peak / 2**30,
            budget / 2**30,
            spec.num_layers,
            spec.num_kv_heads,
        )
        return max(budget, 0)

    def _max_model_len(self) -> int:
        model_len = self.model.spec.max_position_embeddings
        if self.config.max_model_len is not None:
            if self.config.max_model_len > model_len:
                raise ValueError(
                    f"max_model_len {self.config.max_model_len} exceeds the model's max_position_embeddings {model_len}"
                )
            model_len = self.config.max_model_len
        pool_tokens = (self.num_blocks - 1) * self.block_size
        return min(model_len, pool_tokens)

    # ------------------------------------------------------------------ inputs

    def prepare_inputs(self, batch: ScheduledBatch, block_ids: Callable[[str], list[int]]) -> StepInputs:
        """Lay the batch's new tokens out in one flat array and compute where each one lives.

        One request i (row i of the batch) contributes the tokens it computes this step:

            all_token_ids  | computed (KV in cache) |  new this step  | later chunks |
                           0                      start             end       num_tokens
                           start = num_computed_tokens,  end = start + num_new_tokens[i]

            flat rows      [lo, hi) = [query_start_loc[i], query_start_loc[i + 1])
            ids[lo:hi] = all_token_ids[start:end]      positions[lo:hi] = start, ..., end - 1
            seq_lens[i] = end  (the context attention reads, this step's tokens included)
            sampled iff end == num_tokens (a decode, or a prompt's last chunk), from row hi - 1

        Example, block_size bs = 4, in the scheduler's batch order (decodes first, then prefill chunks:
        running prefills, then newly admitted requests): A and B decode; C continues its 12-token
        prompt from position 6 with a 3-token chunk; D is new, its whole 5-token prompt in one chunk.

            block_table (width = the most blocks any request holds; short rows padded with block 0,
            the padding block)          col 0  1  2
                                     A  [  3,  7,  0 ]    num_computed_tokens 6, num_tokens 7
                                     B  [  5,  2,  0 ]    num_computed_tokens 4, num_tokens 5
                                     C  [  1,  4,  9 ]    num_computed_tokens 6, num_tokens 12
                                     D  [  6,  8,  0 ]    num_computed_tokens 0, num_tokens 5

            num_new_tokens     1    1    3              5
            query_start_loc  [ 0,   1,   2,             5,                         10 ]  (last: num_tokens)

            flat row t         0    1    2    3    4    5    6    7    8    9
            request            A    B    C    C    C    D    D    D    D    D
                             |dec |dec |<-- C chunk -->|<------- D prompt ------->|
            positions p        6    4    6    7    8    0    1    2    3    4
            p // bs            1    1    1    1    2    0    0    0    0    1
            block              7    2    4    4    9    6    6    6    6    8    = block_table[row, p // bs]
            slot_mapping      30    8   18   19   36   24   25   26   27   32    = block * bs + p % bs
            sampled            *    *                                      *    (C's chunk ends at 9 < 12)

            sample_indices = [0, 1, 9], sampled_requests = [A, B, D]: the logits are taken at these rows
            seq_lens       = [7, 5, 9, 5]
            num_decode_seqs = 2: the leading run of one-token rows (argmin of num_new_tokens == 1); every
                              row after the first multi-token row takes the prefill path

        `positions` are KV positions; the rotary positions differ only for M-RoPE image prompts
        (`_rotary_positions`).
        """
        bs = self.block_size
        num_seqs = len(batch.requests)
        width = max(len(block_ids(r.request_id)) for r in batch.requests)
        table = np.zeros((num_seqs, width), dtype=np.int32)
        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(batch.num_new_tokens, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        ids = np.empty(num_tokens, dtype=np.int64)
        positions = np.empty(num_tokens, dtype=np.int64)
        seq_lens = np.empty(num_seqs, dtype=np.int32)
        sample_rows, sampled = [], []
        pending_rows, pending_requests = [], []
        prompt_logprob_rows = PromptLogprobRows()
        for i, (req, num_new) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            start, end = req.num_computed_tokens, req.num_computed_tokens + num_new
            blocks = block_ids(req.request_id)
            table[i, : len(blocks)] = blocks
            lo, hi = query_start_loc[i], query_start_loc[i + 1]
            if num_new == 1:
                prompt_len = req.num_prompt_tokens  # one token: index it without concatenating the lists
                if start >= req.num_tokens:  # sampled by the step in flight: it comes from the device
                    ids[lo] = 0
                    pending_rows.append(int(lo))
                    pending_requests.append(req)
                elif start < prompt_len:
                    ids[lo] = req.prompt_token_ids[start]
                else:
                    ids[lo] = req.output_token_ids[start - prompt_len]
                positions[lo] = start
            else:
                ids[lo:hi] = req.all_token_ids[start:end]
                positions[lo:hi] = np.arange(start, end)
            seq_lens[i] = end
            if req.computes_prompt_logprobs:
                prompt_logprob_rows.add(req, int(lo), start, end)
            if end == req.num_tokens_with_pending:
                sample_rows.append(hi - 1)
                sampled.append(req)
        rows = np.repeat(np.arange(num_seqs), batch.num_new_tokens)
        slots = table[rows, positions // bs].astype(np.int64) * bs + positions % bs
        is_single = np.asarray(batch.num_new_tokens) == 1
        num_decode_seqs = int(np.argmin(is_single)) if not is_single.all() else num_seqs
        has_images = any(r.multi_modal is not None for r in batch.requests)
        rotary_positions = _rotary_positions(batch, positions, query_start_loc) if has_images else positions
        return StepInputs(
            input_ids=ids,
            positions=rotary_positions,
            slot_mapping=slots,
            block_table=table,
            seq_lens=seq_lens,
            query_start_loc=query_start_loc.astype(np.int32),
            num_decode_seqs=num_decode_seqs,
            sample_rows=np.asarray(sample_rows, dtype=np.int64),
            sampled_requests=sampled,
            embedding_overrides=self._embedding_overrides(batch, query_start_loc) if has_images else None,
            pending_rows=pending_rows,
            pending_requests=pending_requests,
            prompt_logprob_rows=prompt_logprob_rows if prompt_logprob_rows.spans else None,
        )

    def _embedding_overrides(self, batch: ScheduledBatch, query_start_loc: np.ndarray) -> EmbeddingOverrides | None:
        """The step's tokens that are image placeholders, with their embedding rows."""
        rows: list[np.ndarray] = []
        embeddings: list[torch.Tensor] = []
        for i, (req, num_new) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            if req.multi_modal is None:
                continue
            start = req.num_computed_tokens
            for position, image_rows in req.multi_modal.rows_in(start, start + num_new):
                rows.append(query_start_loc[i] + position - start + np.arange(image_rows.shape[0]))
                embeddings.append(image_rows)
        if not rows:
            return None
        return EmbeddingOverrides(_to_device(np.concatenate(rows), self.device), torch.cat(embeddings))

    # ------------------------------------------------------------------ execution

    @torch.inference_mode()
    def execute(
        self, batch: ScheduledBatch, block_ids: Callable[[str], list[int]], in_flight: PendingSample | None = None
    ) -> tuple[torch.Tensor, list, StepPromptLogprobs | None]:
        """Run one step; returns (logits [num_sampled, vocab], the sampled requests in row order, the
        prompt logprobs its prefill chunks computed or None).

        `in_flight`: the step launched before this one and not yet collected (asynchronous scheduling),
        whose sampled tokens are the inputs of this step's decodes past their known tokens.
        """
        inputs = self.prepare_inputs(batch, block_ids)
        graph = self._graph_for_step(inputs)
        tile_map = self._tile_map(inputs, graph)
        num_decode_seqs = np.array([inputs.num_decode_seqs], dtype=np.int32)
        arrays = [inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.sample_rows]
        arrays += [*self._pending_inputs(inputs, in_flight)]
        arrays += [inputs.block_table, inputs.seq_lens, inputs.query_start_loc, num_decode_seqs, *tile_map]
        ids, positions, slots, sample_rows, pending_rows, in_flight_rows, table, seq_lens, query_start_loc, *rest = (
            self._staging.upload(arrays)
        )
        num_decodes, *tiles = rest
        if inputs.pending_rows:
            assert in_flight is not None
            ids.index_copy_(0, pending_rows, in_flight.token_ids.index_select(0, in_flight_rows))
        if graph is not None:
            self.steps_by_path["mixed_graph" if graph.num_tiles else "decode_graph"] += 1
            hidden = graph.replay(ids, positions, slots, table, seq_lens, query_start_loc, num_decodes, tiles)
        else:
            self.steps_by_path["eager"] += 1
            varlen = VarlenInputs(query_start_loc, tiles[0], tiles[1]) if tiles else None
            self.attention.metadata = AttentionMetadata(
                slot_mapping=slots,
                block_tables=table,
                seq_lens=seq_lens,
                num_decode_seqs=inputs.num_decode_seqs,
                query_start_loc=inputs.query_start_loc.tolist(),
                seq_lens_host=inputs.seq_lens.tolist(),
                max_seq_len=int(inputs.seq_lens.max()),
                varlen=varlen,
            )
            hidden = self.model(ids, positions, self.attention, inputs.embedding_overrides)
        logits = self.model.compute_logits(hidden[sample_rows])
        prompt_logprobs = None
        if inputs.prompt_logprob_rows is not None:  # every path leaves every token's hidden state
            prompt_logprobs = compute_prompt_logprobs(
                self.model.compute_logits, hidden, inputs.prompt_logprob_rows, self.model.spec.vocab_size
            )
        return logits, inputs.sampled_requests, prompt_logprobs

    @staticmethod
    def _pending_inputs(inputs: StepInputs, in_flight: PendingSample | None) -> tuple[np.ndarray, np.ndarray]:
        """(this step's rows whose token is on the device, the rows of the step in flight that sampled them)."""
        if not inputs.pending_rows:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        if in_flight is None:
            raise RuntimeError("a step's input token is pending but no step is in flight")
        sampled_rows = [in_flight.row_of(r) for r in inputs.pending_requests]
        return np.asarray(inputs.pending_rows, dtype=np.int64), np.asarray(sampled_rows, dtype=np.int64)

    def _graph_for_step(self, inputs: StepInputs) -> _CapturedStep | None:
        """The captured graph this step replays, if any: decode-only, else mixed, else none (eager)."""
        if not inputs.graph_compatible:
            return None
        if inputs.num_decode_seqs == inputs.num_seqs:
            return self._graph_for(inputs.num_seqs)
        if inputs.num_seqs > self._max_graph_seqs:
            return None
        for size in self._mixed_graph_sizes:
            if size >= inputs.num_tokens:
                return self._mixed_graphs[size]
        return None

    def _tile_map(self, inputs: StepInputs, graph: _CapturedStep | None) -> list[np.ndarray]:
        """The varlen kernel's tile map for this step's path: none for a decode graph or SDPA prefill."""
        if graph is not None:
            if graph.num_tiles == 0:
                return []
            first_seq = inputs.num_decode_seqs  # the decodes go to the decode kernel
            return list(build_tile_map(inputs.query_start_loc, first_seq, self._varlen_block_q, graph.num_tiles))
        if not self._varlen_eager or inputs.num_decode_seqs == inputs.num_seqs:
            return []
        return list(build_tile_map(inputs.query_start_loc, inputs.num_decode_seqs, self._varlen_block_q))

    # ------------------------------------------------------------------ KV export / import

    @torch.inference_mode()
    def copy_kv_blocks(self, plan: KVCopyPlan) -> None:
        """Queue the copies between the device cache and the host tier on the current stream, the one
        `execute` runs on: called before the forward that may overwrite the evicted blocks or read the
        restored ones, stream order makes both right without a synchronisation."""
        assert self.host_kv is not None, "a copy plan without a host tier"
        self.host_kv.issue(self.kv_cache, plan)

    def read_kv(self, layer_index: int, block_ids: list[int]) -> torch.Tensor:
        """A copy of the given blocks of one layer: [2, num_blocks, block_size, num_kv_heads, head_dim]."""
        return self.kv_cache[layer_index].index_select(1, self._block_index(block_ids))

    def write_kv(self, layer_index: int, block_ids: list[int], kv: torch.Tensor) -> None:
        expected = (2, len(block_ids), *self.kv_cache.shape[3:])
        if tuple(kv.shape) != expected or kv.dtype != self.dtype:
            raise ValueError(
                f"KV of shape {tuple(kv.shape)} {kv.dtype} does not fit blocks of shape {expected} {self.dtype}"
            )
        self.kv_cache[layer_index].index_copy_(1, self._block_index(block_ids), kv.to(self.device, non_blocking=True))

    def _block_index(self, block_ids: list[int]) -> torch.Tensor:
        # through pinned memory: a plain host-to-GPU copy would wait for every copy queued before it
        # on the stream, and KV transfers queue many
        return _to_device(np.asarray(block_ids, dtype=np.int64), self.device)

    # ------------------------------------------------------------------ CUDA graphs

    def _graph_for(self, num_seqs: int) -> _CapturedStep | None:
        """The decode graph for a decode-only batch of num_seqs rows."""
        for size in CUDA_GRAPH_BATCH_SIZES:
            if size >= num_seqs and size in self._graphs:
                return self._graphs[size]
        return None

    def _decode_graph_sizes(self) -> list[int]:
        limit = min(self.config.max_cuda_graph_batch_size, self.config.max_num_seqs)
        sizes = [s for s in CUDA_GRAPH_BATCH_SIZES if s <= limit]
        if limit not in sizes and limit < CUDA_GRAPH_BATCH_SIZES[-1]:
            sizes.append(next(s for s in CUDA_GRAPH_BATCH_SIZES if s >= limit))
        return sizes

    def _capture_graphs(self) -> None:
        decode_sizes = self._decode_graph_sizes()
        mixed_sizes = self._mixed_graph_sizes
        max_seqs = max([*decode_sizes, self._max_graph_seqs if mixed_sizes else 0])
        max_tokens = max([*decode_sizes, *mixed_sizes])
        max_tiles = max_num_tiles(max(mixed_sizes), max_seqs, self._varlen_block_q) if mixed_sizes else 0
        buffers = _GraphBuffers(max_tokens, max_seqs, self.max_blocks_per_seq, max_tiles, self.device)
        pool = torch.cuda.graph_pool_handle()
        start = time.perf_counter()
        # largest first, mixed before decode, so smaller ones reuse the pool's memory
        for size in sorted(mixed_sizes, reverse=True):
            num_tiles = max_num_tiles(size, self._max_graph_seqs, self._varlen_block_q)
            self._mixed_graphs[size] = _CapturedStep(
                self.model, self.attention, buffers, size, self._max_graph_seqs, num_tiles, self.max_model_len, pool
            )
        for size in sorted(decode_sizes, reverse=True):
            self._graphs[size] = _CapturedStep(
                self.model, self.attention, buffers, size, size, 0, self.max_model_len, pool
            )
        logger.info(
            "captured %d decode and %d mixed-step CUDA graphs in %.1f s",
            len(decode_sizes),
            len(mixed_sizes),
            time.perf_counter() - start,
        )


class _GraphBuffers:
    """Static inputs shared by every captured graph (a graph reads fixed addresses)."""

    def __init__(
        self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, max_tiles: int, device: torch.device
    ) -> None:
        self.input_ids = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self.query_start_loc = torch.zeros(max_seqs + 1, dtype=torch.int32, device=device)
        self.tile_seqs = torch.full((max_tiles,), -1, dtype=torch.int32, device=device)
        self.tile_token_starts = torch.zeros(max_tiles, dtype=torch.int32, device=device)
        self.num_decode_seqs = torch.zeros(1, dtype=torch.int32, device=device)


class _CapturedStep:
    """One captured forward pass over `num_tokens` tokens of at most `num_seqs` sequences.

    Decode graphs (num_tiles == 0): one token per sequence, the split-K decode kernel, num_tokens ==
    num_seqs. Mixed graphs: every sequence through the varlen kernel over a tile map of num_tiles.
    """

    def __init__(
        self,
        model: DecoderLM,
        attention,
        buffers: _GraphBuffers,
        num_tokens: int,
        num_seqs: int,
        num_tiles: int,
        max_model_len: int,
        pool,
    ) -> None:
        self.buffers, self.num_tokens, self.num_seqs, self.num_tiles = buffers, num_tokens, num_seqs, num_tiles
        b = buffers
        varlen = None
        if num_tiles:
            varlen = VarlenInputs(
                b.query_start_loc[: num_seqs + 1],
                b.tile_seqs[:num_tiles],
                b.tile_token_starts[:num_tiles],
                zero_fill=True,
                decode_rows=min(num_tokens, num_seqs),
                num_decode_seqs=b.num_decode_seqs,
            )
        self.metadata = AttentionMetadata(
            slot_mapping=b.slot_mapping[:num_tokens],
            block_tables=b.block_tables[:num_seqs],
            seq_lens=b.seq_lens[:num_seqs],
            num_decode_seqs=0 if num_tiles else num_seqs,
            query_start_loc=list(range(num_seqs + 1)),  # host copies: unused by the captured kernels
            seq_lens_host=[1] * num_seqs,
            max_seq_len=max_model_len,
            varlen=varlen,
        )
        self.attention, self.model = attention, model
        if not num_tiles:
            b.seq_lens[:num_seqs].fill_(1)
        for _ in range(2):  # warm up (Triton compiles, cuBLAS picks kernels) outside the capture
            self._run()
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.hidden = self._run()
        b.seq_lens.zero_()

    def _run(self) -> torch.Tensor:
        self.attention.metadata = self.metadata
        n = self.num_tokens
        return self.model(self.buffers.input_ids[:n], self.buffers.positions[:n], self.attention)

    def replay(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        query_start_loc: torch.Tensor,
        num_decode_seqs: torch.Tensor,
        tile_map: list[torch.Tensor],
    ) -> torch.Tensor:
        """Copy this step's inputs into the static buffers and replay; the hidden states of its tokens."""
        b, n, num_seqs = self.buffers, input_ids.shape[0], seq_lens.shape[0]
        b.input_ids[:n].copy_(input_ids)
        b.positions[:n].copy_(positions)
        b.slot_mapping[:n].copy_(slot_mapping)
        b.slot_mapping[n : self.num_tokens].zero_()  # padding tokens write into the padding block
        b.seq_lens[:num_seqs].copy_(seq_lens)
        b.seq_lens[num_seqs : self.num_seqs].zero_()  # padding rows of a decode graph read nothing
        b.block_tables[:num_seqs, : block_table.shape[1]].copy_(block_table)
        if self.num_tiles:
            b.input_ids[n : self.num_tokens].zero_()
            b.positions[n : self.num_tokens].zero_()
            b.query_start_loc[: num_seqs + 1].copy_(query_start_loc)
            b.num_decode_seqs.copy_(num_decode_seqs)
            b.tile_seqs[: self.num_tiles].copy_(tile_map[0])  # padded with -1: no sequence
            b.tile_token_starts[: self.num_tiles].copy_(tile_map[1])
        self.graph.replay()
        return self.hidden[:n]


class _InputStaging:
    """A step's integer arrays packed into one pinned host buffer per dtype and sent in one copy each.

    Returns device views in the arrays' shapes. Invariant: a host buffer is rewritten only after the
    copy out of it has finished (an event), so a host running ahead of the GPU never changes bytes
    still in flight. On the CPU the arrays are simply wrapped.
    """

    INITIAL_ELEMENTS = 1 << 16

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._host: dict[torch.dtype, torch.Tensor] = {}
        self._device: dict[torch.dtype, torch.Tensor] = {}
        self._copied = torch.cuda.Event() if device.type == "cuda" else None

    def upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        if self._copied is None:
            return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        self._copied.synchronize()
        by_dtype: dict[torch.dtype, list[int]] = {}
        for index, array in enumerate(arrays):
            by_dtype.setdefault(_TORCH_DTYPES[array.dtype.type], []).append(index)
        out: list[torch.Tensor] = [torch.empty(0)] * len(arrays)
        for dtype, indices in by_dtype.items():
            total = sum(arrays[i].size for i in indices)
            host, dev = self._buffers(dtype, total)
            host_np, offset = host.numpy(), 0
            for i in indices:
                size = arrays[i].size
                host_np[offset : offset + size] = arrays[i].ravel()
                offset += size
            dev[:total].copy_(host[:total], non_blocking=True)
            offset = 0
            for i in indices:
                size = arrays[i].size
                out[i] = dev[offset : offset + size].view(arrays[i].shape)
                offset += size
        self._copied.record()
        return out

    def _buffers(self, dtype: torch.dtype, num_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
        host = self._host.get(dtype)
        if host is None or host.numel() < num_elements:
            size = max(self.INITIAL_ELEMENTS, 2 * num_elements)
            # queued kernels may still read the old device buffer: safe, because the caching allocator
            # hands its memory out again only to work queued after them on this one stream
            self._host[dtype] = torch.empty(size, dtype=dtype, pin_memory=True)
            self._device[dtype] = torch.empty(size, dtype=dtype, device=self.device)
        return self._host[dtype], self._device[dtype]


_TORCH_DTYPES = {np.int64: torch.int64, np.int32: torch.int32}


def _rotary_positions(batch: ScheduledBatch, positions: np.ndarray, query_start_loc: np.ndarray) -> np.ndarray:
    """Token positions [num_tokens] -> rotary positions, for a batch with image requests.

    A request with M-RoPE inputs rotates its prompt tokens at its own [3, ...] positions and the tokens
    past its prompt at p + delta; everyone else at p. The result has three rows only when some chunk
    covers M-RoPE prompt positions (the other rows then repeat their one position three times).
    """
    rotary = positions.copy()
    prompt_chunks = []  # (first batch row, first prompt position, count, the request's M-RoPE positions)
    for i, req in enumerate(batch.requests):
        mm = req.multi_modal
        if mm is None or mm.mrope_positions is None:
            continue
        lo, hi, start = int(query_start_loc[i]), int(query_start_loc[i + 1]), req.num_computed_tokens
        num_prompt = max(0, min(hi - lo, req.num_prompt_tokens - start))
        rotary[lo + num_prompt : hi] += mm.mrope_delta
        if num_prompt:
            prompt_chunks.append((lo, start, num_prompt, mm.mrope_positions))
    if not prompt_chunks:
        return rotary
    rotary_3d = np.repeat(rotary[None, :], 3, axis=0)  # [3, num_tokens]
    for lo, start, count, mrope_positions in prompt_chunks:
        rotary_3d[:, lo : lo + count] = mrope_positions[:, start : start + count].numpy()
    return rotary_3d


def _mixed_graph_sizes(max_tokens: int) -> list[int]:
    """Token counts mixed graphs are captured for: every MIXED_GRAPH_TOKEN_STEP up to max_tokens."""
    if max_tokens <= 0:
        return []
    step = MIXED_GRAPH_TOKEN_STEP
    return list(range(step, -(-max_tokens // step) * step + 1, step))


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor
