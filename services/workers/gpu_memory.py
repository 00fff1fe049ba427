"""GPU memory by role: how the actors that share a GPU split its memory (`tristage serve`).

An actor's budget is a fraction of its GPU's total memory T, handed over twice: as
`gpu_memory_utilization` in its EngineConfig (an engine sizes its KV cache from it,
ModelRunner._profile_free_gpu_bytes: KV = T x utilization - its own peak after load - headroom; the
peak counts this process's allocations only, so the budgets of the processes on one GPU add up) and
as Ray's `num_gpus` (the same fraction, rounded down to Ray's 1e-4: Ray never places more on a GPU
than it holds). An encode actor reads no utilization: its budget is what it needs, reserved for it.

Per GPU, with u = --gpu-memory-utilization (the part of every GPU the cluster may use) and the
actors placed on it:

    encoder   E = vision tower + projector weights
                  + activations of one full tower call (batch_images images)
                  + embedding cache capacity + headroom
    engine    F = language model weights + activations of one full step + headroom
                  (prefill, decode and colocated workers: each holds the whole model)
    KV room   R = u T - n_encoders E - n_engines F
    engine i  budget_i = F + R w_i / sum of w over the GPU's engines
              w = s for decode, 1 - s for prefill, 1 for colocated;  s = decode_kv_share

So one prefill and one decode worker on a GPU split the KV room (1 - s) : s, whatever the model's
size; F only has to be right on average, as an error in it moves both engines' KV alike.

Activations (bytes = elements x the dtype's size, per token through the model at once):
    encoder   (kept hidden states + 4 w + 2 i + f w + 3 h) for every token of a full call
              w, i: the tower's width and MLP width; h: the LM's width (the projector's output);
              kept: LLaVA returns every layer's hidden state (layers + 1 of width w), Qwen2-VL one;
              f: LLaVA's feature layers (concatenated). Tokens: LLaVA's fixed (image/patch)^2 + 1 per
              image; Qwen2-VL's dynamic grid taken at DYNAMIC_RESOLUTION_BUDGET_PX square. Attention
              runs through SDPA (no tokens^2 term).
    engine    the step ModelRunner profiles: max_num_batched_tokens x (2 h + 3 i + q + 2 kv) + the
              logits of min(tokens, max_num_seqs) rows
    headroom  ACTIVATION_HEADROOM x activations + HEADROOM_BYTES (ModelRunner's rule: graphs,
              sampler, fragmentation)
CUDA contexts and anything else outside torch's allocator come out of the (1 - u) T no one plans.

Why s = 0.8 (DEFAULT_DECODE_KV_SHARE): KV held = requests x tokens x how long (Little's law). A
request's KV lives on prefill from its first chunk until decode acknowledges the transfer (about its
time to first token, a fraction of a second), and on decode for its whole generation (every output
token, 20-50 ms each: seconds), prompt and output together, so decode needs ~10 x the request-seconds
of KV. Prefill's room still matters: it is the prefix cache the router places by, and it must hold the
longest prompt while decode is slow to take it. LLaVA-1.5-7B (bf16, 512 KiB of KV a token) on an
80 GB H100 with 2 encoders, 1 prefill and 1 decode worker: 0.8 gives prefill 6.6 GiB of KV (13.5k
tokens: three 4k-token prompts, or six full 2k-token steps) and decode 26.4 GiB (54.1k tokens); 0.9
would leave prefill 3.3 GiB, under two 4k-token prompts.

Layout (plan_gpu_memory):
    actors <= GPUs        each actor alone on a GPU with utilization u (as before)
    one role, no override k = ceil(N / G) per GPU, u / k each, packed by Ray (as before: colocated
                          replicas)
    otherwise             engines dealt round-robin over the GPUs (decode, prefill, colocated), then
                          encoders, continuing the deal: engines spread, encoders fill in. Spanning
                          several GPUs, the actors are pinned to theirs (a placement group, one
                          bundle a GPU: services.workers.pool.reserve_gpus)

Overrides (`utilization_by_role`, --role-gpu-memory-utilization ROLE=FRACTION): every actor of ROLE
gets FRACTION of T (an encoder: reserved for it); the others plan as above around them.

Tunables (defaults):
    decode_kv_share = DEFAULT_DECODE_KV_SHARE = 0.8    decode's part of the KV room against prefill's
    batch_images = 64                   images of the tower call an encoder's budget holds (the encode
                                        worker's DEFAULT_MAX_BATCH_IMAGES)
    cache_bytes = 1 GiB                 the embedding cache's capacity (encoder.DEFAULT_CACHE_CAPACITY_BYTES)
    DYNAMIC_RESOLUTION_BUDGET_PX = 512  side of the square image a Qwen2-VL tower's budget assumes
    ACTIVATION_HEADROOM = 0.25, HEADROOM_BYTES = 256 MiB
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ROLES = ("encode", "prefill", "decode", "colocated")
DEAL_ORDER = ("decode", "prefill", "colocated", "encode")  # engines spread first, encoders fill in
DEFAULT_DECODE_KV_SHARE = 0.8
DYNAMIC_RESOLUTION_BUDGET_PX = 512
ACTIVATION_HEADROOM = 0.25
HEADROOM_BYTES = 256 * 2**20
RAY_GPU_RESOLUTION = 10_000  # Ray keeps resources in fixed point to 1e-4: requests are rounded down to it
GIB = 2**30


@dataclass(frozen=True)
class EncoderBytes:
    """What one encode actor needs on its GPU."""

    weights: int
    activations: int  # one tower call of the encode worker's largest batch
    cache: int  # the embedding cache's capacity
    headroom: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.cache + self.headroom

    def __str__(self) -> str:
        return (
            f"{_gib(self.total)} = tower weights {_gib(self.weights)} + activations {_gib(self.activations)} "
            f"+ embedding cache {_gib(self.cache)} + headroom {_gib(self.headroom)}"
        )


@dataclass(frozen=True)
class EngineBytes:
    """What one engine (prefill, decode or colocated) needs before its KV cache."""

    weights: int
    activations: int  # one step of max_num_batched_tokens
    headroom: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.headroom

    def __str__(self) -> str:
        return (
            f"{_gib(self.total)} = weights {_gib(self.weights)} + activations {_gib(self.activations)} "
            f"+ headroom {_gib(self.headroom)}"
        )


@dataclass(frozen=True)
class ActorMemory:
    """One actor's place and budget."""

    role: str
    index: int  # within its role's pool: the actor is `<role>-<index>`
    gpu: int  # which of the plan's GPUs (a placement group bundle when the plan is pinned)
    gpu_memory_utilization: float  # the budget as a fraction of the GPU's total memory
    num_gpus: float  # Ray's request
    budget_bytes: int

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


@dataclass(frozen=True)
class GPUMemoryPlan:
    actors: tuple[ActorMemory, ...]
    num_gpus: int  # GPUs the plan uses
    pinned: bool  # actors must run on their `gpu`: they span several GPUs and their budgets differ
    gpu_total_bytes: int

    def of_role(self, role: str) -> list[ActorMemory]:
        return sorted((a for a in self.actors if a.role == role), key=lambda a: a.index)


# ----------------------------------------------------------------------------------------------
# The plan


def plan_gpu_memory(
    counts: Mapping[str, int],
    *,
    num_gpus: int,
    gpu_total_bytes: int,
    gpu_memory_utilization: float,
    encoder: EncoderBytes | None,
    engine: EngineBytes,
    decode_kv_share: float = DEFAULT_DECODE_KV_SHARE,
    utilization_by_role: Mapping[str, float] | None = None,
) -> GPUMemoryPlan:
    """Each actor's GPU and budget; `counts`: actors per role. Raises ValueError for bad tunables or a
    GPU its actors cannot share."""
    overrides = dict(utilization_by_role or {})
    check_tunables(counts, decode_kv_share, overrides)
    if num_gpus < 1:
        raise ValueError(f"there are no GPUs to plan ({num_gpus})")
    if counts.get("encode", 0) and encoder is None and "encode" not in overrides:
        raise ValueError("encode actors need an encoder budget")
    num_actors = sum(counts.values())
    roles = [role for role in ROLES if counts.get(role, 0)]
    if num_actors <= num_gpus:
        return _alone(counts, gpu_total_bytes, gpu_memory_utilization, overrides)
    if len(roles) == 1 and not overrides:
        return _packed(roles[0], num_actors, num_gpus, gpu_total_bytes, gpu_memory_utilization)
    deal = [(role, i) for role in DEAL_ORDER for i in range(counts.get(role, 0))]
    by_gpu: list[list[tuple[str, int]]] = [deal[g::num_gpus] for g in range(num_gpus)]
    actors = [
        actor
        for g, members in enumerate(by_gpu)
        for actor in _split_gpu(
            g, members, gpu_total_bytes, gpu_memory_utilization, encoder, engine, decode_kv_share, overrides
        )
    ]
    return GPUMemoryPlan(tuple(actors), num_gpus, pinned=num_gpus > 1, gpu_total_bytes=gpu_total_bytes)


def check_tunables(counts: Mapping[str, int], decode_kv_share: float, overrides: Mapping[str, float]) -> None:
    unknown = sorted(set(counts) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown roles {unknown}; roles are {list(ROLES)}")
    if not 0.0 < decode_kv_share < 1.0:
        raise ValueError(
            f"decode_kv_share must be between 0 and 1, both excluded (decode's part of the KV room prefill and "
            f"decode share; each needs some), got {decode_kv_share}"
        )
    for role, fraction in overrides.items():
        if role not in ROLES:
            raise ValueError(f"a GPU memory override names the role {role!r}; roles are {list(ROLES)}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"the {role} actors' GPU memory utilization must be in (0, 1], got {fraction}")


def _alone(counts: Mapping[str, int], total: int, utilization: float, overrides: Mapping[str, float]) -> GPUMemoryPlan:
    """A GPU each: every actor its own, the whole `utilization` (or its role's override)."""
    members = [(role, i) for role in ROLES for i in range(counts.get(role, 0))]
    actors = []
    for g, (role, i) in enumerate(members):
        fraction = overrides.get(role, utilization)
        actors.append(ActorMemory(role, i, g, fraction, 1.0, int(fraction * total)))
    return GPUMemoryPlan(tuple(actors), len(actors), pinned=False, gpu_total_bytes=total)


def _packed(role: str, count: int, num_gpus: int, total: int, utilization: float) -> GPUMemoryPlan:
    """Identical actors, k = ceil(count / num_gpus) a GPU, 1/k of it each; Ray packs them in order."""
    per_gpu = -(-count // num_gpus)
    share = 1.0 / per_gpu
    fraction = utilization * share
    actors = tuple(ActorMemory(role, i, i // per_gpu, fraction, share, int(fraction * total)) for i in range(count))
    return GPUMemoryPlan(actors, -(-count // per_gpu), pinned=False, gpu_total_bytes=total)


def _split_gpu(
    gpu: int,
    members: list[tuple[str, int]],
    total: int,
    utilization: float,
    encoder: EncoderBytes | None,
    engine: EngineBytes,
    decode_kv_share: float,
    overrides: Mapping[str, float],
) -> list[ActorMemory]:
    """One GPU's actors: fixed budgets first (overrides, encoders), then the engines split the KV room."""
    usable = int(utilization * total)
    fixed: dict[tuple[str, int], int] = {}
    for role, i in members:
        if role in overrides:
            fixed[role, i] = int(overrides[role] * total)
        elif role == "encode":
            assert encoder is not None  # checked by plan_gpu_memory
            fixed[role, i] = encoder.total
    engines = [member for member in members if member not in fixed]
    room = usable - sum(fixed.values()) - len(engines) * engine.total
    names = ", ".join(f"{role}-{i}" for role, i in members)
    if sum(fixed.values()) > usable:
        raise ValueError(
            f"GPU {gpu} ({names}): the encoders and the roles with a set share need {_gib(sum(fixed.values()))}, "
            f"more than the {_gib(usable)} of {_gib(total)} gpu_memory_utilization {utilization} allows"
        )
    if engines and room <= 0:
        raise ValueError(
            f"GPU {gpu} ({names}): {len(engines)} engine(s) of {_gib(engine.total)} each (model weights "
            f"{_gib(engine.weights)}) beside {_gib(sum(fixed.values()))} of encoders and set shares leave no "
            f"room for a KV cache in {_gib(usable)}; use more GPUs or fewer actors a GPU"
        )
    weights = {member: _kv_weight(member[0], decode_kv_share) for member in engines}
    budgets = dict(fixed)
    for member, weight in weights.items():
        budgets[member] = engine.total + round(room * weight / sum(weights.values()))
    return [_actor(role, i, gpu, budgets[role, i], total) for role, i in members]


def _kv_weight(role: str, decode_kv_share: float) -> float:
    if role == "decode":
        return decode_kv_share
    if role == "prefill":
        return 1.0 - decode_kv_share
    return 1.0  # colocated


def _actor(role: str, index: int, gpu: int, budget_bytes: int, total: int) -> ActorMemory:
    fraction = budget_bytes / total
    num_gpus = math.floor(fraction * RAY_GPU_RESOLUTION) / RAY_GPU_RESOLUTION
    return ActorMemory(role, index, gpu, fraction, num_gpus, budget_bytes)


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.2f} GiB"


def describe(actor: ActorMemory, total: int) -> str:
    """One log line's worth: where an actor runs and what it may use."""
    return (
        f"{actor.name}: GPU {actor.gpu}, {_gib(actor.budget_bytes)} of {_gib(total)} "
        f"(gpu_memory_utilization {actor.gpu_memory_utilization:.4f}, Ray num_gpus {actor.num_gpus:g})"
    )


# ----------------------------------------------------------------------------------------------
# What each role needs


def encoder_bytes(
    hf_config: Any, dtype: torch.dtype, batch_images: int | None = None, cache_bytes: int | None = None
) -> EncoderBytes:
    """An encode actor's budget for a vision-language config (see the module's docstring); by default
    for the encode worker's largest batch (max_batch_images) and the encoder's cache capacity."""
    # here, not at the top: the CLI reads this module's defaults without loading the model code
    from services.engine.multimodal.encoder import num_vision_parameters
    from services.engine.multimodal.spec import VisionLanguageSpec
    from services.workers.encode_worker import DEFAULT_MAX_BATCH_IMAGES
    from services.workers.encoder import DEFAULT_CACHE_CAPACITY_BYTES

    batch_images = DEFAULT_MAX_BATCH_IMAGES if batch_images is None else batch_images
    cache_bytes = DEFAULT_CACHE_CAPACITY_BYTES if cache_bytes is None else cache_bytes
    spec = VisionLanguageSpec.from_hf_config(hf_config)
    if spec is None:
        raise ValueError(f"{hf_config.architectures} has no vision tower")
    vision, text = hf_config.vision_config, hf_config.text_config
    width = getattr(vision, "embed_dim", None) or vision.hidden_size  # Qwen2-VL names its ViT's width embed_dim
    num_layers = getattr(vision, "num_hidden_layers", None) or vision.depth
    mlp_width = getattr(vision, "intermediate_size", None) or int(width * vision.mlp_ratio)
    if spec.family == "llava":
        tokens_per_image = (vision.image_size // vision.patch_size) ** 2 + 1  # + CLIP's CLS row
        kept = (num_layers + 1) * width  # output_hidden_states: every layer's, until the projector has run
        layers = hf_config.vision_feature_layer
        feature_width = width * (1 if isinstance(layers, int) else len(layers))
    else:
        tokens_per_image = (DYNAMIC_RESOLUTION_BUDGET_PX // vision.patch_size) ** 2
        kept = width
        feature_width = width
    per_token = kept + 4 * width + 2 * mlp_width + feature_width + 3 * text.hidden_size
    activations = batch_images * tokens_per_image * per_token * dtype.itemsize
    return EncoderBytes(
        weights=num_vision_parameters(hf_config) * dtype.itemsize,
        activations=activations,
        cache=cache_bytes,
        headroom=_headroom(activations),
    )


def engine_bytes(hf_config: Any, dtype: torch.dtype, max_num_batched_tokens: int, max_num_seqs: int) -> EngineBytes:
    """An engine's weights and the activations of its largest step, before any KV cache."""
    import torch

    from services.engine.models import default_dtype
    from services.engine.models.llama import DecoderLM, DecoderSpec

    spec = DecoderSpec.from_hf_config(hf_config)
    with torch.device("meta"), default_dtype(dtype):
        num_parameters = sum(p.numel() for p in DecoderLM(spec).parameters())
    q_width, kv_width = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per_token = 2 * spec.hidden_size + 3 * spec.intermediate_size + q_width + 2 * kv_width
    logits = min(max_num_batched_tokens, max_num_seqs) * spec.vocab_size
    activations = (max_num_batched_tokens * per_token + logits) * dtype.itemsize
    weights = num_parameters * dtype.itemsize
    return EngineBytes(weights=weights, activations=activations, headroom=_headroom(activations))


def _headroom(activations: int) -> int:
    return int(ACTIVATION_HEADROOM * activations) + HEADROOM_BYTES
