"""The engine as a Ray actor: one process, one engine, one EngineWorker loop thread.

Ray is the control plane only (placement, restarts, configuration, health and stats calls); tokens
travel over the worker's ZeroMQ sockets. The actor is threaded (`max_concurrency`), so a stats call
never waits behind the engine loop.
"""

from __future__ import annotations

import logging
import os
import threading

from services.common.channels import tcp_address
from services.engine import EngineConfig, LLMEngine
from services.workers.engine_worker import EngineWorker


class EngineActor:
    def __init__(self, engine_config: EngineConfig, name: str, stage: str = "colocated",
                 bind_host: str = "127.0.0.1", model_name: str = "model", metrics_port: int | None = None,
                 kv_staging_bytes: int | None = None) -> None:
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {name}: %(message)s")
        self.name, self.stage = name, stage
        if bind_host == "auto":  # reachable from other hosts: this node's address as Ray knows it
            import ray

            bind_host = ray.util.get_node_ip_address()
        self.engine = LLMEngine(engine_config)
        # a colocated worker of a vision-language model encodes its requests' images itself
        image_encoder = (_image_encoder(engine_config, self.engine.model_dir)
                         if stage == "colocated" and self.engine.vision_language is not None else None)
        self.worker = EngineWorker(self.engine, tcp_address(bind_host), name, role=stage, model_name=model_name,
                                   kv_staging_bytes=kv_staging_bytes, image_encoder=image_encoder)
        self._thread = threading.Thread(target=self.worker.run, name=f"{name}-loop", daemon=True)
        self._thread.start()
        self.metrics_port = None
        if metrics_port is not None:
            from services.workers.metrics import serve_worker_metrics

            self.metrics_port = serve_worker_metrics(self.stats, model_name, bind_host, metrics_port)

    def info(self) -> dict:
        engine = self.engine
        return {"name": self.name, "stage": self.stage, "address": self.worker.input_address, "pid": os.getpid(),
                "kv_address": self.worker.kv_address, "host_id": self.worker.host_id,
                "embedding_address": self.worker.embedding_address, "metrics_port": self.metrics_port,
                "model_dir": engine.model_dir, "max_model_len": engine.max_model_len,
                "vocab_size": engine.vocab_size, "device": engine.config.device, "dtype": engine.config.dtype,
                "block_size": engine.config.block_size, "num_kv_blocks": engine.num_usable_blocks()}

    def stats(self) -> dict:
        transfer = self.worker.transfer_stats
        return {"name": self.name, "stage": self.stage, "alive": self._thread.is_alive(),
                "num_free_blocks": self.engine.num_free_blocks(),
                "kv_transfer_bytes_sent": transfer.bytes_sent, "kv_transfer_bytes_received": transfer.bytes_received,
                "kv_transfer_seconds": transfer.seconds.sum_s, "kv_transfers": transfer.transfers_completed,
                "kv_transfer_seconds_buckets": transfer.seconds.cumulative(),
                "kv_transfer_failures": transfer.failures, "kv_transfer_fallbacks": transfer.fallbacks,
                **self.engine.scheduler_stats()}

    def kv_events(self, next_seq: int | None) -> dict:
        """KV cache events after batch `next_seq - 1`, or a snapshot (see services.workers.event_log)."""
        return self.worker.kv_events.read(next_seq)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        self.worker.stop()
        self._thread.join(timeout_s)


def _image_encoder(engine_config: EngineConfig, model_dir: str):
    from services.workers.encoder import ImageEncoder

    config = engine_config.resolved()
    return ImageEncoder(model_dir, config.device, config.dtype, config.load_format)


class EncodeActor:
    """An encode worker as a Ray actor: the vision tower and its embedding cache, one EncodeWorker loop.

    It answers the same control calls as EngineActor (info, stats, kv_events), so the gateway's health
    loop treats every pool alike; its "KV events" are its embedding cache's contents, for the router.
    """

    def __init__(self, engine_config: EngineConfig, name: str, bind_host: str = "127.0.0.1",
                 metrics_port: int | None = None) -> None:
        from services.workers.encode_worker import EncodeWorker

        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {name}: %(message)s")
        if bind_host == "auto":
            import ray

            bind_host = ray.util.get_node_ip_address()
        self.name, self.stage = name, "encode"
        self.model_dir = engine_config.model
        self.encoder = _image_encoder(engine_config, engine_config.model)
        self.worker = EncodeWorker(self.encoder, tcp_address(bind_host), name)
        self._thread = threading.Thread(target=self.worker.run, name=f"{name}-loop", daemon=True)
        self._thread.start()
        self._cache_seq = 0
        self.metrics_port = None

    def info(self) -> dict:
        return {"name": self.name, "stage": self.stage, "address": self.worker.input_address, "pid": os.getpid(),
                "model_dir": self.model_dir, "metrics_port": self.metrics_port}

    def stats(self) -> dict:
        return {"name": self.name, "stage": self.stage, "alive": self._thread.is_alive(), "num_running": 0,
                "num_waiting": 0, "kv_cache_usage": 0.0, "num_free_blocks": 0, "num_preemptions": 0,
                "prefix_cache_queried_tokens": 0, "prefix_cache_hit_tokens": 0, "kv_transfer_bytes_sent": 0,
                "kv_transfer_failures": 0, "kv_transfer_fallbacks": 0, "kv_transfer_seconds": 0.0,
                "kv_transfer_seconds_buckets": [], "encode": self.worker.stats()}

    def kv_events(self, next_seq: int | None) -> dict:
        """Its embedding cache as a snapshot (the router keeps which encoder holds which image)."""
        self._cache_seq += 1
        return {"seq": self._cache_seq, "snapshot": self.encoder.cache.hashes()}

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        self.worker.stop()
        self._thread.join(timeout_s)
