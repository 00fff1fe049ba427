"""GPU memory by role (services.workers.gpu_memory, `tristage serve`): encoders get what they need,
prefill and decode split the rest's KV room (1 - s) : s, identical workers keep equal shares.

Plans use round numbers: a GPU of T = 100,000 bytes at utilization 0.9 (90,000 usable), encoders
of E = 5,000 and engines of F = 14,000 before their KV cache."""

import json

import pytest
import torch

from benchmarks.bench_models import LLAMA_31_8B, LLAVA_15_7B
from services import serve
from services.cli import build_parser
from services.engine import EngineConfig, LLMEngine
from services.engine.models.loader import read_model_config
from services.engine.multimodal import VisionEncoder
from services.workers.gpu_memory import (
    ActorMemory,
    EncoderBytes,
    EngineBytes,
    encoder_bytes,
    engine_bytes,
    plan_gpu_memory,
)

T = 100_000
E = EncoderBytes(weights=1_000, activations=2_000, cache=1_000, headroom=1_000)  # 5,000
F = EngineBytes(weights=12_000, activations=1_000, headroom=1_000)  # 14,000


def plan(counts, num_gpus=1, **kwargs):
    kwargs = {"gpu_total_bytes": T, "gpu_memory_utilization": 0.9, "encoder": E, "engine": F, **kwargs}
    return plan_gpu_memory(counts, num_gpus=num_gpus, **kwargs)


def budgets(p):
    return {a.name: a.budget_bytes for a in p.actors}


def gpus(p):
    return {a.name: a.gpu for a in p.actors}


# ----------------------------------------------------------------------------------------------
# One GPU, disaggregated


def test_two_encoders_one_prefill_one_decode_on_one_gpu():
    p = plan({"encode": 2, "prefill": 1, "decode": 1})
    # KV room: 90,000 - 2 x 5,000 - 2 x 14,000 = 52,000; decode 0.8 of it, prefill 0.2
    assert budgets(p) == {
        "decode-0": 14_000 + 41_600,
        "prefill-0": 14_000 + 10_400,
        "encode-0": 5_000,
        "encode-1": 5_000,
    }
    assert not p.pinned and p.num_gpus == 1 and set(gpus(p).values()) == {0}
    assert sum(budgets(p).values()) == 90_000
    decode = p.of_role("decode")[0]
    assert decode == ActorMemory("decode", 0, 0, 0.556, 0.556, 55_600)


def test_one_encoder_one_prefill_one_decode_on_one_gpu():
    p = plan({"encode": 1, "prefill": 1, "decode": 1})
    # KV room: 90,000 - 5,000 - 28,000 = 57,000
    assert budgets(p) == {"decode-0": 14_000 + 45_600, "prefill-0": 14_000 + 11_400, "encode-0": 5_000}


def test_text_only_disaggregated_splits_prefill_and_decode_by_the_tunable():
    p = plan({"prefill": 1, "decode": 1}, encoder=None)
    # KV room: 90,000 - 28,000 = 62,000
    assert budgets(p) == {"decode-0": 14_000 + 49_600, "prefill-0": 14_000 + 12_400}
    even = plan({"prefill": 1, "decode": 1}, encoder=None, decode_kv_share=0.5)
    assert budgets(even) == {"decode-0": 45_000, "prefill-0": 45_000}


def test_each_decode_weighs_s_and_each_prefill_1_minus_s():
    p = plan({"prefill": 2, "decode": 1}, encoder=None, decode_kv_share=0.6)
    # KV room: 90,000 - 42,000 = 48,000, weights 0.4 + 0.4 + 0.6
    kv = {name: budget - 14_000 for name, budget in budgets(p).items()}
    assert kv == {"decode-0": pytest.approx(20_571, abs=1), "prefill-0": 13_714, "prefill-1": 13_714}


def test_ray_shares_are_the_budgets_rounded_down_to_ray_s_resolution():
    p = plan({"encode": 2, "prefill": 1, "decode": 1}, gpu_total_bytes=3 * T)
    for actor in p.actors:
        assert actor.gpu_memory_utilization == actor.budget_bytes / (3 * T)
        assert actor.gpu_memory_utilization - 1e-4 < actor.num_gpus <= actor.gpu_memory_utilization
    assert sum(a.num_gpus for a in p.actors) <= 0.9


def test_a_role_s_explicit_share_is_taken_first_and_the_others_plan_around_it():
    p = plan({"encode": 1, "prefill": 1, "decode": 1}, utilization_by_role={"decode": 0.5})
    # decode 50,000 as asked; prefill: F + the KV room left, 90,000 - 5,000 - 50,000 - 14,000
    assert budgets(p) == {"decode-0": 50_000, "prefill-0": 35_000, "encode-0": 5_000}
    p = plan({"encode": 1, "prefill": 1, "decode": 1}, utilization_by_role={"encode": 0.1})
    assert budgets(p)["encode-0"] == 10_000


# ----------------------------------------------------------------------------------------------
# Identical workers: as before


@pytest.mark.parametrize(
    ("replicas", "num_gpus", "utilization", "num_gpus_each"),
    [(1, 1, 0.9, 1.0), (2, 1, 0.45, 0.5), (3, 1, 0.3, 1 / 3), (3, 2, 0.45, 0.5), (2, 2, 0.9, 1.0), (5, 2, 0.3, 1 / 3)],
)
def test_colocated_replicas_keep_equal_shares(replicas, num_gpus, utilization, num_gpus_each):
    """k = ceil(N / G) workers a GPU, 1/k of it each, as `_share_gpus` gives (packed by Ray, not pinned)."""
    p = plan({"colocated": replicas}, num_gpus=num_gpus, encoder=None)
    assert [a.gpu_memory_utilization for a in p.actors] == pytest.approx([utilization] * replicas)
    assert [a.num_gpus for a in p.actors] == pytest.approx([num_gpus_each] * replicas)
    assert not p.pinned


# ----------------------------------------------------------------------------------------------
# Several GPUs


def test_on_two_gpus_engines_spread_and_encoders_fill_in_and_each_gpu_splits_its_own():
    p = plan({"encode": 2, "prefill": 1, "decode": 1}, num_gpus=2)
    assert gpus(p) == {"decode-0": 0, "encode-0": 0, "prefill-0": 1, "encode-1": 1}
    # each engine has a GPU to itself beside one encoder: all of 90,000 - 5,000
    assert budgets(p) == {"decode-0": 85_000, "encode-0": 5_000, "prefill-0": 85_000, "encode-1": 5_000}
    assert p.pinned and p.num_gpus == 2


def test_actors_of_one_role_get_what_their_own_gpu_leaves():
    p = plan({"encode": 1, "prefill": 2, "decode": 2}, num_gpus=2)
    assert gpus(p) == {"decode-0": 0, "prefill-0": 0, "encode-0": 0, "decode-1": 1, "prefill-1": 1}
    # GPU 0: KV room 90,000 - 5,000 - 28,000 = 57,000; GPU 1: 90,000 - 28,000 = 62,000
    assert budgets(p) == {
        "decode-0": 14_000 + 45_600,
        "prefill-0": 14_000 + 11_400,
        "encode-0": 5_000,
        "decode-1": 14_000 + 49_600,
        "prefill-1": 14_000 + 12_400,
    }
    for g in (0, 1):
        assert sum(a.budget_bytes for a in p.actors if a.gpu == g) <= 90_000


def test_a_gpu_each_when_there_are_enough():
    p = plan({"encode": 1, "prefill": 1, "decode": 1}, num_gpus=4)
    assert sorted(gpus(p).values()) == [0, 1, 2]
    assert {a.num_gpus for a in p.actors} == {1.0} and {a.gpu_memory_utilization for a in p.actors} == {0.9}
    assert not p.pinned


# ----------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("share", [0.0, 1.0, 1.5, -0.2])
def test_a_decode_kv_share_outside_0_1_is_refused(share):
    with pytest.raises(ValueError, match="decode_kv_share must be between 0 and 1"):
        plan({"prefill": 1, "decode": 1}, decode_kv_share=share)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [({"decoder": 0.5}, "names the role 'decoder'"), ({"decode": 0.0}, "in \\(0, 1\\]"), ({"prefill": 1.2}, "1.2")],
)
def test_bad_role_overrides_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        plan({"prefill": 1, "decode": 1}, utilization_by_role=overrides)


def test_a_gpu_its_actors_cannot_share_is_refused_with_what_they_need():
    with pytest.raises(ValueError, match=r"GPU 0 .*no room for a KV cache"):
        plan({"encode": 2, "prefill": 1, "decode": 1}, engine=EngineBytes(40_000, 0, 0))
    with pytest.raises(ValueError, match=r"GPU 0 .*encoders .* need"):
        plan({"encode": 2, "prefill": 1, "decode": 1}, encoder=EncoderBytes(50_000, 0, 0, 0))
    with pytest.raises(ValueError, match="no GPUs"):
        plan({"prefill": 1, "decode": 1}, num_gpus=0)


def test_serve_refuses_a_bad_tunable_before_it_starts_anything(monkeypatch):
    monkeypatch.setattr(serve, "_start_ray", lambda config: pytest.fail("Ray was started"))
    with pytest.raises(SystemExit, match="tristage serve: decode_kv_share must be between 0 and 1"):
        serve.run(serve.ServeConfig(engine=EngineConfig(), decode_kv_share=1.0))
    with pytest.raises(SystemExit, match="names the role 'gpu'"):
        serve.run(serve.ServeConfig(engine=EngineConfig(), role_gpu_memory_utilization=(("gpu", 0.5),)))


def test_the_cli_takes_the_split_and_per_role_shares():
    args = build_parser().parse_args(
        ["serve", "--decode-kv-share", "0.7", "--role-gpu-memory-utilization", "encode=0.05"]
        + ["--role-gpu-memory-utilization", "decode=0.5"]
    )
    assert args.decode_kv_share == 0.7
    assert args.role_gpu_memory_utilization == [("encode", 0.05), ("decode", 0.5)]
    assert build_parser().parse_args(["serve"]).decode_kv_share == 0.8
    for bad in ("decode", "decode=x", "gpu=0.5", "decode=0", "decode=2"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--role-gpu-memory-utilization", bad])


def test_serve_hands_each_actor_its_placement_and_pins_only_a_plan_over_several_gpus():
    pinned = object()
    one_gpu = plan({"encode": 2, "prefill": 1, "decode": 1})
    [decode] = serve._placements(one_gpu, "decode", None)
    assert (decode.num_gpus, decode.gpu_memory_utilization, decode.placement_group) == (0.556, 0.556, None)
    two_gpus = plan({"encode": 2, "prefill": 1, "decode": 1}, num_gpus=2)
    encoders = serve._placements(two_gpus, "encode", pinned)  # type: ignore[arg-type]
    assert [(e.placement_group, e.bundle_index) for e in encoders] == [(pinned, 0), (pinned, 1)]


# ----------------------------------------------------------------------------------------------
# What each role needs


def write_config(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return read_model_config(tmp_path)


def test_llava_15_7b_needs(tmp_path):
    """Real shapes, counted on the meta device: CLIP ViT-L/14-336 + projector, Llama-2-7B."""
    hf_config = write_config(tmp_path, LLAVA_15_7B)
    encoder = encoder_bytes(hf_config, torch.bfloat16)
    assert encoder.weights == 324_485_120 * 2
    # 64 images of 577 tokens; per token: 25 hidden states + 4 x 1024 + 2 x 4096 + 1024 + 3 x 4096
    assert encoder.activations == 64 * 577 * (25 * 1024 + 4 * 1024 + 2 * 4096 + 1024 + 3 * 4096) * 2
    assert encoder.cache == 2**30
    assert encoder.headroom == int(0.25 * encoder.activations) + 256 * 2**20
    engine = engine_bytes(hf_config, torch.bfloat16, max_num_batched_tokens=2048, max_num_seqs=256)
    assert engine.weights == 6_738_939_904 * 2
    assert engine.activations == (2048 * (2 * 4096 + 3 * 11008 + 3 * 4096) + 256 * 32064) * 2


def test_an_h100_of_llava_15_7b_with_two_encoders(tmp_path):
    """The module docstring's figures: 2 encoders, 1 prefill, 1 decode on an 80 GB H100 at 0.9."""
    hf_config = write_config(tmp_path, LLAVA_15_7B)
    dtype, total = torch.bfloat16, 81_559 * 2**20
    engine = engine_bytes(hf_config, dtype, 2048, 256)
    p = plan_gpu_memory(
        {"encode": 2, "prefill": 1, "decode": 1},
        num_gpus=1,
        gpu_total_bytes=total,
        gpu_memory_utilization=0.9,
        encoder=encoder_bytes(hf_config, dtype),
        engine=engine,
    )
    kv_tokens = {a.role: (a.budget_bytes - engine.total) // (2 * 32 * 4096 * 2) for a in p.actors if a.role != "encode"}
    assert kv_tokens == {"decode": 54_094, "prefill": 13_523}
    # before: a quarter of 0.9 of the GPU each, the same 13.1 GiB of weights and activations
    assert int(0.9 * total / 4 - engine.total) // (2 * 32 * 4096 * 2) == 9_920


def test_a_text_model_s_engine_weights(tmp_path):
    engine = engine_bytes(write_config(tmp_path, LLAMA_31_8B), torch.bfloat16, 2048, 256)
    assert engine.weights == 8_030_261_248 * 2


@pytest.mark.parametrize("family", ["llava-clip-llama", "llava-siglip-qwen2", "qwen2-vl", "qwen2.5-vl"])
def test_every_family_s_encoder_budget_counts_the_weights_it_loads(vlm_dirs, family):
    hf_config = read_model_config(vlm_dirs[family])
    encoder = encoder_bytes(hf_config, torch.float32, batch_images=4, cache_bytes=0)
    loaded = VisionEncoder.from_model_dir(vlm_dirs[family], "cpu", torch.float32, load_format="dummy")
    assert encoder.weights == loaded.num_parameters * 4
    assert encoder.activations > 0 and encoder.total > encoder.weights


def test_the_kv_cache_configuration_reports_the_actor_s_own_share(llama_dir):
    """vllm:cache_config_info's labels come from the engine an actor built with its placement's config."""
    engine = LLMEngine(model=llama_dir, gpu_memory_utilization=0.2471, num_kv_blocks=48)
    info = engine.scheduler_stats().cache_config
    assert info.gpu_memory_utilization == 0.2471
    assert info.num_gpu_blocks == engine.num_usable_blocks()
