"""The protobuf wire format's varint, read without protobuf.

Two readers walk serialized messages by hand: graph_header over an ONNX file's memory map (the
weights are never copied) and tokenizers, which edits a sentencepiece model's normalizer spec.
Both read untrusted bytes, so a varint that runs off the end or past 64 bits is an error, never an
endless loop or a huge integer. Torch-free, dependency-free.
"""

from __future__ import annotations

MAX_VARINT_SHIFT = 63  # the 10th byte of a 64-bit varint starts at bit 63


class WireError(ValueError):
    """Bytes that are not well-formed protobuf wire format."""


def read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The varint at data[pos:] and the position after it; WireError when truncated or over 64 bits."""
    result = shift = 0
    while True:
        if pos >= len(data) or shift > MAX_VARINT_SHIFT:
            raise WireError("truncated or malformed varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
