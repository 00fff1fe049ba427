"""A burst sharing a new prefix lands on one worker: the placement is recorded before any KV event.

Two colocated workers of the tiny default model, pools shared through a Ray cluster, two gateways
attached to them (prefix_affinity and preble). Each burst is 8 requests sharing a new 1536-token
prefix (random ids: cached nowhere), each with its own 16-token suffix, none waiting for another.
Where each one ran is read from the workers' own state streams (the `admitted` topic), as another
gateway would.

    one gateway    all 8 at once: the router claims the prefix on the worker it chose, so the next
                   request exploits it before any worker has said anything (without the claims
                   the burst explores: nothing is known yet)
    two gateways   requests alternate between them, 14 ms apart (98 ms in all); each learns the
                   other's placements from the worker's `admitted` message, or its KV events,
                   whichever comes first (Router.record_remote_placement)
"""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest
import ray
import zmq

from services.serve import _use_ray_auth_token
from services.workers.pool import RAY_NAMESPACE
from tests.integration.cluster import ServeProcess, ray_head
from tests.integration.test_worker_state import WorkerLink

MODEL = "tristage-tiny"
BURST, PREFIX_TOKENS, SUFFIX_TOKENS = 8, 1536, 16  # a prefill step of seconds on CPU: events come late
GAP_S = 0.014  # between two requests through different gateways
POLICIES = ("prefix_affinity", "preble")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    gateways: dict[str, ServeProcess] = {}
    context = zmq.Context()
    links: list[WorkerLink] = []
    with ray_head() as address:
        args = ("--ray-address", address, "--mode", "colocated", "--replicas", "2", "--drain-timeout", "5")
        try:
            for policy in POLICIES:  # the first starts the pools, the second attaches to them
                gateways[policy] = ServeProcess(
                    *args, "--router-policy", policy, cache_dir=cache, startup_timeout_s=180
                )
            _use_ray_auth_token()
            ray.init(address=address, namespace=RAY_NAMESPACE, logging_level="WARNING", log_to_driver=False)
            for name in ("colocated-0", "colocated-1"):
                links.append(WorkerLink(context, ray.get(ray.get_actor(name).info.remote())))
            yield gateways, links
        finally:
            for link in links:
                link.close()
            context.destroy(linger=0)
            if ray.is_initialized():
                ray.shutdown()
            for gateway in gateways.values():
                gateway.stop()


def send_burst(base_urls: list[str], prompts: list[list[int]], gap_s: float) -> list[str]:
    """POST each prompt to base_urls[i % len] `gap_s` after the previous one, without waiting for any
    answer; returns each request's id as the worker will see it (from the response), in order."""
    ids: list[str | None] = [None] * len(prompts)
    errors: list[BaseException] = []

    def post(i: int) -> None:
        try:
            body = {"model": MODEL, "prompt": prompts[i], "max_tokens": 2, "ignore_eos": True}
            reply = httpx.post(base_urls[i % len(base_urls)] + "/v1/completions", json=body, timeout=60)
            reply.raise_for_status()
            ids[i] = reply.json()["id"]
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = []
    start = time.monotonic()
    for i in range(len(prompts)):
        time.sleep(max(0.0, start + i * gap_s - time.monotonic()))
        threads.append(threading.Thread(target=post, args=(i,)))
        threads[-1].start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return [i for i in ids if i is not None]


def where_they_ran(links: list[WorkerLink], request_ids: list[str]) -> dict[str, str]:
    """request id -> the worker that admitted it (its `admitted` message; the gateway's id is the prefix)."""
    for link in links:
        link.read_for(0.5)
    ran = {}
    for link in links:
        for admitted in link.admitted:
            for request_id in request_ids:
                if admitted.request_id.startswith(request_id):
                    ran[request_id] = link.info.name
        link.admitted.clear()
    return ran


def burst_prompts(rng: random.Random, vocab_size: int) -> list[list[int]]:
    prefix = [rng.randrange(10, vocab_size) for _ in range(PREFIX_TOKENS)]
    return [prefix + [rng.randrange(10, vocab_size) for _ in range(SUFFIX_TOKENS)] for _ in range(BURST)]


@pytest.mark.parametrize("policy", POLICIES)
def test_a_burst_through_one_gateway_lands_on_one_worker(cluster, policy):
    gateways, links = cluster
    rng = random.Random(f"one-{policy}")
    prompts = burst_prompts(rng, links[0].info.engine.vocab_size)
    request_ids = send_burst([gateways[policy].base_url], prompts, gap_s=0.0)
    ran = where_they_ran(links, request_ids)
    assert len(ran) == BURST and len(set(ran.values())) == 1, ran


def test_a_burst_through_two_gateways_lands_on_one_worker(cluster):
    gateways, links = cluster
    rng = random.Random("two")
    prompts = burst_prompts(rng, links[0].info.engine.vocab_size)
    request_ids = send_burst([gateways[p].base_url for p in POLICIES], prompts, gap_s=GAP_S)
    ran = where_they_ran(links, request_ids)
    assert len(ran) == BURST and len(set(ran.values())) == 1, ran
