"""Engine configuration: one frozen dataclass, resolved once (device, dtype) before anything is built."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from services.engine.waiting_queue import SCHEDULING_POLICIES

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float": torch.float32,
}
LOAD_FORMATS = ("auto", "safetensors", "dummy")
ATTENTION_BACKENDS = ("auto", "reference", "triton")
SMALL_BATCH_LINEAR_KERNELS = ("triton", "torch")
CPU_KV_CACHE_BYTES = 512 * 2**20  # default KV budget on CPU


@dataclass(frozen=True)
class EngineConfig:
    # An HF-format directory or a Hugging Face Hub id (services/engine/models/hub.py); None: the embedded default
    model: str | None = None
    revision: str | None = None  # a Hub id's branch, tag or commit (None: main); ignored for a directory
    download_dir: str | None = None  # the Hub cache to fetch into (None: $HF_HUB_CACHE, $HF_HOME/hub, ...)
    tokenizer: str | None = None  # a directory or Hub id; defaults to the model's
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda when available, else cpu
    load_format: str = "auto"  # auto/safetensors read the weights; dummy: random weights of the real shapes
    block_size: int = 16  # tokens per KV block
    max_num_batched_tokens: int = 2048  # token budget of one step (chunked prefill cuts prompts to it)
    max_num_seqs: int = 256  # running requests at most
    # Prefill tokens of a step that also decodes, at most (None: the step's whole budget). A prefill
    # chunk lengthens every running request's inter-token gap by its own time; this bounds that gap
    # (Sarathi-Serve's stall-free batching) at the cost of a slower first token under bursts.
    max_prefill_tokens_beside_decodes: int | None = None
    # Order of admitting waiting requests: fcfs (arrival), or preble (priority groups by prefix-cache
    # hit ratio, visited round-robin: services/engine/waiting_queue.py)
    scheduling_policy: str = "fcfs"
    # Service-level objectives of SLO-aware admission (LayerKV: services/engine/slo_admission.py); None:
    # off. tpot_slo_ms: a prompt chunk joins a step that decodes only while the step's predicted time
    # (fitted online from measured steps) stays within it, cut to fit or held until the request's
    # deadline. ttft_slo_ms: waiting requests are ordered by TTFT slack (deadline = arrival + it).
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    max_model_len: int | None = None  # context length; default: the model's, capped by the KV pool
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.90  # share of GPU memory for weights + activations + KV cache
    kv_cache_memory_bytes: int | None = None  # explicit KV budget (CPU default: CPU_KV_CACHE_BYTES)
    num_kv_blocks: int | None = None  # explicit pool size, overrides both budgets
    # GiB of host memory (pinned on CUDA) for a host tier under the prefix cache: full blocks the device
    # evicts keep their KV there and a later hit copies them back instead of recomputing
    # (services/engine/kv_cache/host_tier.py). 0: off, no host tier.
    kv_offloading_size: float = 0.0
    attention_backend: str = "auto"  # auto: triton on CUDA, reference on CPU
    enable_cuda_graphs: bool = True  # capture decode batches on CUDA
    max_cuda_graph_batch_size: int = 256
    # Steps that mix prefill chunks with decodes, up to this many tokens, replay a graph captured for
    # the next larger multiple of 64 tokens (the varlen kernel attends every sequence); 0: run eagerly
    mixed_cuda_graph_max_tokens: int = 2048
    # Eager steps attend all their prefill chunks in one varlen Triton launch; False: one SDPA call each
    varlen_prefill_attention: bool = True
    # Matrix products of 1..16 rows (decode) beside the Triton attention backend: "torch": F.linear
    # (cuBLAS), as every other product; "triton": the skinny kernel (services/engine/small_batch_linear.py,
    # checked by tests/gpu/test_small_batch_linear_gpu.py). On an H100 the batch-1 decode step of
    # Llama-3.1-8B shapes took 6.42 ms with it against 7.28 ms with torch (docs/benchmarks.md)
    small_batch_linear: str = "triton"
    # Launch the next step before detokenizing and building this one's outputs (LLMEngine.step)
    overlap_outputs: bool = True
    # ... and before collecting this one's tokens: the next step's decodes take them from the device.
    # Only with overlap_outputs (without it, steps run in the plain order whatever this says).
    # On an H100, the offline closed loop of 256 ran 1.10x the requests per second with it
    # (benchmarks/step_profile.py, docs/benchmarks.md).
    async_scheduling: bool = True
    seed: int = 0  # dummy weights and unseeded sampling

    def resolved(self) -> EngineConfig:
        """Fill the `auto` fields for this machine and check the rest."""
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        backend = self.attention_backend
        if backend == "auto":
            backend = "triton" if device.startswith("cuda") else "reference"
        cfg = replace(
            self,
            device=device,
            dtype=dtype,
            attention_backend=backend,
            async_scheduling=self.async_scheduling and self.overlap_outputs,
        )
        cfg._check()
        return cfg

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def _check(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format {self.load_format!r} is not one of {LOAD_FORMATS}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend {self.attention_backend!r} is not one of {ATTENTION_BACKENDS}")
        if self.small_batch_linear not in SMALL_BATCH_LINEAR_KERNELS:
            raise ValueError(
                f"small_batch_linear {self.small_batch_linear!r} is not one of {SMALL_BATCH_LINEAR_KERNELS}"
            )
        if self.attention_backend == "triton" and not self.device.startswith("cuda"):
            raise ValueError("attention_backend 'triton' needs a CUDA device")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no CUDA device is available")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        if self.max_prefill_tokens_beside_decodes is not None and self.max_prefill_tokens_beside_decodes < 1:
            raise ValueError("max_prefill_tokens_beside_decodes must be positive")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy {self.scheduling_policy!r} is not one of {SCHEDULING_POLICIES}")
        for name in ("ttft_slo_ms", "tpot_slo_ms"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and 0 < value < float("inf")):
                raise ValueError(f"{name} must be a positive number of milliseconds (or None: off), got {value!r}")
        if self.mixed_cuda_graph_max_tokens < 0:
            raise ValueError("mixed_cuda_graph_max_tokens must be >= 0 (0 turns mixed-step graphs off)")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be positive")
        size = self.kv_offloading_size
        if isinstance(size, bool) or not isinstance(size, int | float) or not 0 <= size < float("inf"):
            raise ValueError(f"kv_offloading_size must be a finite number of GiB >= 0 (0: off), got {size!r}")
        if size > 0 and not self.enable_prefix_caching:
            raise ValueError("kv_offloading_size needs prefix caching: the host tier holds evicted cached blocks")

    @property
    def kv_offloading_bytes(self) -> int:
        """The host KV tier's budget in bytes (0: off)."""
        return int(self.kv_offloading_size * 2**30)
