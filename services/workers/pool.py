"""Pools of engine actors: start them with their resource share, wait until they serve, stop them.

A pool asks Ray for `num_gpus` per actor on CUDA (one GPU each by default) and one CPU otherwise.
Ray restarts a dead actor however often it dies (`max_restarts=-1`: a worker lost for good would
leave the service short for its whole life); its new process binds new addresses, which the
gateway picks up from the next `info()` call (a services.common.control.WorkerInfo). A restarted
actor backs off before it loads its model when it restarted recently, and a worker that restarts
too often is reported as crash-looping (services.workers.restarts, services.common.restarts).

Sharing GPUs by role: given `placements` (services.workers.gpu_memory's plan), each actor has its
own Ray `num_gpus`, the `gpu_memory_utilization` its engine sizes its KV cache by, and, where the plan
spans several GPUs, the bundle of a placement group it is pinned to (`reserve_gpus`: one bundle a
GPU, so the actors planned to share a GPU do; a restarted actor comes back to its bundle).

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
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TypeVar, cast

import ray
from ray.actor import ActorProxy
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

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


@dataclass(frozen=True)
class GPUPlacement:
    """One actor's part of a GPU."""

    num_gpus: float  # Ray's request
    gpu_memory_utilization: float  # its EngineConfig's: the fraction of the GPU's memory it may use
    placement_group: PlacementGroup | None = None  # pinned to bundle `bundle_index` (one GPU) of this group
    bundle_index: int = 0


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
    placements: Sequence[GPUPlacement] | None = None,
) -> list[WorkerHandle]:
    """Start `count` actors (or, `shared`, attach to those already running under the same names) and
    block until every one has loaded its model (raises if one fails). `placements` (on CUDA): one per
    actor, in place of `gpus_per_worker` and the engine config's gpu_memory_utilization."""
    on_gpu = engine_config.resolved().device.startswith("cuda")
    if placements is not None and len(placements) != count:
        raise ValueError(f"{len(placements)} GPU placements for {count} {stage} actors")
    needs = {stage: float(count)} if stage_resources else {}
    if on_gpu:
        needs["GPU"] = sum(p.num_gpus for p in placements) if placements else gpus_per_worker * count
    wait_for_resources(stage, needs)
    prefix = name_prefix or stage
    actors: list[tuple[str, ray.actor.ActorHandle]] = []
    for i in range(count):
        name = f"{prefix}-{i}"
        placement = placements[i] if placements and on_gpu else None
        options: dict[str, object] = dict(
            num_cpus=0 if on_gpu else 1,
            num_gpus=(gpus_per_worker if placement is None else placement.num_gpus) if on_gpu else 0,
            resources={stage: 1} if stage_resources else None,  # nodes advertise the roles they host
            max_concurrency=4,
            max_restarts=MAX_ACTOR_RESTARTS,
        )
        actor_config = engine_config
        if placement is not None:
            actor_config = replace(engine_config, gpu_memory_utilization=placement.gpu_memory_utilization)
            if placement.placement_group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=placement.placement_group, placement_group_bundle_index=placement.bundle_index
                )
        if shared:
            options.update(name=name, namespace=RAY_NAMESPACE, lifetime="detached", get_if_exists=True)
        if stage == "encode":
            encode_remote = ray.remote(EncodeActor).options(**options)
            encode_proxy = encode_remote.remote(
                actor_config, name, bind_host, cluster_secret=cluster_secret, image_draft_decode=image_draft_decode
            )
            actors.append((name, _handle(encode_proxy)))
            continue
        remote = ray.remote(EngineActor).options(**options)
        # the data plane's secret goes as a constructor argument: Ray keeps it for restarts, no env var shows it
        proxy = remote.remote(
            actor_config,
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


def reserve_gpus(num_gpus: int, timeout_s: float = RESOURCE_WAIT_S) -> PlacementGroup:
    """A placement group of `num_gpus` bundles of one GPU each, on one node: the actors put in bundle g
    share that bundle's GPU (Ray places a fractional request inside its bundle). Raises PoolUnplaceable
    when the node cannot give them within `timeout_s`."""
    group = placement_group([{"GPU": 1.0}] * num_gpus, strategy="STRICT_PACK")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise PoolUnplaceable(
            f"{num_gpus} GPUs of one node were not free within {timeout_s:g} s for the workers that share them"
        ) from None
    return group


def release_gpus(group: PlacementGroup) -> None:
    with contextlib.suppress(Exception):  # already gone with Ray
        remove_placement_group(group)


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
