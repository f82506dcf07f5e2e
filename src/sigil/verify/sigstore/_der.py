"""A minimal, strict DER reader (X.690) for the few ASN.1 structures sigil parses itself.

``cryptography`` parses certificates and SCTs, but has no API for CMS ``SignedData``
verification or RFC 3161 ``TSTInfo``; those are read here. Only definite lengths and
low tag numbers are accepted (DER); anything else raises :class:`DERError`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

# Universal tags (first identifier octet, including the constructed bit where DER mandates it).
BOOLEAN = 0x01
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
NULL = 0x05
OID = 0x06
UTF8_STRING = 0x0C
PRINTABLE_STRING = 0x13
IA5_STRING = 0x16
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18
SEQUENCE = 0x30
SET = 0x31


class DERError(ValueError):
    """The bytes are not the DER structure expected."""


@dataclass(frozen=True, slots=True)
class TLV:
    """One decoded element: identifier octet, content octets and the complete encoding."""

    tag: int
    content: bytes
    raw: bytes

    @property
    def constructed(self) -> bool:
        """True for constructed encodings (SEQUENCE, SET, explicit tags)."""
        return bool(self.tag & 0x20)

    def children(self) -> list[TLV]:
        """The elements inside a constructed encoding."""
        if not self.constructed:
            raise DERError(f"tag 0x{self.tag:02x} is not constructed")
        return parse_all(self.content)

    def expect(self, tag: int) -> TLV:
        """Return self if the tag is ``tag``, else raise."""
        if self.tag != tag:
            raise DERError(f"expected tag 0x{tag:02x}, got 0x{self.tag:02x}")
        return self


def _read(data: bytes, pos: int) -> tuple[TLV, int]:
    if pos + 2 > len(data):
        raise DERError("truncated element")
    start = pos
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise DERError("high tag numbers are not supported")
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4:
            raise DERError("indefinite or oversized length")
        if pos + n > len(data):
            raise DERError("truncated length")
        length = int.from_bytes(data[pos:pos + n], "big")
        if length < 0x80 or data[pos] == 0:
            raise DERError("non-minimal length encoding")
        pos += n
    end = pos + length
    if end > len(data):
        raise DERError("truncated content")
    return TLV(tag, bytes(data[pos:end]), bytes(data[start:end])), end


def parse(data: bytes) -> TLV:
    """Decode exactly one element that spans all of ``data``."""
    tlv, end = _read(data, 0)
    if end != len(data):
        raise DERError("trailing bytes after element")
    return tlv


def parse_all(data: bytes) -> list[TLV]:
    """Decode a concatenation of elements (the content of a SEQUENCE or SET)."""
    out: list[TLV] = []
    pos = 0
    while pos < len(data):
        tlv, pos = _read(data, pos)
        out.append(tlv)
    return out


def decode_oid(tlv: TLV) -> str:
    """Dotted string of an OBJECT IDENTIFIER."""
    tlv.expect(OID)
    content = tlv.content
    if not content or content[-1] & 0x80:
        raise DERError("malformed OID")
    arcs: list[int] = []
    value = 0
    for i, byte in enumerate(content):
        if value == 0 and byte == 0x80 and (i == 0 or not content[i - 1] & 0x80):
            raise DERError("non-minimal OID arc")
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def decode_int(tlv: TLV) -> int:
    """Value of an INTEGER."""
    tlv.expect(INTEGER)
    if not tlv.content:
        raise DERError("empty INTEGER")
    return int.from_bytes(tlv.content, "big", signed=True)


def decode_generalized_time(tlv: TLV) -> dt.datetime:
    """A GeneralizedTime in UTC (``YYYYMMDDHHMMSS[.f*]Z``), as an aware datetime."""
    tlv.expect(GENERALIZED_TIME)
    try:
        text = tlv.content.decode("ascii")
    except UnicodeDecodeError as exc:
        raise DERError("non-ASCII time") from exc
    if not text.endswith("Z") or len(text) < 15 or not text[:14].isdigit():
        raise DERError(f"unsupported GeneralizedTime {text!r}")
    frac = text[14:-1]
    micro = 0
    if frac:
        # DER: a fraction has a dot, at least one digit and no trailing zero.
        if not frac.startswith(".") or len(frac) < 2 or not frac[1:].isdigit() or frac[-1] == "0":
            raise DERError(f"malformed GeneralizedTime fraction {text!r}")
        micro = int(frac[1:7].ljust(6, "0"))
    try:
        return dt.datetime(int(text[0:4]), int(text[4:6]), int(text[6:8]), int(text[8:10]),
                           int(text[10:12]), int(text[12:14]), micro, tzinfo=dt.UTC)
    except ValueError as exc:
        raise DERError(f"invalid GeneralizedTime {text!r}") from exc


def decode_string(tlv: TLV) -> str:
    """Value of a UTF8String, PrintableString or IA5String."""
    if tlv.tag not in (UTF8_STRING, PRINTABLE_STRING, IA5_STRING):
        raise DERError(f"tag 0x{tlv.tag:02x} is not a string")
    try:
        return tlv.content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DERError("invalid UTF-8") from exc
