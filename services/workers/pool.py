"""Pools of engine actors: start them with their resource share, wait until they serve, stop them.

A pool asks Ray for `num_gpus` per actor on CUDA (one GPU each by default) and one CPU otherwise.
Ray restarts a dead actor (`max_restarts`); its new process binds new addresses, which the
gateway picks up from the next `info()` call (a services.common.control.WorkerInfo).

Shared pools (a Ray cluster that several gateway replicas join): actors are named
`<stage>-<i>` in the RAY_NAMESPACE namespace and detached, so the first gateway creates them, the
others attach to the same actors (`get_if_exists`), and a gateway that goes away leaves them to the
rest. Workers stream to whichever gateway sent a request (its `reply_to`), so they need not know
how many gateways there are.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TypeVar, cast

import ray
from ray.actor import ActorProxy

from services.common.control import WorkerInfo
from services.engine import EngineConfig
from services.workers.actor import EncodeActor, EngineActor

MAX_ACTOR_RESTARTS = 3
RAY_NAMESPACE = "tristage"

T = TypeVar("T")


@dataclass
class WorkerHandle:
    name: str
    stage: str
    actor: ray.actor.ActorHandle
    info: WorkerInfo  # as of the last info() call: replaced when Ray restarts the actor

    @property
    def address(self) -> str:
        return self.info.input_address


def start_pool(
    engine_config: EngineConfig,
    stage: str,
    count: int,
    *,
    bind_host: str = "127.0.0.1",
    gpus_per_worker: float = 1.0,
    name_prefix: str | None = None,
    model_name: str = "model",
    stage_resources: bool = False,
    metrics_port: int | None = None,
    kv_staging_bytes: int | None = None,
    shared: bool = False,
) -> list[WorkerHandle]:
    """Start `count` actors (or, `shared`, attach to those already running under the same names) and
    block until every one has loaded its model (raises if one fails)."""
    on_gpu = engine_config.resolved().device.startswith("cuda")
    prefix = name_prefix or stage
    actors: list[tuple[str, ray.actor.ActorHandle]] = []
    for i in range(count):
        name = f"{prefix}-{i}"
        options: dict[str, object] = dict(
            num_cpus=0 if on_gpu else 1,
            num_gpus=gpus_per_worker if on_gpu else 0,
            resources={stage: 1} if stage_resources else None,  # nodes advertise the roles they host
            max_concurrency=4,
            max_restarts=MAX_ACTOR_RESTARTS,
        )
        if shared:
            options.update(name=name, namespace=RAY_NAMESPACE, lifetime="detached", get_if_exists=True)
        if stage == "encode":
            encode_remote = ray.remote(EncodeActor).options(**options)
            actors.append((name, _handle(encode_remote.remote(engine_config, name, bind_host))))
            continue
        remote = ray.remote(EngineActor).options(**options)
        proxy = remote.remote(engine_config, name, stage, bind_host, model_name, metrics_port, kv_staging_bytes)
        actors.append((name, _handle(proxy)))
    infos = ray.get([actor.info.remote() for _, actor in actors])
    return [WorkerHandle(name, stage, actor, info) for (name, actor), info in zip(actors, infos)]


def _handle(proxy: ActorProxy[T]) -> ray.actor.ActorHandle[T]:
    # cast: Ray types ActorClass.remote() as ActorHandle[T] | type[T] (the class only lends its methods'
    # types); the object returned is always the ActorHandle
    return cast(ray.actor.ActorHandle[T], proxy)


def stop_pool(workers: list[WorkerHandle], timeout_s: float = 5.0) -> None:
    stops = [w.actor.stop.remote(timeout_s) for w in workers]
    with contextlib.suppress(Exception):  # a dead or stuck actor is killed below all the same
        ray.get(stops, timeout=timeout_s + 2)
    for w in workers:
        ray.kill(w.actor, no_restart=True)
