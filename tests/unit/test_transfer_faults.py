"""KV transfers that break half-way, between a real prefill and decode worker over loopback sockets: a
link cut after the first layer group, and a decode worker that never acks. The client still gets the
colocated output, and both ends free every block, lease and staging byte. (The layers never leaving
at all: test_disaggregation.test_a_transfer_that_never_completes_is_recomputed_and_frees_everything;
whole workers killed or stopped under load: tests/integration/test_chaos.py.)"""

from __future__ import annotations

import time

import pytest

from services.engine.default_model import build_model_dir
from services.workers.kv_transfer import LAYERS_PER_MESSAGE
from tests.unit.test_disaggregation import Cluster, colocated, prompts_with_shared_prefix

NUM_LAYERS = 3 * LAYERS_PER_MESSAGE  # three layer groups a transfer, so one can be cut after the first


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory, tokenizer_dir):
    path = tmp_path_factory.mktemp("deep")
    return str(build_model_dir(path, tokenizer_dir=tokenizer_dir, num_hidden_layers=NUM_LAYERS))


def _wait_for_leases_to_end(cluster: Cluster, timeout_s: float = 5.0) -> None:
    sender = cluster.prefill.prefill_role.sender
    deadline = time.monotonic() + timeout_s
    while sender.num_leases and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sender.num_leases == 0
    assert cluster.prefill.prefill_role.staging.allocator.num_taken_bytes == 0


@pytest.mark.parametrize("delivery", ["shared memory", "frames"])
def test_a_transfer_cut_after_its_first_layer_group_is_recomputed_and_frees_both_ends(deep_model_dir, delivery):
    prompts = prompts_with_shared_prefix()[:2]
    cluster = Cluster(deep_model_dir, kv_timeout_s=0.5, kv_lease_s=1.0, delivery=delivery)
    sender = cluster.prefill.prefill_role.sender
    send_group = sender._send_group
    groups_sent: dict[str, int] = {}

    def cut_after_the_first_group(sockets, header, payload):  # injected fault: the link drops the rest
        groups_sent[header.request_id] = groups_sent.get(header.request_id, 0) + 1
        if groups_sent[header.request_id] == 1:
            send_group(sockets, header, payload)

    sender._send_group = cut_after_the_first_group
    try:
        assert cluster.generate(prompts, max_tokens=8) == colocated(deep_model_dir, prompts, 8)
        assert set(groups_sent.values()) == {NUM_LAYERS // LAYERS_PER_MESSAGE}  # every group was due
        assert cluster.decode.transfer_stats.fallbacks == len(prompts)
        assert cluster.wait_idle(), "blocks leaked after the cut"
        _wait_for_leases_to_end(cluster)
        assert cluster.decode.decode_role.receiver.num_pending == 0
    finally:
        cluster.close()


def test_a_decode_worker_that_never_acks_still_answers_and_the_prefill_lease_frees_everything(llama_dir):
    prompts = prompts_with_shared_prefix()
    cluster = Cluster(llama_dir, kv_lease_s=1.0)
    receiver = cluster.decode.decode_role.receiver
    receiver._ack = lambda *args, **kwargs: None  # injected fault: acks are lost on the way back
    try:
        assert cluster.generate(prompts, max_tokens=8) == colocated(llama_dir, prompts, 8)
        assert cluster.decode.transfer_stats.fallbacks == 0  # the KV arrived: nothing was recomputed
        assert cluster.wait_idle(), "blocks leaked without acks"
        _wait_for_leases_to_end(cluster)
        assert cluster.prefill.prefill_role.stats.failures == len(prompts)  # each lease ran out, counted
    finally:
        cluster.close()
