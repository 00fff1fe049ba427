"""The engine as a Ray actor: one process, one engine, one EngineWorker loop thread.

Ray is the control plane only (placement, restarts, configuration, health and stats calls); tokens
travel over the worker's ZeroMQ sockets. The actor is threaded (`max_concurrency`), so a stats call
never waits behind the engine loop. Its answers are the typed structs of services.common.control
(msgspec Structs, which Ray pickles like any class of an importable module); the same stats and the
KV events also leave as they happen on the worker's state socket (WorkerInfo.state_address).

Data-plane trust, set up over Ray: the cluster secret comes as a constructor argument (Ray keeps it
with the actor's creation task, so a restarted process gets it again; it never enters an environment
variable or a log line), and each gateway registers the addresses the worker may connect to
(`register_peers`, again whenever a worker's addresses change) and withdraws them when it goes.
"""

from __future__ import annotations

import logging
import os
import threading

from services.common.channels import tcp_address
from services.common.control import (
    EmbeddingCacheSnapshot,
    EngineFacts,
    KVEventsReply,
    Stage,
    TransferCounters,
    WorkerInfo,
    WorkerStats,
)
from services.common.messages import DataPlanePeers
from services.common.security import ClusterSecret, derive_keys
from services.engine import EngineConfig, LLMEngine
from services.engine.models.hub import local_model_dir, model_source
from services.workers.engine_worker import EngineWorker
from services.workers.kv_staging import host_identity
from services.workers.restarts import back_off_if_restarted


def resolve_bind_host(host: str) -> str:
    """The address a process binds its ZeroMQ sockets to: `host`, or for "auto" this Ray node's address
    (reachable from the other hosts of the cluster). Every process resolves it on its own node: the
    gateway, and each actor wherever Ray placed it."""
    if host != "auto":
        return host
    import ray

    return str(ray.util.get_node_ip_address())


class EngineActor:
    def __init__(
        self,
        engine_config: EngineConfig,
        name: str,
        stage: Stage = "colocated",
        bind_host: str = "127.0.0.1",
        model_name: str = "model",
        metrics_port: int | None = None,
        kv_staging_bytes: int | None = None,
        cluster_secret: ClusterSecret | None = None,
        image_draft_decode: bool = True,
    ) -> None:
        """`cluster_secret`: authenticate the data plane with the keys derived from it (None: plain);
        `image_draft_decode`: a colocated worker's own image encoder decodes JPEGs at reduced scale."""
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {name}: %(message)s")
        self.num_restarts = back_off_if_restarted(name)  # before the model loads: a crash loop waits here
        self.name, self.stage = name, stage
        bind_host = resolve_bind_host(bind_host)
        self.engine = LLMEngine(engine_config)
        # a colocated worker of a vision-language model encodes its requests' images itself
        image_encoder = (
            _image_encoder(engine_config, self.engine.model_dir, image_draft_decode)
            if stage == "colocated" and self.engine.vision_language is not None
            else None
        )
        self.worker = EngineWorker(
            self.engine,
            tcp_address(bind_host),
            name,
            role=stage,
            model_name=model_name,
            kv_staging_bytes=kv_staging_bytes,
            image_encoder=image_encoder,
            worker_stats=self.stats,
            keys=derive_keys(cluster_secret) if cluster_secret is not None else None,
        )
        self._thread = threading.Thread(target=self.worker.run, name=f"{name}-loop", daemon=True)
        self._thread.start()
        self.metrics_port = None
        if metrics_port is not None:
            from services.workers.metrics import serve_worker_metrics

            self.metrics_port = serve_worker_metrics(self.stats, model_name, bind_host, metrics_port)

    def info(self) -> WorkerInfo:
        engine, worker = self.engine, self.worker
        assert worker.publisher is not None  # built with worker_stats
        facts = EngineFacts(
            max_model_len=engine.max_model_len,
            vocab_size=engine.vocab_size,
            device=engine.config.device,
            dtype=engine.config.dtype,
            block_size=engine.config.block_size,
            num_kv_blocks=engine.num_usable_blocks(),
        )
        return WorkerInfo(
            name=self.name,
            stage=self.stage,
            pid=os.getpid(),
            host_id=worker.host_id,
            model_dir=model_source(engine.config),  # the same on every node, where the local paths may differ
            input_address=worker.input_address,
            state_address=worker.publisher.address,
            kv_address=worker.kv_address,
            embedding_address=worker.embedding_address,
            metrics_port=self.metrics_port,
            num_restarts=self.num_restarts,
            engine=facts,
        )

    def stats(self) -> WorkerStats:
        """Called from Ray's threads and from the worker's loop (its state publisher): reads counters only."""
        transfer = self.worker.transfer_stats
        counters = TransferCounters(
            bytes_sent=transfer.bytes_sent,
            bytes_received=transfer.bytes_received,
            bytes_sent_shared_memory=transfer.bytes_sent_shared_memory,
            bytes_received_shared_memory=transfer.bytes_received_shared_memory,
            num_transfers_completed=transfer.transfers_completed,
            num_failures=transfer.failures,
            num_fallbacks=transfer.fallbacks,
            num_staging_waits=transfer.staging_waits,
            seconds=transfer.seconds.snapshot(),
        )
        return WorkerStats(
            name=self.name,
            stage=self.stage,
            alive=self._thread.is_alive(),
            scheduler=self.engine.scheduler_stats(),
            transfer=counters,
            next_kv_event_seq=self.worker.kv_events.next_seq,
        )

    def register_peers(self, peers: DataPlanePeers) -> None:
        """A gateway's addresses and its view of the other workers': where this worker may connect."""
        self.worker.peers.register(peers)

    def unregister_gateway(self, reply_address: str) -> None:
        self.worker.peers.unregister(reply_address)

    def kv_events(self, next_seq: int | None) -> KVEventsReply:
        """KV cache event batches from `next_seq` on, or a snapshot (see services.workers.event_log)."""
        return self.worker.kv_events.read(next_seq)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        self.worker.stop()
        self._thread.join(timeout_s)


def _image_encoder(engine_config: EngineConfig, model_dir: str, image_draft_decode: bool):
    from services.workers.encoder import ImageEncoder

    config = engine_config.resolved()
    return ImageEncoder(
        model_dir, config.device, config.dtype, config.load_format, image_draft_decode=image_draft_decode
    )


class EncodeActor:
    """An encode worker as a Ray actor: the vision tower and its embedding cache, one EncodeWorker loop.

    It answers info and stats as EngineActor does; instead of KV events it has an embedding cache,
    whose contents (`embedding_cache`, and its state socket) tell the router which encoder holds
    which image.
    """

    def __init__(
        self,
        engine_config: EngineConfig,
        name: str,
        bind_host: str = "127.0.0.1",
        metrics_port: int | None = None,
        cluster_secret: ClusterSecret | None = None,
        image_draft_decode: bool = True,
    ) -> None:
        """`image_draft_decode`: decode JPEGs at reduced scale where the model's processor allows
        (services.workers.encoder); False decodes every image in full."""
        from services.workers.encode_worker import EncodeWorker

        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {name}: %(message)s")
        self.num_restarts = back_off_if_restarted(name)
        bind_host = resolve_bind_host(bind_host)
        if engine_config.model is None:  # the embedded default model is text-only
            raise ValueError("an encode worker needs a vision-language model directory")
        self.name, self.stage = name, "encode"
        # a Hub id is fetched on this actor's node (once per node: services/engine/models/hub.py)
        self.model_dir = local_model_dir(engine_config)
        self.model_source = model_source(engine_config)
        self.host_id = host_identity()
        self.encoder = _image_encoder(engine_config, self.model_dir, image_draft_decode)
        keys = derive_keys(cluster_secret) if cluster_secret is not None else None
        self.worker = EncodeWorker(self.encoder, tcp_address(bind_host), name, worker_stats=self.stats, keys=keys)
        self._thread = threading.Thread(target=self.worker.run, name=f"{name}-loop", daemon=True)
        self._thread.start()
        self.metrics_port = None

    def info(self) -> WorkerInfo:
        assert self.worker.state_address is not None  # built with worker_stats
        return WorkerInfo(
            name=self.name,
            stage="encode",
            pid=os.getpid(),
            host_id=self.host_id,
            model_dir=self.model_source,
            input_address=self.worker.input_address,
            state_address=self.worker.state_address,
            metrics_port=self.metrics_port,
            num_restarts=self.num_restarts,
        )

    def stats(self) -> WorkerStats:
        return WorkerStats(name=self.name, stage="encode", alive=self._thread.is_alive(), encode=self.worker.stats())

    def register_peers(self, peers: DataPlanePeers) -> None:
        """A gateway's view of the workers: the embedding sockets this encoder may deliver to."""
        self.worker.peers.register(peers)

    def unregister_gateway(self, reply_address: str) -> None:
        self.worker.peers.unregister(reply_address)

    def embedding_cache(self) -> EmbeddingCacheSnapshot:
        """The embedding cache's contents. The loop may change the cache meanwhile (this runs on Ray's
        thread): a copy torn by a concurrent change is retried. The loop's own publisher sends the same,
        race-free, on each change; this serves a gateway whose state stream is down."""
        cache = self.encoder.cache
        for _ in range(7):
            version = cache.version
            try:
                return EmbeddingCacheSnapshot(seq=version, content_hashes=cache.hashes())
            except RuntimeError:  # the OrderedDict changed during the copy
                continue
        return EmbeddingCacheSnapshot(seq=cache.version, content_hashes=cache.hashes())  # or raise to the caller

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        self.worker.stop()
        self._thread.join(timeout_s)
