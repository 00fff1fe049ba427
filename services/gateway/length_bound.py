"""A lower bound on a text's token count, from its length alone: refuse hopeless prompts before tokenizing.

Tokenizing a 15 MB prompt takes seconds of a tokenizer thread; measuring it takes nothing. For a
tokenizer whose every step can only keep or grow the text, a text of B bytes needs at least

    ceil(B / (max_shrink * max_token_bytes))  tokens

    max_token_bytes   the most input bytes one token can stand for: the longest vocabulary entry
                      (a byte-level entry has one character per byte, any other entry is counted in
                      UTF-8 bytes, which never undercounts: "▁" is 3 bytes for 1 space, "<0x0A>" 6
                      for 1 byte) or added token (matched on the raw text), computed once at start-up
    max_shrink        how much the normalizer can shorten the text, in bytes: 1 without one; NFC
                      and NFD 3 (three Hangul jamo of 3 bytes compose into one 3-byte syllable);
                      NFKC and NFKD 4 (a 4-byte mathematical letter becomes 1 ASCII byte); Lowercase
                      3 (the 3-byte Kelvin sign becomes "k"); a sequence multiplies its members'

Each token then covers at most max_token_bytes normalized bytes, and the normalized text has at
least B / max_shrink bytes. The bound holds only when nothing is dropped on the way, so `from_tokenizer`
gives no bound (None: every prompt is tokenized) unless

    the model is BPE or Unigram and every byte has a token: a ByteLevel pre-tokenizer, or byte_fallback
        (otherwise an unknown run can vanish, or fuse into one unknown token)
    the pre-tokenizer only splits (ByteLevel, Metaspace, Digits, Punctuation, Split without the
        "Removed" behavior; Whitespace* drop the spaces)
    the normalizer is one of those above, Prepend, or Replace with content no shorter than its pattern

Since characters never outnumber UTF-8 bytes, `min_tokens` first tries the character count (free on a
Python str) and encodes only when that is not already conclusive.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_MAX_SHRINK = {"NFC": 3, "NFD": 3, "NFKC": 4, "NFKD": 4, "Lowercase": 3, "Prepend": 1}
_SPLITTING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "Split", "UnicodeScripts"}
MAX_UTF8_BYTES_PER_CHAR = 4


@dataclass(frozen=True)
class LengthBound:
    max_input_bytes_per_token: int  # max_shrink * max_token_bytes

    def min_tokens(self, text: str, at_least: int) -> int:
        """A lower bound on the tokens of `text`; exact bytes are measured only when the character
        count alone does not reach `at_least` but the bytes might."""
        by_chars = math.ceil(len(text) / self.max_input_bytes_per_token)
        if by_chars >= at_least or by_chars * MAX_UTF8_BYTES_PER_CHAR < at_least:
            return by_chars
        return math.ceil(len(text.encode("utf-8", "surrogatepass")) / self.max_input_bytes_per_token)

    @classmethod
    def from_tokenizer(cls, tokenizer: object) -> LengthBound | None:
        """The bound for a Hugging Face fast tokenizer, or None when none is sound (see the module doc)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        spec = json.loads(backend.to_str())
        max_shrink = _normalizer_shrink(spec.get("normalizer"))
        byte_level = _is_byte_level(spec.get("pre_tokenizer"))
        if max_shrink is None or not _pre_tokenizer_keeps_text(spec.get("pre_tokenizer")):
            logger.info("no prompt length pre-check: the tokenizer's normalizer or pre-tokenizer may drop text")
            return None
        model = spec.get("model") or {}
        if model.get("type") not in ("BPE", "Unigram") or not (byte_level or model.get("byte_fallback")):
            logger.info("no prompt length pre-check: the tokenizer model may drop or fuse unknown text")
            return None
        max_token_bytes = max(
            max((_entry_bytes(token, byte_level) for token in backend.get_vocab(with_added_tokens=False)), default=1),
            max((len(added["content"].encode("utf-8")) for added in spec.get("added_tokens", [])), default=1),
        )
        return cls(max_input_bytes_per_token=max_shrink * max_token_bytes)


def _entry_bytes(token: str, byte_level: bool) -> int:
    return len(token) if byte_level else len(token.encode("utf-8", "surrogatepass"))


def _members(spec: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        return [member for child in spec[key] for member in _members(child, key)]
    return [spec]


def _normalizer_shrink(spec: dict[str, Any] | None) -> int | None:
    shrink = 1
    for member in _members(spec, "normalizers"):
        kind = member.get("type", "")
        if kind == "Replace" and _replace_keeps_length(member):
            continue
        if kind not in _MAX_SHRINK:
            return None
        shrink *= _MAX_SHRINK[kind]
    return shrink


def _replace_keeps_length(spec: dict[str, Any]) -> bool:
    pattern = spec.get("pattern", {}).get("String")  # a Regex pattern may match any length: unsupported
    return isinstance(pattern, str) and len(spec.get("content", "").encode()) >= len(pattern.encode())


def _pre_tokenizer_keeps_text(spec: dict[str, Any] | None) -> bool:
    return all(
        member.get("type") in _SPLITTING_PRE_TOKENIZERS and member.get("behavior") != "Removed"
        for member in _members(spec, "pretokenizers")
    )


def _is_byte_level(spec: dict[str, Any] | None) -> bool:
    return any(member.get("type") == "ByteLevel" for member in _members(spec, "pretokenizers"))
