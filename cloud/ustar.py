"""A small, strict reader of uncompressed tar archives arriving as a stream of chunks.

The upload parser's tar layer (``cloud.ingest``), in place of :mod:`tarfile`'s stream mode, which
spent ~140 us of Python per member here (file-object layers, a 16 KB read buffer, a copy of every
member through a bytearray) where the frame's decode check costs ~80 us. This reader works on the
chunks as they come: a member's bytes are one slice of the chunk that holds them (a join only where
a member straddles two), and a header is parsed with a handful of slices.

What it accepts is a subset of what :mod:`tarfile` reads, and everything tarfile refused it refuses:

* 512-byte headers (ustar, GNU and V7), each with a valid checksum (unsigned, or signed as some old
  tars wrote it) and numeric fields that are octal (NUL- or space-ended) or GNU base-256; any
  other value in any numeric field refuses the archive (tarfile accepted ``+7``, ``0o7``, ``7_7``).
* the member name from the name field, joined to the ustar prefix as tarfile joins it (not for
  GNU's own types), replaced by a GNU long name (``L``) or a PAX ``path`` record; a PAX ``size``
  record replaces the size. PAX extended (``x``, ``X``) and global (``g``) headers, GNU long names
  and long link names are read whole, so each is refused above ``extended_limit`` bytes (from the
  size its own header declares, before a byte of it is read). PAX records must be well formed
  (``LENGTH KEY=VALUE\\n``; tarfile stopped reading at the first malformed one, or crashed on a
  non-numeric ``size``).
* a member whose type is anything but a regular file is returned as it is, for the caller to refuse;
  so is a sparse one (GNU type ``S``, or any ``GNU.sparse.*`` PAX record), marked ``sparse``.
* the archive ends at its first all-zero block, or where the body ends exactly at a header
  boundary; what follows the zero block is not read. Where tarfile silently ended the archive at
  a later header it could not read (a bad checksum, a truncated block, an extended header with
  nothing after it), this reader refuses the archive: a corrupt archive is not a shorter one.
  A body that ends inside a member's data or its padding is truncated.

Errors are :class:`TarError`; :class:`ExtendedHeaderTooLarge` for the bound above. ``members``
counts the members returned, so a caller can tell "not a tar archive at all" (an error before
the first) from a damaged one.
"""
from __future__ import annotations

import re
import struct
from typing import Callable

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
REGULAR = (b"0", b"\0")  # tarfile.REGTYPE, AREGTYPE
_PAX_LOCAL, _PAX_GLOBAL, _SOLARIS_PAX = b"x", b"g", b"X"
_LONGNAME, _LONGLINK, _GNU_SPARSE = b"L", b"K", b"S"
_EXTENDED = (_PAX_LOCAL, _PAX_GLOBAL, _SOLARIS_PAX, _LONGNAME, _LONGLINK)
_GNU_TYPES = (_LONGNAME, _LONGLINK, _GNU_SPARSE)  # whose header has no ustar prefix field
_OCTAL = re.compile(rb"[ \t\n\r\x0b\x0c]*([0-7]*)[ \t\n\r\x0b\x0c]*")
_PAX_RECORD = re.compile(rb"([0-9]+) ([^=\n]+)=")
_DECIMAL = re.compile(rb"[0-9]+")
# numeric fields other than size and checksum (mode, uid, gid, mtime; devmajor, devminor): never
# used, but a value tarfile could not read refuses the archive there, so it does here
_OTHER_NUMBERS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))


class TarError(ValueError):
    """The body is not a tar archive this reader accepts (the message says why, briefly)."""


class ExtendedHeaderTooLarge(TarError):
    def __init__(self, size: int):
        super().__init__(f"an extended tar header of {size} bytes")
        self.size = size


class Member:
    __slots__ = ("name", "size", "type", "sparse")

    def __init__(self, name: str, size: int, type_: bytes, sparse: bool):
        self.name, self.size, self.type, self.sparse = name, size, type_, sparse

    @property
    def regular(self) -> bool:
        return self.type in REGULAR and not self.sparse


def number(field: bytes) -> int:
    """A header's numeric field: octal digits ended by NUL or spaces, or GNU base-256."""
    if field[0] in (0x80, 0xFF):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0xFF else n
    m = _OCTAL.fullmatch(field.split(b"\0", 1)[0])
    if m is None:
        raise TarError("a tar header field is not a number")
    return int(m[1], 8) if m[1] else 0


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def checksum_ok(block: bytes) -> bool:
    """The header's checksum field against the sum of its bytes (the field itself as spaces), taken
    unsigned or, as some old tars did, signed."""
    want = number(block[148:156])
    unsigned = sum(block) - sum(block[148:156]) + 256
    return want == unsigned or want == sum(struct.unpack_from("148b8x356b", block)) + 256


def pax_records(data: bytes) -> dict[bytes, bytes]:
    """A PAX header's ``LENGTH KEY=VALUE\\n`` records (NUL padding ends them)."""
    out: dict[bytes, bytes] = {}
    pos, n = 0, len(data)
    while pos < n and data[pos] != 0:
        m = _PAX_RECORD.match(data, pos)
        if m is None:
            raise TarError("a malformed PAX record")
        end = pos + int(m[1])
        if end > n or end <= m.end() or data[end - 1] != 0x0A:
            raise TarError("a malformed PAX record")
        out[m[2]] = data[m.end():end - 1]
        pos = end
    return out


class TarReader:
    """Members of a tar archive whose bytes ``get()`` returns chunk by chunk (None: the end).

    ``next_member()`` returns the next member's header (None at the archive's end); its bytes are
    ``read_data()``, called before the next ``next_member()`` (which otherwise skips them)."""

    def __init__(self, get: Callable[[], bytes | None], extended_limit: int):
        self._get = get
        self.extended_limit = extended_limit
        self._buf, self._pos = b"", 0
        self.eof = False  # get() returned None
        self.members = 0
        self._unread = 0  # the current member's data not read yet...
        self._padding = 0  # ...and its padding to the next block
        self._global: dict[bytes, bytes] = {}
        self._checked_numbers = b""  # the last header's other numeric fields, found valid

    # -- the byte stream -------------------------------------------------------------------------
    def _next_chunk(self) -> bool:
        while not self.eof:
            chunk = self._get()
            if chunk is None:
                self.eof = True
            elif chunk:
                self._buf, self._pos = chunk, 0
                return True
        self._buf, self._pos = b"", 0
        return False

    def _take(self, n: int) -> bytes:
        """The next ``n`` bytes, fewer only where the body ends."""
        buf, pos = self._buf, self._pos
        end = pos + n
        if end <= len(buf):
            self._pos = end
            return buf[pos:end]
        parts = [buf[pos:]]
        need = end - len(buf)
        while need and self._next_chunk():
            buf = self._buf
            if len(buf) <= need:
                parts.append(buf)
                need -= len(buf)
                self._pos = len(buf)
            else:
                parts.append(buf[:need])
                self._pos = need
                need = 0
        return b"".join(parts)

    def _skip(self, n: int) -> bool:
        """Pass ``n`` bytes; False where the body ends first."""
        while n:
            left = len(self._buf) - self._pos
            if n <= left:
                self._pos += n
                return True
            n -= left
            if not self._next_chunk():
                return False
        return True

    def drain(self) -> None:
        """Read the body to its end (the rest is not looked at)."""
        while self._next_chunk():
            pass

    # -- members ---------------------------------------------------------------------------------
    def read_data(self) -> bytes:
        """The current member's bytes, exactly (its padding passed too)."""
        n = self._unread
        data = self._take(n)
        self._unread = 0
        if len(data) != n or not self._skip(self._padding):
            raise TarError("the body ends inside a member")
        self._padding = 0
        return data

    def next_member(self) -> Member | None:
        if self._unread or self._padding:
            if not self._skip(self._unread + self._padding):
                raise TarError("the body ends inside a member")
            self._unread = self._padding = 0
        local: dict[bytes, bytes] = {}
        longname: bytes | None = None
        extended = False  # an extended header was read: a member must follow
        while True:
            block = self._take(BLOCK)
            if len(block) != BLOCK or block == ZERO_BLOCK:
                if extended or (block and len(block) != BLOCK):
                    raise TarError("the body ends inside a header" if len(block) != BLOCK
                                   else "an extended header with no member after it")
                if self.members == 0:
                    raise TarError("no member")
                return None
            if not checksum_ok(block):
                raise TarError("a tar header with a bad checksum")
            numbers = block[100:124] + block[136:148] + block[329:345]  # _OTHER_NUMBERS' bytes
            if numbers != self._checked_numbers:
                for a, b in _OTHER_NUMBERS:
                    number(block[a:b])
                self._checked_numbers = numbers
            size = number(block[124:136])
            if size < 0:
                raise TarError("a negative member size")
            kind = block[156:157]
            if kind in _EXTENDED:
                if size > self.extended_limit:
                    raise ExtendedHeaderTooLarge(size)
                data = self._take(size)
                if len(data) != size or not self._skip(-size % BLOCK):
                    raise TarError("the body ends inside an extended header")
                extended = True
                if kind == _LONGNAME:
                    longname = longname if longname is not None else data.split(b"\0", 1)[0]
                elif kind == _PAX_GLOBAL:
                    self._global.update(pax_records(data))
                elif kind != _LONGLINK:  # a link's target: no regular member has one
                    for key, value in pax_records(data).items():
                        local.setdefault(key, value)  # the first header's record wins, as in tarfile
                continue
            return self._member(block, kind, size, longname, {**self._global, **local})

    def _member(self, block: bytes, kind: bytes, size: int, longname: bytes | None,
                pax: dict[bytes, bytes]) -> Member:
        name = _text(block[:100])
        prefix = _text(block[345:500]) if kind not in _GNU_TYPES else ""
        if prefix:
            name = f"{prefix}/{name}"
        if kind == b"\0" and name.endswith("/"):  # old tars' directories
            kind = b"5"
        if longname is not None:
            name = longname.decode("utf-8", "surrogateescape")
        sparse = kind == _GNU_SPARSE
        if pax:
            if b"path" in pax:
                name = pax[b"path"].decode("utf-8", "surrogateescape")
            if b"size" in pax:
                if not _DECIMAL.fullmatch(pax[b"size"]):
                    raise TarError("a PAX size that is not a number")
                size = int(pax[b"size"])
            sparse = sparse or any(key.startswith(b"GNU.sparse.") for key in pax)
        self.members += 1
        self._unread, self._padding = size, -size % BLOCK
        return Member(name, size, kind, sparse)
