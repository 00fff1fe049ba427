"""Prompts of an exact number of tokens, in the target model's tokenizer.

Two tokenizers:
    HFTokenizer     a local Hugging Face tokenizer directory (--tokenizer PATH; never downloads)
    WordTokenizer   the built-in approximation when none is given: one word is one token

PromptSynthesizer builds every prompt from a pool of *unit pieces*: vocabulary entries that are a
space followed by letters (" garden") and that encode to exactly their own id, alone and twice in
a row. Byte-level BPE and most other pre-tokenizers start a new pre-token at each space, so merges
never cross two pieces and N pieces encode to exactly N tokens:

    text  " the" " garden" " reads" " the"   (N pieces, concatenated)
    ids   [  17,     402,      211,    17 ]  (N ids: the prompt's token ids, exact)

The synthesizer checks this on every prompt (one encode). A tokenizer that breaks it (or has fewer
than MIN_UNIT_PIECES such pieces, when random non-special ids are used instead) gets its prompt
text re-encoded, cut to N tokens and decoded again, up to FIT_ROUNDS times; the count it ends with
is recorded. The token ids, which --prompt-token-ids sends, are always exact.

Shared prefixes stay exact too: prefix ids + suffix ids encode as the concatenation of their texts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

MIN_UNIT_PIECES = 64
FIT_ROUNDS = 3

_UNIT_PIECE = re.compile(r" [A-Za-z]{2,}")

# The built-in approximation's vocabulary: common English words, one token each.
_WORDS = """
the of and to in is was for on that with as by at from his her they this have had are but not be
one all were we when your can said there use each which she do how their if will up other about out
many then them these so some would make like him into time has look two more write go see number no
way could people my than first water been call who its now find long down day did get come made may
part over new sound take only little work know place year live me back give most very after thing
our just name good sentence man think say great where help through much before line right too mean
old any same tell boy follow came want show also around form three small set put end does another
well large must big even such because turn here why ask went men read need land different home us
move try kind hand picture again change off play spell air away animal house point page letter
mother answer found study still learn should world high every near add food between own below
country plant last school father keep tree never start city earth eye light thought head under
story saw left few while along might close something seem next hard open example begin life always
those both paper together got group often run important until children side feet car mile night
walk white sea began grow took river four carry state once book hear stop without second later miss
idea enough eat face watch far really almost let above girl sometimes mountain cut young talk soon
list song being leave family garden engineer scheduler server token cache request lantern bridge
""".split()


class PromptTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        ...

    def decode(self, token_ids: list[int]) -> str: ...

    def unit_pieces(self) -> dict[int, str]:
        """id -> text of each unit piece (see the module docstring)."""
        ...

    def plain_token_ids(self) -> list[int]:
        """Ids that are not special tokens."""
        ...


class WordTokenizer:
    """One whitespace-separated word is one token; ids index the built-in word list."""

    def __init__(self) -> None:
        self._words = list(dict.fromkeys(_WORDS))
        self._ids = {word: i for i, word in enumerate(self._words)}
        self.vocab_size = len(self._words)

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(word, len(self._words)) for word in text.split()]

    def decode(self, token_ids: list[int]) -> str:
        return "".join(" " + self._words[i] for i in token_ids)

    def unit_pieces(self) -> dict[int, str]:
        return {i: " " + word for i, word in enumerate(self._words)}

    def plain_token_ids(self) -> list[int]:
        return list(range(self.vocab_size))


class HFTokenizer:
    """A tokenizer read from a local directory (tokenizer.json and its config)."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self._tokenizer.model_max_length = 1 << 62  # long-context prompts are made on purpose; no warning
        self.vocab_size = len(self._tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tokenizer.decode(token_ids))

    def unit_pieces(self) -> dict[int, str]:
        ids = self.plain_token_ids()
        texts = self._tokenizer.batch_decode([[i] for i in ids])
        candidates = [(i, text) for i, text in zip(ids, texts, strict=True) if _UNIT_PIECE.fullmatch(text)]
        doubled = self._tokenizer([text + text for _, text in candidates], add_special_tokens=False)["input_ids"]
        return {i: text for (i, text), encoded in zip(candidates, doubled, strict=True) if list(encoded) == [i, i]}

    def plain_token_ids(self) -> list[int]:
        special = set(self._tokenizer.all_special_ids)
        return [i for i in range(self.vocab_size) if i not in special]


def load_tokenizer(path: str | Path | None) -> PromptTokenizer:
    return HFTokenizer(path) if path else WordTokenizer()


@dataclass(frozen=True)
class Prompt:
    text: str
    token_ids: list[int]  # exact: what --prompt-token-ids sends
    num_tokens: int  # tokens in `text` as the tokenizer encodes it (equals len(token_ids) but rarely)


class PromptSynthesizer:
    """Random prompts of given token counts; all randomness comes from the caller's generator."""

    def __init__(self, tokenizer: PromptTokenizer) -> None:
        self.tokenizer = tokenizer
        self._piece_text = tokenizer.unit_pieces()
        self._has_unit_pieces = len(self._piece_text) >= MIN_UNIT_PIECES
        pool = list(self._piece_text) if self._has_unit_pieces else tokenizer.plain_token_ids()
        self._pool = np.array(pool, dtype=np.int64)

    def random_ids(self, num_tokens: int, rng: np.random.Generator) -> list[int]:
        return [int(i) for i in rng.choice(self._pool, size=num_tokens)]

    def random(self, num_tokens: int, rng: np.random.Generator) -> Prompt:
        return self.from_ids(self.random_ids(num_tokens, rng))

    def from_ids(self, token_ids: list[int]) -> Prompt:
        """The prompt whose token ids are `token_ids` (ids drawn from this synthesizer)."""
        if self._has_unit_pieces:
            text = "".join(self._piece_text[i] for i in token_ids)
        else:
            text = self.tokenizer.decode(token_ids)
        encoded = self.tokenizer.encode(text)
        for _ in range(FIT_ROUNDS):
            if len(encoded) == len(token_ids):
                break
            text = self.tokenizer.decode(encoded[: len(token_ids)])
            encoded = self.tokenizer.encode(text)
        return Prompt(text=text, token_ids=list(token_ids), num_tokens=len(encoded))
