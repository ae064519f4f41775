"""Little-endian values read one after another from a binary file's bytes (GGUF, CTranslate2)."""

from __future__ import annotations

import struct
from typing import Any


class ByteReader:
    """`take(fmt)` and `take_bytes(n)` from `pos` on; a read past the end raises `error(truncated)`."""

    def __init__(self, data: bytes | memoryview, truncated: str, error: type[Exception] = ValueError):
        self.data = data
        self.truncated = truncated  # the message of a read past the end
        self.error = error
        self.pos = 0

    def take(self, fmt: str) -> Any:
        """One value of struct format `fmt` ("I" u32, "Q" u64, "B" u8, ...)."""
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise self.error(self.truncated)
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return value

    def take_bytes(self, count: int, truncated: str | None = None) -> bytes:
        """The next `count` bytes; past the end, `truncated` (or the reader's message) is raised."""
        if self.pos + count > len(self.data):
            raise self.error(truncated or self.truncated)
        out = bytes(self.data[self.pos : self.pos + count])
        self.pos += count
        return out
