"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest

from tests.integration.cluster import serving


@pytest.fixture(scope="session")
def colocated_server(tmp_path_factory):
    """One `tristage serve` (colocated, two replicas of the embedded default model) for every test
    module that only needs a working cluster: each start costs Ray's and the workers' start-up."""
    with serving(
        "--mode",
        "colocated",
        "--replicas",
        "2",
        "--max-num-seqs",
        "64",
        "--drain-timeout",
        "10",
        cache_dir=tmp_path_factory.mktemp("cache"),
    ) as proc:
        yield proc
