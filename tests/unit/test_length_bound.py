"""The prompt length lower bound (services.gateway.length_bound): never above the real token count,
and absent for tokenizers that may drop text."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from services.gateway.length_bound import LengthBound


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


def _texts() -> list[str]:
    rng = random.Random(0)
    scripts = [(0x20, 0x7E), (0xC0, 0x24F), (0x1100, 0x11FF), (0x4E00, 0x9FFF), (0x1F600, 0x1F64F)]
    randoms = ["".join(chr(rng.randint(*rng.choice(scripts))) for _ in range(2000)) for _ in range(5)]
    return [
        "hello world " * 200,
        "e\u0301" * 500,  # NFC composes: 3 bytes -> 2
        "\u1100\u1161\u11a8" * 300,  # Hangul jamo: 9 bytes -> one 3-byte syllable
        "<|endoftext|>" * 50,
        *randoms,
    ]


@pytest.mark.parametrize("index", range(len(_texts())))
def test_bound_never_exceeds_the_token_count(hf_tokenizer, index):
    bound = LengthBound.from_tokenizer(hf_tokenizer)
    assert bound is not None
    text = _texts()[index]
    num_tokens = len(hf_tokenizer.encode(text, add_special_tokens=False))
    assert 1 <= bound.min_tokens(text, at_least=num_tokens + 1) <= num_tokens
    assert bound.min_tokens(text, at_least=0) <= num_tokens  # from the characters alone


def test_byte_count_is_used_only_when_it_matters():
    bound = LengthBound(max_input_bytes_per_token=4)
    text = "\U0001f600" * 8  # 8 characters, 32 bytes
    assert bound.min_tokens(text, at_least=1) == 2  # the characters already suffice
    assert bound.min_tokens(text, at_least=5) == 8  # the bytes prove more


def _tokenizer(model, normalizer=None, pre_tokenizer=None) -> SimpleNamespace:
    tokenizer = Tokenizer(model)
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    if pre_tokenizer is not None:
        tokenizer.pre_tokenizer = pre_tokenizer
    return SimpleNamespace(backend_tokenizer=tokenizer)


VOCAB = {"[UNK]": 0, "a": 1, "ab": 2, "abcd": 3}


@pytest.mark.parametrize(
    "tokenizer",
    [
        _tokenizer(models.WordPiece(VOCAB, unk_token="[UNK]")),  # a whole unknown word is one token
        _tokenizer(models.BPE(VOCAB, [], unk_token="[UNK]", fuse_unk=True)),  # no byte for unknown text
        _tokenizer(models.BPE(VOCAB, [], byte_fallback=True), pre_tokenizer=pre_tokenizers.WhitespaceSplit()),
        _tokenizer(models.BPE(VOCAB, [], byte_fallback=True), normalizer=normalizers.Strip()),
        _tokenizer(models.BPE(VOCAB, [], byte_fallback=True), normalizer=normalizers.Replace("  ", " ")),
    ],
    ids=["wordpiece", "bpe_unk", "whitespace_split", "strip", "shrinking_replace"],
)
def test_no_bound_when_text_may_vanish(tokenizer):
    assert LengthBound.from_tokenizer(tokenizer) is None


def test_normalizer_shrink_multiplies():
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" ", "\u2581")])
    bound = LengthBound.from_tokenizer(_tokenizer(models.BPE(VOCAB, [], byte_fallback=True), normalizer=normalizer))
    assert bound == LengthBound(max_input_bytes_per_token=4 * 5)  # NFKC 4, "[UNK]" 5 bytes


def test_slow_tokenizer_has_no_bound():
    assert LengthBound.from_tokenizer(object()) is None
