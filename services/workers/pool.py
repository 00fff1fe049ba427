"""Pools of engine actors: start them with their resource share, wait until they serve, stop them.

A pool asks Ray for `num_gpus` per actor on CUDA (one GPU each by default) and one CPU otherwise.
Ray restarts a dead actor however often it dies (`max_restarts=-1`: a worker lost for good would
leave the service short for its whole life); its new process binds new addresses, which the
gateway picks up from the next `info()` call (a services.common.control.WorkerInfo). A restarted
actor backs off before it loads its model when it restarted recently, and a worker that restarts
too often is reported as crash-looping (services.workers.restarts, services.common.restarts).

Shared pools (a Ray cluster that several gateway replicas join): actors are named
`<stage>-<i>` in the RAY_NAMESPACE namespace and detached, so the first gateway creates them, the
others attach to the same actors (`get_if_exists`), and a gateway that goes away leaves them to the
rest. Workers stream to whichever gateway sent a request (its `reply_to`), so they need not know
how many gateways there are.

Pinning pools to nodes: joined to a Ray cluster, each actor asks for one unit of the resource named
after its role (`stage_resources`), so it runs only on nodes started with that resource
(`ray start --resources='{"decode": 2}'`). A pool the cluster cannot place (no node offers its role
resource, or too few GPUs in all) fails with PoolUnplaceable after RESOURCE_WAIT_S, naming what is
missing, instead of waiting for ever (an autoscaler may add the nodes in the meantime).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TypeVar, cast

import ray
from ray.actor import ActorProxy

from services.common.control import WorkerInfo
from services.common.security import ClusterSecret
from services.engine import EngineConfig
from services.workers.actor import EncodeActor, EngineActor

MAX_ACTOR_RESTARTS = -1  # Ray's "restart without limit"
RAY_NAMESPACE = "tristage"
RESOURCE_WAIT_S = 120.0  # how long a pool waits for the cluster to offer what it needs
RESOURCE_POLL_S = 1.0


class PoolUnplaceable(RuntimeError):
    """The Ray cluster offers too little of a resource a pool needs (in total, not just free now)."""


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
    image_draft_decode: bool = True,
    shared: bool = False,
    cluster_secret: ClusterSecret | None = None,
) -> list[WorkerHandle]:
    """Start `count` actors (or, `shared`, attach to those already running under the same names) and
    block until every one has loaded its model (raises if one fails)."""
    on_gpu = engine_config.resolved().device.startswith("cuda")
    needs = {stage: float(count)} if stage_resources else {}
    if on_gpu:
        needs["GPU"] = gpus_per_worker * count
    wait_for_resources(stage, needs)
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
            encode_proxy = encode_remote.remote(
                engine_config, name, bind_host, cluster_secret=cluster_secret, image_draft_decode=image_draft_decode
            )
            actors.append((name, _handle(encode_proxy)))
            continue
        remote = ray.remote(EngineActor).options(**options)
        # the data plane's secret goes as a constructor argument: Ray keeps it for restarts, no env var shows it
        proxy = remote.remote(
            engine_config,
            name,
            stage,
            bind_host,
            model_name,
            metrics_port,
            kv_staging_bytes,
            cluster_secret,
            image_draft_decode=image_draft_decode,
        )
        actors.append((name, _handle(proxy)))
    infos = ray.get([actor.info.remote() for _, actor in actors])
    return [WorkerHandle(name, stage, actor, info) for (name, actor), info in zip(actors, infos)]


def wait_for_resources(stage: str, needs: dict[str, float], timeout_s: float = RESOURCE_WAIT_S) -> None:
    """Block until the cluster offers `needs` in total (its nodes' resources, used or not); raise
    PoolUnplaceable naming the shortfall after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        total = ray.cluster_resources()
        short = {name: (need, total.get(name, 0.0)) for name, need in needs.items() if total.get(name, 0.0) < need}
        if not short:
            return
        if time.monotonic() >= deadline:
            missing = ", ".join(
                f"{name!r}: needs {need:g}, the cluster has {have:g}" for name, (need, have) in short.items()
            )
            raise PoolUnplaceable(
                f"the {stage} pool cannot be placed ({missing}); start nodes that offer it, e.g. "
                f"`ray start --address HEAD --resources='{{\"{stage}\": N}}'` for a role resource"
            )
        time.sleep(RESOURCE_POLL_S)


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
