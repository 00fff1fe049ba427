"""`tristage serve`: a whole cluster on this machine (or joined to a Ray cluster).

start Ray (or join --ray-address) -> start the worker pool, wait for every model to load
-> start the gateway -> print the URL once /ready answers -> serve
SIGTERM / Ctrl-C -> stop accepting, let requests in flight finish for up to `drain_timeout_s`,
end the rest with a clear error -> stop the pool -> stop Ray (when this process started it)

Starting its own Ray, `tristage serve` runs this under services.supervisor: a watchdog process kills
whatever outlives it (Ray's agents ignore SIGTERM and outlive the raylet), SIGKILL of the command
included. With a loopback data plane (the default) Ray is started bound to loopback too
(supervisor.local_ray_environ): GCS, raylet, object manager, the workers' gRPC servers, the agents
and the autoscaler's metrics all listen on 127.0.0.1. With another --data-plane-host this Ray build
binds its C++ gRPC servers (GCS, raylet, object manager, workers) and the autoscaler's metrics to
every interface, as it has no option for one address; only its agents bind to the node's address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import httpx
import ray
import uvicorn

from services.common.errors import ModelLoadError
from services.common.security import ClusterSecret, ClusterSecretMissing, DataPlaneAuth, resolve_cluster_secret
from services.engine import EngineConfig
from services.engine.default_model import DEFAULT_MODEL_NAME, default_model_path
from services.engine.models.hub import HubSettings, ResolvedModel, local_tokenizer_dir, model_source, resolve_model
from services.router.policies.base import DEFAULT_HOST_TIER_HIT_WEIGHT
from services.workers.gpu_memory import DEFAULT_DECODE_KV_SHARE, GPUMemoryPlan

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

    from services.workers.pool import GPUPlacement

logger = logging.getLogger("tristage.serve")

API_KEYS_ENV = "TRISTAGE_API_KEYS"  # comma-separated, used when --api-key is not given
RAY_OBJECT_STORE_BYTES = 256 * 2**20  # the data plane is ZeroMQ: Ray's object store only carries control calls


@dataclass(frozen=True)
class ServeConfig:
    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # default: a Hub id as given, a model directory's name
    mode: str = "disaggregated"  # or "colocated"
    replicas: int = 1  # colocated engine actors
    num_prefill: int = 1  # disaggregated pools
    num_decode: int = 1
    num_encode: int | None = None  # encode actors (vision-language models; None: 1 when disaggregated)
    router_policy: str = "preble"
    host_tier_hit_weight: float = DEFAULT_HOST_TIER_HIT_WEIGHT  # RouterConfig's: a host-tier hit in device hits
    stage_resources: bool = False  # actors ask Ray for a custom resource named after their role
    worker_metrics_port: int | None = None  # workers serve their own /metrics from this port on
    ray_address: str | None = None  # join this Ray cluster instead of starting one
    data_plane_host: str = "127.0.0.1"  # where workers and gateway bind their ZeroMQ sockets
    # CURVE on the data plane (services.common.security): "auto" = on unless data_plane_host is loopback
    data_plane_auth: DataPlaneAuth = "auto"
    cluster_secret: ClusterSecret | None = None  # given ($TRISTAGE_CLUSTER_SECRET or a file); None: none given
    kv_staging_bytes: int | None = None  # per prefill worker: shared-memory staging for outgoing KV (0: off;
    # None: 1 GiB on a GPU, 64 MiB on the CPU)
    # workers that encode images decode a JPEG at reduced scale where the model's processor allows
    # (services.workers.encoder); False: every image in full
    image_draft_decode: bool = True
    # Several roles on one GPU (services.workers.gpu_memory): encoders get what they need, prefill and
    # decode split the KV room that leaves (1 - s) : s
    decode_kv_share: float = DEFAULT_DECODE_KV_SHARE
    # (role, fraction of a GPU's memory) for every actor of that role, in place of its planned share
    role_gpu_memory_utilization: tuple[tuple[str, float], ...] = ()
    api_keys: tuple[str, ...] = ()
    drain_timeout_s: float = 30.0
    gateway_options: dict = field(default_factory=dict)  # extra GatewayConfig fields


def api_keys_from(arg_keys: list[str] | None) -> tuple[str, ...]:
    if arg_keys:
        return tuple(arg_keys)
    env = os.environ.get(API_KEYS_ENV, "")
    return tuple(k.strip() for k in env.split(",") if k.strip())


def run(config: ServeConfig) -> int:
    from services.workers.gpu_memory import check_tunables
    from services.workers.pool import PoolUnplaceable, release_gpus, reserve_gpus, start_pool, stop_pool

    try:  # before Ray: refuse early
        check_tunables({}, config.decode_kv_share, dict(config.role_gpu_memory_utilization))
    except ValueError as exc:
        raise SystemExit(f"tristage serve: {exc}") from exc
    try:  # before Ray: refuse early, and fetch a Hub id once for this node before its workers look for it
        model, engine_config, tokenizer_dir = resolve_serve_model(config.engine)
        vision_language = _is_vision_language(str(model.model_dir))
    except ModelLoadError as exc:
        raise SystemExit(f"tristage serve: {exc}") from exc
    model_dir = str(model.model_dir)
    name = config.served_model_name or (DEFAULT_MODEL_NAME if config.engine.model is None else model.served_name)
    config = replace(config, cluster_secret=_data_plane_secret(config))  # before Ray: refuse early
    started_ray = _start_ray(config)
    # joined to a Ray cluster, the pools belong to it: every gateway replica attaches to the same
    # named actors, and none stops them on its way out
    shared = not started_ray
    workers = []
    pinned: PlacementGroup | None = None  # the GPUs that actors of several roles share, one bundle each
    try:
        pools = (
            {"colocated": config.replicas}
            if config.mode == "colocated"
            else {"prefill": config.num_prefill, "decode": config.num_decode}
        )
        num_encode = _num_encode(config, model_dir, vision_language)
        if num_encode:
            pools = {"encode": num_encode, **pools}
        plan = _plan_gpu_memory(config, engine_config, pools, model_dir, shared)
        gpus_per_worker = 1.0
        if plan is None:
            engine_config, gpus_per_worker = _share_gpus(engine_config, sum(pools.values()))
        try:
            if plan is not None and plan.pinned:
                pinned = reserve_gpus(plan.num_gpus)
            for stage, count in pools.items():
                workers += start_pool(
                    engine_config,
                    stage,
                    count,
                    bind_host=config.data_plane_host,
                    gpus_per_worker=gpus_per_worker,
                    model_name=name,
                    stage_resources=config.stage_resources,
                    metrics_port=config.worker_metrics_port,
                    kv_staging_bytes=config.kv_staging_bytes,
                    image_draft_decode=config.image_draft_decode,
                    shared=shared,
                    cluster_secret=config.cluster_secret,
                    placements=_placements(plan, stage, pinned) if plan is not None else None,
                )
        except PoolUnplaceable as exc:
            raise SystemExit(f"tristage serve: {exc}") from exc
        _check_layouts(workers, model_source(engine_config))
        _run_event_loop(_serve_http(config, workers, model_dir, tokenizer_dir, name, vision_language))
    finally:
        if workers and not shared:
            stop_pool(workers)
        elif workers:
            logger.info("the worker pools stay with the Ray cluster for the other gateway replicas")
        if pinned is not None:
            release_gpus(pinned)
        if started_ray:
            ray.shutdown()
    logger.info("stopped")
    return 0


def resolve_serve_model(engine: EngineConfig) -> tuple[ResolvedModel, EngineConfig, str]:
    """The model on this node (a Hub id fetched into the cache), the engine config the workers get, and the
    gateway's tokenizer directory. Workers get a Hub id pinned to the commit fetched here: each resolves it
    on its own node (a no-op where this process already fetched it) and all serve the same files. Raises
    ModelLoadError (ModelResolutionError for a Hub id: naming it, the revision and the cause)."""
    if engine.model is None:
        model = ResolvedModel(str(default_model_path()), default_model_path())
    else:
        settings = HubSettings.from_environ(os.environ, engine.download_dir)
        model = resolve_model(engine.model, engine.revision, settings, need_weights=engine.load_format != "dummy")
    pinned = replace(engine, model=model.model, revision=model.revision)
    return model, pinned, local_tokenizer_dir(pinned, str(model.model_dir))


def _data_plane_secret(config: ServeConfig) -> ClusterSecret | None:
    """The secret the data plane's CURVE keys come from, or None when authentication is off (a random one
    for this run when it starts its own Ray and none was given). Never logged."""
    try:
        secret = resolve_cluster_secret(
            config.data_plane_auth,
            config.data_plane_host,
            config.cluster_secret,
            joining=config.ray_address is not None,
        )
    except (ClusterSecretMissing, ValueError) as exc:
        raise SystemExit(f"tristage serve: {exc}") from exc
    origin = "given" if secret is config.cluster_secret else "made for this run"
    logger.info("data-plane authentication: %s", f"CURVE, cluster secret {origin}" if secret else "off")
    return secret


def _is_vision_language(model_dir: str) -> bool:
    from services.engine.models.loader import read_model_config
    from services.engine.multimodal.spec import VisionLanguageSpec

    return VisionLanguageSpec.from_hf_config(read_model_config(model_dir)) is not None


def _num_encode(config: ServeConfig, model_dir: str, vision_language: bool) -> int:
    """Encode actors: only for a vision-language model; one by default when disaggregated, none colocated
    (a colocated worker encodes its own requests' images) unless asked for."""
    if not vision_language:
        if config.num_encode:
            raise SystemExit(f"tristage serve: --encode needs a vision-language model; {model_dir} is text-only")
        return 0
    if config.num_encode is not None:
        return config.num_encode
    return 1 if config.mode == "disaggregated" else 0


def _plan_gpu_memory(
    config: ServeConfig, engine_config: EngineConfig, pools: dict[str, int], model_dir: str, shared: bool
) -> GPUMemoryPlan | None:
    """Each actor's GPU and memory by its role (services.workers.gpu_memory), on this machine's GPUs:

        encoder   E = tower weights + activations of a full tower call + embedding cache + headroom
        engine    F = LM weights + activations of a full step + headroom
        per GPU   KV room R = u T - n_E E - n_engines F  (u: --gpu-memory-utilization, T: the GPU's bytes)
                  a prefill or decode worker gets F + R w / sum(w), w = 1 - s for prefill, s for decode,
                  s = decode_kv_share (0.8: decode holds each request's KV for its whole generation,
                  prefill until the transfer; the module's docstring has the reasoning)

    A GPU each when there are enough; identical workers (colocated replicas) keep equal shares, 1/k of
    a GPU each for k a GPU, packed by Ray. Each actor's line is logged, and its KV cache (hence
    vllm:cache_config_info's num_gpu_blocks and gpu_memory_utilization) follows its own share.

    None (the equal shares of `_share_gpus`) on the CPU, without GPUs, or joined to a Ray cluster:
    there the GPUs are the cluster's, this process may see none of them, and the pools are placed by
    role resources on nodes whose memory it cannot read.
    """
    from services.engine.config import DTYPES
    from services.engine.models.loader import read_model_config
    from services.workers.gpu_memory import describe, encoder_bytes, engine_bytes, plan_gpu_memory

    resolved = engine_config.resolved()
    if not resolved.device.startswith("cuda"):
        return None
    if shared:
        if config.role_gpu_memory_utilization or config.decode_kv_share != DEFAULT_DECODE_KV_SHARE:
            logger.warning(
                "--decode-kv-share and --role-gpu-memory-utilization apply to the GPUs of a cluster this command "
                "starts; joined to %s, workers that share a GPU get equal parts of it",
                config.ray_address,
            )
        return None
    num_gpus = int(ray.cluster_resources().get("GPU", 0))
    gpu_total_bytes = _gpu_total_bytes()
    if num_gpus == 0 or gpu_total_bytes is None:
        return None
    hf_config = read_model_config(model_dir)
    dtype = DTYPES[resolved.dtype]
    encoder = encoder_bytes(hf_config, dtype) if pools.get("encode") else None
    engine = engine_bytes(hf_config, dtype, resolved.max_num_batched_tokens, resolved.max_num_seqs)
    try:
        plan = plan_gpu_memory(
            pools,
            num_gpus=num_gpus,
            gpu_total_bytes=gpu_total_bytes,
            gpu_memory_utilization=resolved.gpu_memory_utilization,
            encoder=encoder,
            engine=engine,
            decode_kv_share=config.decode_kv_share,
            utilization_by_role=dict(config.role_gpu_memory_utilization),
        )
    except ValueError as exc:
        raise SystemExit(f"tristage serve: {exc}") from exc
    if encoder is not None:
        logger.info("GPU memory: an encoder needs %s", encoder)
    logger.info("GPU memory: an engine needs %s before its KV cache", engine)
    for actor in plan.actors:
        logger.info("GPU memory: %s", describe(actor, gpu_total_bytes))
    return plan


def _gpu_total_bytes() -> int | None:
    """The smallest of this machine's GPUs' memory, from nvidia-smi; None without it (the plan falls back to
    equal shares). Not from torch: its device properties initialise CUDA, and this process would then hold a
    context (hundreds of MiB outside every actor's budget) on the first GPU for the cluster's life."""
    try:
        query = ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"]
        out = subprocess.run(query, capture_output=True, text=True, check=True, timeout=30).stdout
        mib = [int(line) for line in out.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return min(mib) * 2**20 if mib else None


def _placements(plan: GPUMemoryPlan, stage: str, pinned: PlacementGroup | None) -> list[GPUPlacement]:
    from services.workers.pool import GPUPlacement

    return [
        GPUPlacement(a.num_gpus, a.gpu_memory_utilization, pinned if plan.pinned else None, a.gpu)
        for a in plan.of_role(stage)
    ]


def _share_gpus(engine_config: EngineConfig, num_workers: int) -> tuple[EngineConfig, float]:
    """One GPU per worker when there are enough; otherwise 1/k of a GPU each, k = the most workers one
    GPU must hold (so every share fits on a GPU: 3 workers on 2 GPUs get halves, not two thirds), each
    worker sizing its KV cache from its share of the memory. Used where `_plan_gpu_memory` cannot plan."""
    if not engine_config.resolved().device.startswith("cuda"):
        return engine_config, 0.0
    num_gpus = int(ray.cluster_resources().get("GPU", 0))
    if num_gpus >= num_workers or num_gpus == 0:
        return engine_config, 1.0
    share = 1.0 / -(-num_workers // num_gpus)
    return replace(engine_config, gpu_memory_utilization=engine_config.gpu_memory_utilization * share), share


def _check_layouts(workers, model_dir: str) -> None:
    """Prefill and decode must agree on what a KV block is, and attached pools must serve our model;
    refuse to start otherwise."""
    others = sorted({w.info.model_dir for w in workers} - {model_dir})
    if others:
        raise SystemExit(f"tristage serve: the running pools serve {others}, not {model_dir}; stop them first")
    keys = ("model_dir", "block_size", "dtype", "vocab_size")
    layouts = {
        (w.info.model_dir, w.info.engine.block_size, w.info.engine.dtype, w.info.engine.vocab_size)
        for w in workers
        if w.info.engine is not None
    }  # encode workers have no engine
    if len(layouts) > 1:
        raise SystemExit(f"tristage serve: workers disagree on {keys}: {sorted(layouts)}")


def _start_ray(config: ServeConfig) -> bool:
    if config.ray_address:
        _use_ray_auth_token()
        ray.init(address=config.ray_address, include_dashboard=False, logging_level=logging.WARNING)
        return False
    num_cpus = max(
        os.cpu_count() or 1, config.replicas + config.num_prefill + config.num_decode + (config.num_encode or 1) + 1
    )
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=RAY_OBJECT_STORE_BYTES,
        logging_level=logging.WARNING,
    )
    return True


def _use_ray_auth_token() -> None:
    """Joining a cluster whose head enabled token authentication (Ray's default for `ray start --head`):
    Ray's driver sends the token only in token mode, so turn it on when a token is at hand (the
    RAY_AUTH_TOKEN variable, the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token), as `ray.init`
    does for a cluster it starts itself. An explicit RAY_AUTH_MODE is left as it is."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


async def _serve_http(
    config: ServeConfig, workers, model_dir: str, tokenizer_dir: str, model_name: str, vision_language: bool
) -> None:
    from transformers import AutoTokenizer

    from services.gateway.app import create_app
    from services.gateway.cluster import ClusterBackend
    from services.gateway.config import GatewayConfig
    from services.gateway.http_server import uvicorn_options
    from services.router import RouterConfig
    from services.workers.actor import resolve_bind_host

    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, tokenizer_dir)
    processor = await asyncio.to_thread(_processor, model_dir) if vision_language else None
    backend = ClusterBackend(
        workers,
        model_name=model_name,
        tokenizer=tokenizer,
        bind_host=resolve_bind_host(config.data_plane_host),
        router_policy=config.router_policy,
        router_config=RouterConfig(host_tier_hit_weight=config.host_tier_hit_weight),
        processor=processor,
        cluster_secret=config.cluster_secret,
    )
    await backend.start()
    gateway_config = GatewayConfig(
        served_model_name=model_name,
        api_keys=config.api_keys,
        export_worker_metrics=config.worker_metrics_port is None,
        **config.gateway_options,
    )
    app = create_app(gateway_config, backend)
    server = _DrainingServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level="warning",
            timeout_graceful_shutdown=int(config.drain_timeout_s) + 5,
            **uvicorn_options(app),  # connection cap, request-head and keep-alive timeouts
        ),
        backend,
        config.drain_timeout_s,
    )
    announce = asyncio.create_task(_announce_when_ready(server, config, model_name))
    try:
        await server.serve()
    finally:
        announce.cancel()
        await backend.close()


def _processor(model_dir: str):
    """A vision-language model's MultiModalProcessor (the gateway's chat template and image layout)."""
    from services.engine.multimodal import MultiModalProcessor

    return MultiModalProcessor.from_model_dir(model_dir)


def _run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run the gateway on uvloop's event loop where it is installed (a dependency off Windows), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


class _DrainingServer(uvicorn.Server):
    """uvicorn's graceful shutdown, plus: after the drain timeout, streams still open end with an error."""

    def __init__(self, config: uvicorn.Config, backend, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._backend = backend
        self._drain_timeout_s = drain_timeout_s
        self._drain_task: asyncio.Task | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        """Install the drain handler for SIGINT/SIGTERM; unlike uvicorn's, do not re-raise the signal after a
        clean drain, so `tristage serve` exits 0 once everything it started has stopped."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        if self._drain_task is None:
            logger.info(
                "draining: %d requests in flight, up to %.0f s", self._backend.num_streams, self._drain_timeout_s
            )
            self._drain_task = asyncio.get_event_loop().create_task(self._cut_after_timeout())
        super().handle_exit(sig, frame)

    async def _cut_after_timeout(self) -> None:
        await asyncio.sleep(self._drain_timeout_s)
        self._backend.fail_all("the server is shutting down; retry on another replica")


async def _announce_when_ready(server: uvicorn.Server, config: ServeConfig, model_name: str) -> None:
    url = f"http://{config.host}:{config.port}"
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            await asyncio.sleep(0.1)
            if not server.started:
                continue
            try:
                if (await client.get(f"{url}/ready")).status_code == 200:
                    break
            except httpx.HTTPError:
                continue
    print(f"tristage is serving {model_name} at {url}/v1", flush=True)
    sys.stdout.flush()
