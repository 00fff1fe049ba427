"""A pool the Ray cluster cannot place fails with the missing resource named, instead of waiting for ever."""

from __future__ import annotations

import time

import pytest
import ray

from services.workers.pool import PoolUnplaceable, wait_for_resources


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, resources={"prefill": 1}, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_a_resource_the_cluster_offers_is_found_at_once(local_ray):
    start = time.monotonic()
    wait_for_resources("prefill", {"prefill": 1.0}, timeout_s=30)
    assert time.monotonic() - start < 5


def test_a_role_no_node_offers_fails_after_the_timeout_naming_it(local_ray):
    start = time.monotonic()
    with pytest.raises(PoolUnplaceable) as exc:
        wait_for_resources("decode", {"decode": 2.0, "prefill": 1.0}, timeout_s=1.5)
    assert 1.5 <= time.monotonic() - start < 10
    assert "'decode': needs 2, the cluster has 0" in str(exc.value)
    assert "prefill" not in str(exc.value).split("(")[1].split(")")[0]  # only the shortfall is named
