"""The SDPA prefill path against the plain-torch reference (the Triton decode kernel has its own tests)."""

import pytest
import torch

from services.engine.attention.backends import reference_attention, sdpa_causal


@pytest.mark.parametrize(
    "num_queries, seq_len, num_heads, num_kv_heads",
    [
        (7, 7, 4, 4),  # a prompt with no cached prefix
        (3, 19, 8, 2),  # a chunk after a cached prefix, GQA
        (1, 33, 4, 1),  # one token over a long context, MQA
    ],
)
def test_sdpa_bottom_right_causal_matches_reference(num_queries, seq_len, num_heads, num_kv_heads):
    g = torch.Generator().manual_seed(num_queries * 100 + seq_len)
    q = torch.randn(num_queries, num_heads, 16, generator=g)
    k = torch.randn(seq_len, num_kv_heads, 16, generator=g)
    v = torch.randn(seq_len, num_kv_heads, 16, generator=g)
    ref = reference_attention(q, k, v, 0.25)
    out = sdpa_causal(q, k, v, 0.25)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
