"""Encoding of wire messages: a msgpack header frame, then raw tensor frames (zero-copy on send).

Decoders check the frame count and size limits before parsing, reject anything that is not one of
the expected message types, and never unpickle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

import msgspec

from services.common.messages import PROTOCOL_VERSION

if TYPE_CHECKING:
    import zmq
    from typing_extensions import TypeForm

T = TypeVar("T")

MAX_HEADER_BYTES = 64 * 2**20  # a prompt of millions of token ids still fits


class DecodeError(ValueError):
    """A frame that does not parse as an expected message (or breaks a size limit)."""


class MessageCodec(Generic[T]):
    def __init__(self, message_type: TypeForm[T], max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        """`message_type` is a message struct or a union of them (`WorkerInbound`): what decode returns."""
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(message_type)
        self.max_header_bytes = max_header_bytes

    def encode(self, message: T, *buffers: memoryview | bytes) -> list[bytes | memoryview]:
        """The header frame, then each buffer as its own frame (sent without copying)."""
        return [self._encoder.encode(message), *buffers]

    def decode(self, frames: Sequence[bytes | memoryview | zmq.Frame]) -> T:
        """The header's message (raw frames after it are the caller's to read)."""
        if not frames:
            raise DecodeError("empty message")
        header = frames[0]
        if not isinstance(header, (bytes, memoryview)):
            header = header.buffer  # a zmq.Frame received with copy=False
        if len(header) > self.max_header_bytes:
            raise DecodeError(f"header of {len(header)} bytes exceeds the {self.max_header_bytes}-byte limit")
        try:
            message = self._decoder.decode(header)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DecodeError(f"malformed message: {exc}") from exc
        version = getattr(message, "version", None)
        if version != PROTOCOL_VERSION:
            raise DecodeError(f"protocol version {version} is not {PROTOCOL_VERSION}")
        return message
