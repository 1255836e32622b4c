"""Encoding SR content items as DICOM bytes (explicit VR little endian, the SR's transfer syntax).

pydicom's writer spends about 20 us per data element (buffers, ambiguous-VR checks and sorting
at every nesting level); a TID 1500 report has hundreds of elements in nested sequences. These
helpers write the same bytes directly: an element is its tag, VR, length and value; sequences
and items get explicit lengths (PS3.5 7.5 allows explicit or undefined lengths alike). Strings
are encoded with the dataset's character set through pydicom's own ``encode_string``;
anything this module does not encode itself goes through pydicom's ``write_data_element``.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

from pydicom.charset import encode_string
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue

_LONG_LENGTH = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_CHARSET_VR = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})  # text in the Specific Character Set
_STRING_VR = frozenset({"AE", "CS", "UI"}) | _CHARSET_VR - {"PN"}
_NUMBER_STRING_VR = frozenset({"DS", "IS"})
_BINARY = {"FD": "d", "FL": "f", "SL": "l", "SS": "h", "UL": "L", "US": "H"}
_ITEM = b"\xfe\xff\x00\xe0"

Encodings = tuple[str, ...]
"""Python codecs for the dataset's Specific Character Set (``pydicom.charset.convert_encodings``)."""

# tags of the content item attributes
REFERENCED_SOP_SEQUENCE = 0x00081199
RELATIONSHIP_TYPE = 0x0040A010
VALUE_TYPE = 0x0040A040
CONCEPT_NAME = 0x0040A043
CONTINUITY = 0x0040A050
UID = 0x0040A124
TEXT_VALUE = 0x0040A160
CONCEPT_CODE = 0x0040A168
MEASURED_VALUE_SEQUENCE = 0x0040A300
TEMPLATE_SEQUENCE = 0x0040A504
CONTENT_SEQUENCE = 0x0040A730


def element(tag: int, vr: str, value: bytes) -> bytes:
    """One data element: tag, VR, length (2 or 4 bytes by VR) and the (even-length) value."""
    if vr in _LONG_LENGTH:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)) + value
    if len(value) > 0xFFFF:
        raise ValueError(f"value of ({tag >> 16:04X},{tag & 0xFFFF:04X}) too long for VR {vr}: {len(value)} bytes")
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def _text_bytes(value: str, vr: str, encodings: Encodings) -> bytes:
    if value.isascii():
        out = value.encode("ascii")
    elif vr in _CHARSET_VR:
        out = encode_string(value, list(encodings))
    else:
        out = value.encode("latin-1")
    if len(out) % 2:
        out += b"\0" if vr == "UI" else b" "
    return out


def text(tag: int, vr: str, value: str, encodings: Encodings) -> bytes:
    """A string element (CS, UI, SH, LO, UT, ...), padded to even length as PS3.5 requires."""
    return element(tag, vr, _text_bytes(value, vr, encodings))


@lru_cache(maxsize=256)
def cs(tag: int, value: str) -> bytes:
    """A constant CS element (relationship type, value type, continuity)."""
    return text(tag, "CS", value, ())


def item(elements: Iterable[tuple[int, bytes]]) -> bytes:
    """A sequence item of ``(tag, encoded element)`` pairs, written in ascending tag order."""
    body = b"".join(e for _, e in sorted(elements, key=lambda te: te[0]))
    return _ITEM + struct.pack("<I", len(body)) + body


def sequence(tag: int, items: Sequence[bytes]) -> bytes:
    """An SQ element holding already encoded items."""
    return element(tag, "SQ", b"".join(items))


def raw_sequence(tag: int, items: Sequence[bytes]) -> RawDataElement:
    """An SQ element of encoded items as a pydicom raw element: written as is by ``dcmwrite`` to an
    explicit VR little endian file, parsed by pydicom when it is first read from the dataset."""
    value = b"".join(items)
    return RawDataElement(tag, "SQ", len(value), value, 0, False, True, True, False)


def dataset_item(ds: Any, encodings: Encodings) -> bytes:
    """A pydicom Dataset (e.g. a highdicom content item) as one sequence item."""
    return item((int(elem.tag), data_element(elem, encodings)) for elem in ds)


def data_element(elem: Any, encodings: Encodings) -> bytes:
    """A pydicom DataElement, encoded here for the VRs SR content uses, else by pydicom."""
    vr, value, tag = elem.VR, elem.value, int(elem.tag)
    if vr == "SQ":
        return sequence(tag, [dataset_item(ds, encodings) for ds in value])
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    if value is None or value == "" or not values:
        return element(tag, vr, b"")
    if vr in _STRING_VR and all(isinstance(v, str) for v in values):
        return element(tag, vr, _text_bytes("\\".join(values), vr, encodings))
    if vr in _NUMBER_STRING_VR:
        joined = "\\".join(getattr(v, "original_string", None) or str(v) for v in values)
        return element(tag, vr, _text_bytes(joined, vr, encodings))
    if vr in _BINARY and all(isinstance(v, (int, float)) for v in values):
        return element(tag, vr, struct.pack(f"<{len(values)}{_BINARY[vr]}", *values))
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem, list(encodings))
    return fp.getvalue()
