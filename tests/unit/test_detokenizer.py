"""IncrementalDetokenizer against full decoding, on a small byte-level BPE trained here."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from services.engine.detokenizer import IncrementalDetokenizer, decode_tokens
from services.engine.sampling_params import SamplingParams

EOS = "<|endoftext|>"
PAD = "<|pad|>"
WORDS = (
    "the quick brown fox jumps over lazy dog café naïve über alpha beta gamma delta stop end hello world token window"
).split()


def training_lines(num_lines: int = 300) -> list[str]:
    rng = random.Random(0)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + rng.choice(".,!? ") for _ in range(num_lines)
    ]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE; CJK and emoji are absent from training, so they split into byte tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[EOS, PAD],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(training_lines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False
    )


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def run(
    tokenizer: PreTrainedTokenizerFast,
    output_ids: list[int],
    params: SamplingParams,
    prompt_ids: list[int] | None = None,
    chunk_sizes: list[int] | None = None,
) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed tokens in chunks, collecting every take_delta() piece; finish() unless a stop matched."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids or [], params)
    deltas: list[str] = []
    stop = None
    position = 0
    sizes = iter(chunk_sizes or [])
    while position < len(output_ids) and stop is None:
        size = next(sizes, 1)
        stop = detok.update(output_ids[position : position + size])
        position += size
        deltas.append(detok.take_delta())
    if stop is None:
        detok.finish()
        deltas.append(detok.take_delta())
    return detok, deltas, stop


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_text_equals_full_decode_of_random_tokens(tokenizer, skip_special_tokens):
    rng = random.Random(1)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    for _ in range(40):
        output_ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))]
        prompt_ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 8))]
        chunk_sizes = [rng.randint(1, 3) for _ in output_ids]
        detok, deltas, _ = run(tokenizer, output_ids, params, prompt_ids, chunk_sizes)
        expected = tokenizer.decode(output_ids, skip_special_tokens=skip_special_tokens)
        assert detok.output_text == expected
        assert "".join(deltas) == expected


def test_spaces_match_full_decode_for_real_text(tokenizer):
    text = " hello world, the quick  brown fox.\n  jumps café"
    output_ids = encode(tokenizer, text)
    detok, deltas, _ = run(tokenizer, output_ids, SamplingParams(), prompt_ids=encode(tokenizer, "alpha beta"))
    assert "".join(deltas) == detok.output_text == text


def test_split_multibyte_characters_are_never_emitted_broken(tokenizer):
    text = "hello 日本語 world 🦙🦙 end"
    output_ids = encode(tokenizer, text)
    assert "\ufffd" in tokenizer.decode(output_ids[1:2] + output_ids[6:8])  # bytes really are split
    _detok, deltas, _ = run(tokenizer, output_ids, SamplingParams())
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text


def test_finish_releases_an_incomplete_character_as_full_decode_does(tokenizer):
    output_ids = encode(tokenizer, "ok 🦙")[:-1]  # the emoji's last byte never arrives
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    for token_id in output_ids:
        detok.update([token_id])
    assert detok.output_text == "ok "
    detok.finish()
    assert detok.output_text == tokenizer.decode(output_ids) and detok.output_text.endswith("\ufffd")


def test_window_stays_short_on_long_outputs(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    for token_id in encode(tokenizer, " the quick brown fox" * 50):
        detok.update([token_id])
        assert len(detok._decoder._token_ids) <= 8


@pytest.mark.parametrize("include_stop", [False, True])
def test_stop_string_split_over_tokens_is_found_and_cut(tokenizer, include_stop):
    text = "hello world alpha beta gamma delta end"
    stop = "ta gam"  # spans " beta" and " gamma"
    output_ids = encode(tokenizer, text)
    assert all(stop not in tokenizer.decode([t]) for t in output_ids)
    params = SamplingParams(stop=[stop], include_stop_str_in_output=include_stop)

    detok, deltas, matched = run(tokenizer, output_ids, params)

    cut = text.index(stop) + (len(stop) if include_stop else 0)
    assert matched == stop
    assert detok.output_text == "".join(deltas) == text[:cut]
    if not include_stop:
        assert all(stop[:2] not in delta for delta in deltas)  # not even partially emitted


def test_stop_string_over_three_tokens_is_never_partly_streamed(tokenizer):
    text = "quick 🦙🦙 lazy dog"
    stop = "🦙🦙"  # eight byte tokens
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=[stop]))
    deltas, final_text = [], text[: text.index(stop)]
    matched = None
    for token_id in encode(tokenizer, text):
        matched = detok.update([token_id])
        deltas.append(detok.take_delta())
        assert final_text.startswith(detok.output_text)  # nothing emitted is ever retracted
        if matched:
            break
    assert matched == stop
    assert "".join(deltas) == final_text
    assert all("🦙" not in delta for delta in deltas)


def test_earliest_of_several_stop_strings_wins(tokenizer):
    text = "alpha beta gamma delta"
    detok, _deltas, matched = run(
        tokenizer, encode(tokenizer, text), SamplingParams(stop=["delta", "beta"]), chunk_sizes=[len(text)]
    )  # every token in one update
    assert matched == "beta"
    assert detok.output_text == "alpha "


def test_held_back_tail_is_released_by_finish_when_no_stop_matches(tokenizer):
    text = "hello world alpha"
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["alphabet"]))
    assert detok.update(encode(tokenizer, text)) is None
    assert detok.output_text == text[: -len("alphabet") + 1]  # the last 7 characters are held back
    detok.finish()
    assert detok.output_text == text
    assert detok.take_delta() == text


def test_nothing_after_a_stop_is_ever_emitted(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["fox"]))
    assert detok.update(encode(tokenizer, "the quick brown fox jumps")) == "fox"
    assert detok.update(encode(tokenizer, " over")) is None
    detok.finish()
    assert detok.output_text == "the quick brown "


@pytest.mark.parametrize(
    "skip_special_tokens, expected",
    [
        (True, "hello world again"),
        (False, f"hello world{EOS} again{PAD}"),
    ],
)
def test_skip_special_tokens(tokenizer, skip_special_tokens, expected):
    eos_id, pad_id = tokenizer.convert_tokens_to_ids([EOS, PAD])
    output_ids = encode(tokenizer, "hello world") + [eos_id] + encode(tokenizer, " again") + [pad_id]
    detok, deltas, _ = run(tokenizer, output_ids, SamplingParams(skip_special_tokens=skip_special_tokens))
    assert detok.output_text == "".join(deltas) == expected
    assert expected == tokenizer.decode(output_ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_the_fast_decode_equals_transformers_decode(tokenizer, skip_special_tokens):
    """decode_tokens calls the Rust backend directly; it must give transformers' text, special tokens
    and split characters included."""
    rng = random.Random(3)
    vocab = len(tokenizer)
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 10))]
        expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
        assert decode_tokens(tokenizer, ids, skip_special_tokens) == expected
