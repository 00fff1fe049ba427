"""Arrival processes, length distributions, prompts in real tokens, and each workload's shape."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from loadgen.arrivals import ArrivalConfig, arrival_offsets, inter_arrival_times
from loadgen.images import ImageConfig, ImagePool
from loadgen.lengths import FixedLength, LognormalLength, UniformLength, parse_length
from loadgen.prompts import HFTokenizer, PromptSynthesizer, WordTokenizer
from loadgen.trace import read_trace
from loadgen.workloads import (
    LongContextWorkload,
    MultimodalWorkload,
    SharedPrefixWorkload,
    TraceWorkload,
    zipf_popularity,
)


@pytest.fixture(scope="module")
def hf_synthesizer(tokenizer_dir):
    return PromptSynthesizer(HFTokenizer(tokenizer_dir))


@pytest.fixture(scope="module")
def word_synthesizer():
    return PromptSynthesizer(WordTokenizer())


@pytest.mark.parametrize("rate, burstiness", [(5.0, 1.0), (20.0, 0.25), (2.0, 4.0)])
def test_inter_arrival_times_have_the_rate_and_dispersion(rate, burstiness):
    gaps = inter_arrival_times(rate, burstiness, 50_000, np.random.default_rng(7))
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.05)


def test_arrival_offsets():
    offsets = arrival_offsets(ArrivalConfig(rate=10.0, seed=3), 1000)
    assert offsets[0] == 0.0 and np.all(np.diff(offsets) > 0)
    assert offsets[-1] == pytest.approx(999 / 10.0, rel=0.1)
    assert offsets == arrival_offsets(ArrivalConfig(rate=10.0, seed=3), 1000)  # seeded
    assert arrival_offsets(ArrivalConfig(rate=float("inf")), 3) == [0.0, 0.0, 0.0]
    assert arrival_offsets(ArrivalConfig(max_concurrency=4), 2, [0.0, 1.5]) == [0.0, 1.5]
    assert arrival_offsets(ArrivalConfig(rate=2.0), 2, [0.0, 1.5]) != [0.0, 1.5]  # a rate overrides a trace


def test_length_specs():
    assert parse_length("256") == FixedLength(256)
    assert parse_length("uniform:min=10,max=20") == UniformLength(10, 20)
    assert parse_length("lognormal:median=100,sigma=1") == LognormalLength(100, 1.0, 1600)
    rng = np.random.default_rng(0)
    uniform = UniformLength(10, 20).sample(rng, 5000)
    assert min(uniform) == 10 and max(uniform) == 20
    lognormal = np.array(LognormalLength(100, 1.0, 100_000).sample(rng, 50_000))
    assert np.median(lognormal) == pytest.approx(100, rel=0.05)
    assert np.percentile(lognormal, 99) == pytest.approx(100 * np.exp(2.326), rel=0.1)
    assert LognormalLength(100, 2.0, 300).sample(rng, 1000).count(300) > 100  # clipped at max
    for bad in ("0", "uniform:min=5", "uniform:min=9,max=3", "lognormal:median=5", "zipf:1"):
        with pytest.raises(ValueError):
            parse_length(bad)


def test_prompts_have_exact_token_counts_in_a_real_tokenizer(hf_synthesizer):
    tokenizer, rng = hf_synthesizer.tokenizer, np.random.default_rng(0)
    for num_tokens in (1, 7, 300, 3000):
        prompt = hf_synthesizer.random(num_tokens, rng)
        assert tokenizer.encode(prompt.text) == prompt.token_ids
        assert prompt.num_tokens == len(prompt.token_ids) == num_tokens


def test_shared_prefix_zipf_popularity(word_synthesizer):
    workload = SharedPrefixWorkload(8, FixedLength(8), FixedLength(4), FixedLength(4), zipf_exponent=1.1)
    specs = workload.build(20_000, word_synthesizer, np.random.default_rng(1))
    counts = np.bincount([s.prefix_group for s in specs], minlength=8) / len(specs)
    expected = zipf_popularity(8, 1.1)
    assert expected[0] / expected[1] == pytest.approx(2**1.1)
    np.testing.assert_allclose(counts, expected, atol=0.01)
    assert np.all(np.diff(counts) < 0)  # group 0 is the most popular


def test_shared_prefix_lengths_in_tokens(hf_synthesizer):
    workload = SharedPrefixWorkload(4, FixedLength(100), FixedLength(20), FixedLength(8), zipf_exponent=0.0)
    specs = workload.build(40, hf_synthesizer, np.random.default_rng(2))
    prefixes = {}
    for spec in specs:
        ids = hf_synthesizer.tokenizer.encode(spec.prompt.text)
        assert len(ids) == spec.prompt.num_tokens == 120
        assert prefixes.setdefault(spec.prefix_group, ids[:100]) == ids[:100]
    assert len(prefixes) == 4 and len({tuple(p) for p in prefixes.values()}) == 4


def test_long_context_mix(word_synthesizer):
    workload = LongContextWorkload(FixedLength(16), FixedLength(2000), FixedLength(4), long_fraction=0.1)
    specs = workload.build(50, word_synthesizer, np.random.default_rng(3))
    longs = [s for s in specs if s.tag == "long"]
    assert len(longs) == 5 and all(s.prompt.num_tokens == 2000 for s in longs)
    assert all(s.prompt.num_tokens == 16 for s in specs if s.tag == "short")


def test_multimodal_images_repeat_at_the_given_share(word_synthesizer):
    pool = ImagePool(ImageConfig(1, ((64, 48),), repeat_ratio=0.5), np.random.default_rng(4))
    drawn = [pool.draw()[0] for _ in range(400)]
    assert len(set(drawn)) / len(drawn) == pytest.approx(0.5, abs=0.08)
    assert drawn[0].startswith("data:image/jpeg;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(drawn[0].split(",", 1)[1])))
    assert image.size == (64, 48)

    workload = MultimodalWorkload(FixedLength(8), FixedLength(4), ImageConfig(3, ((32, 32),), image_format="png"))
    specs = workload.build(4, word_synthesizer, np.random.default_rng(5))
    assert all(len(s.images) == 3 and s.images[0].startswith("data:image/png") for s in specs)
    assert len({url for s in specs for url in s.images}) == 12


def test_trace_files(tmp_path, word_synthesizer):
    csv_path = tmp_path / "trace.csv"
    csv_path.write_text("timestamp,input_length,output_length\n2.5,10,3\n1.0,20,4\n")
    rows = read_trace(csv_path, speedup=0.5)
    assert [(r.offset_s, r.num_input_tokens, r.num_output_tokens) for r in rows] == [(0.0, 20, 4), (3.0, 10, 3)]

    jsonl_path = tmp_path / "mooncake.jsonl"
    lines = [
        {"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1, 2, 3]},
        {"timestamp": 500, "input_length": 6, "output_length": 2, "hash_ids": [1, 4]},
    ]
    jsonl_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    specs = TraceWorkload(str(jsonl_path), time_unit="ms", block_size=4).build(
        None, word_synthesizer, np.random.default_rng(6)
    )
    assert [s.offset_s for s in specs] == [0.0, 0.5]
    assert [len(s.prompt.token_ids) for s in specs] == [10, 6]
    first, second = (s.prompt.token_ids for s in specs)
    assert first[:4] == second[:4] and first[4:6] != second[4:6]  # hash id 1 shared, 2 and 4 not

    azure = tmp_path / "azure.csv"
    azure.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n"
    )
    rows = read_trace(azure)
    assert rows[1].offset_s == pytest.approx(4.314579, abs=1e-5) and rows[1].num_output_tokens == 109
