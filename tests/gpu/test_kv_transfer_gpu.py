"""KV transfer between GPU engines: the pinned staging path, the side-stream copies and the plain path
all give the colocated output, and everything held is freed."""

import pytest
import torch

from tests.unit.test_disaggregation import DELIVERIES, Cluster, colocated, prompts_with_shared_prefix

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("delivery", DELIVERIES)
def test_disaggregated_output_on_the_gpu_equals_colocated(llama_dir, delivery):
    prompts = prompts_with_shared_prefix() * 3  # several transfers in flight at once
    cluster = Cluster(llama_dir, delivery=delivery)
    try:
        assert cluster.prefill_engine.runner.device.type == "cuda"
        staging = cluster.prefill.prefill_role.staging
        if staging is not None:
            assert staging.tensor.is_pinned()  # registered with CUDA: asynchronous DMA copies
        assert cluster.generate(prompts, max_tokens=12) == colocated(llama_dir, prompts, 12)
        assert cluster.wait_idle(), "blocks leaked on a worker"
        assert cluster.prefill.transfer_stats.failures == 0 and cluster.decode.transfer_stats.fallbacks == 0
        assert staging is None or staging.allocator.num_taken_bytes == 0
    finally:
        cluster.close()
