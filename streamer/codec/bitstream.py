"""Frame packets: a versioned header, quantizer side information, and the codes (bit-packed or
range-coded).

A frame's latents (C, H, W) travel as one or more *slices*: each slice carries a band of latent
rows [row_start, row_start + row_count) for all channels and is decodable on its own, so a lost
slice costs only its rows (the receiver conceals them) and a slice can fit one SCTP chunk.

Layout (big-endian), version 4 (version 3's header, a compact one: at call rates a frame is one
or two slices of ~1,200 bytes, and version 2's 46 bytes of header and CRC per slice were ~7 % of
300 kbps; version 4 codes an inter slice's residuals in two passes per row, a narrow table and
an escape to the tail, residual.py)::

    offset size  field
     0     1     magic_version 0xA4: a frame packet of format version 4
     1     1     flags         bit 7 frame type (0 intra: codes; 1 inter: residuals against the
                               reference, range-coded; see residual.py and session.py), bit 6
                               coding (0 raw bit-packed codes, 1 range-coded, entropy.py tables),
                               bits 5-4 quantizer mode (0 fixed range, 1 per-frame per-channel
                               min/max, 2 step), bits 3-1 bits per code minus 1, bit 0
                               conditional (1: a learned P-frame, below; else 0)
     2     1     level         step mode: the quantizer level (step size index); else 0
     3     1     ref_distance  inter: the reference is frame `frame_number - ref_distance` (1..255);
                               intra: 0 (no reference)
     4     4     model_id      CRC32 of the model's config and weights (see weights.py); in a
                               conditional packet, the learned coder's id (conditional.coder_id:
                               the intra model's id and the coder's weights)
     8     4     frame_number
    12     8     timestamp_us  sender's capture time, microseconds since the epoch
    20     2x3   channels, height, width   the whole frame's latent shape
    26     2x2   row_start, row_count      this slice's latent rows
    30     ...   side information (minmax only: C float16 lo, then C hi), then the payload to the
                 CRC: raw, exactly ceil(C * row_count * width * bits / 8) bytes of packed codes;
                 range-coded, whole 32-bit words, fewer bytes than raw
    end-4  4     CRC32 of everything before it

A *conditional* packet (bit 0 set) is a whole learned P-frame (streamer/codec/conditional.py):
an inter, range-coded, step-mode packet of all the frame's rows whose payload is the learned
coder's range stream, decodable only on the receiver's integer reference of frame
`frame_number - ref_distance` (the assembler holds it), followed by 4 bytes: the CRC32 of the
integer reference the frame leaves at the sender (`conditional.reference_crc`), so a receiver
whose reference is not the sender's finds out before it shows anything. It is one data-channel
message: its parts could not be decoded apart, so slicing it would buy nothing.

Codes are packed MSB-first in (channel, row, column) order: 6-bit codes take exactly 6 bits.
The sender range-codes a slice when the model has entropy tables and that is smaller, per slice.
`unpack` is strict: anything else raises `PacketError` and nothing but `PacketError`
(`ForeignPacketError` for a packet of another model or latent shape), and its work is
bounded by the packet's bytes and the receiver's expected latent shape, not by the header's
claims (see `unpack`).
Versions 1 and 2 (their packets begin with b"NVCF" and the version byte) and version 3 (0xA3)
are refused with a message naming the version.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import PacketError
from .entropy import MAX_DECODE_CODES, EntropyCoder
from .presets import STRIDE
from .quantizer import Quantized
from .residual import ResidualCoder

VERSION = 4
MAGIC_VERSION = 0xA0 | VERSION  # the first byte of every version-4 packet
LEGACY_MAGIC = b"NVCF"  # versions 1 and 2: magic, then the version byte
CODING_RAW = 0
CODING_RANGE = 1
CODINGS = {CODING_RAW: "raw", CODING_RANGE: "range"}
FRAME_INTRA = 0
FRAME_INTER = 1  # a slice of residuals: decodes only on top of the previous frame
FRAME_TYPES = (FRAME_INTRA, FRAME_INTER)
QUANT_MODES = {"fixed": 0, "minmax": 1, "step": 2}
QUANT_NAMES = {v: k for k, v in QUANT_MODES.items()}

_HEADER = struct.Struct(">BBBBIIQHHHHH")
HEADER_BYTES = _HEADER.size  # 30
# the header's fields by name, as `header_bytes` and `header_fields` take and give them
HEADER_FIELDS = ("magic_version", "frame_type", "coding", "quant_mode", "bits", "conditional", "level",
                 "ref_distance", "model_id", "frame_number", "timestamp_us", "channels", "height", "width",
                 "row_start", "row_count")
CRC_BYTES = 4
OVERHEAD_BYTES = HEADER_BYTES + CRC_BYTES
MAX_PACKET_BYTES = 262_144  # aiortc's largest data-channel message
SCTP_CHUNK_BYTES = 1_160  # aiortc splits messages into chunks of this size
MAX_LATENT_SIDE = 1024
MAX_CHANNELS = 1024


class ForeignPacketError(PacketError):
    """A well-formed packet that is not for this decoder: another model, quantizer or latent
    shape (a receiver counts these apart from malformed ones). Decided from the header, before
    the CRC and the payload are read."""


@dataclass(frozen=True)
class PacketHeader:
    model_id: int
    frame_number: int
    timestamp_us: int
    channels: int
    height: int
    width: int
    row_start: int
    row_count: int
    bits: int
    quant_mode: str
    level: int = 0
    coding: int = CODING_RAW
    frame_type: int = FRAME_INTRA
    ref_distance: int = 0  # inter: the reference is frame_number - ref_distance; intra: 0
    version: int = VERSION
    conditional: bool = False  # a learned P-frame: the payload is the conditional coder's

    @property
    def is_whole_frame(self) -> bool:
        return self.row_start == 0 and self.row_count == self.height

    @property
    def ref_frame_number(self) -> int | None:
        """The frame this slice's residuals apply to (None: an intra slice)."""
        return self.frame_number - self.ref_distance if self.frame_type == FRAME_INTER else None


def header_bytes(fields: dict[str, int]) -> bytes:
    """The 30 header bytes of `fields` (`HEADER_FIELDS` by name; missing ones are 0), unchecked
    beyond each field's width: how `pack` writes a header, and how tests and the fuzzer forge
    any header they like."""
    f = {name: 0 for name in HEADER_FIELDS} | fields
    flags = ((f["frame_type"] & 1) << 7 | (f["coding"] & 1) << 6 | (f["quant_mode"] & 3) << 4
             | ((f["bits"] - 1) & 7) << 1 | (f["conditional"] & 1))
    return _HEADER.pack(f["magic_version"] & 0xFF, flags, f["level"] & 0xFF, f["ref_distance"] & 0xFF,
                        f["model_id"] & 0xFFFFFFFF, f["frame_number"] & 0xFFFFFFFF,
                        f["timestamp_us"] & 0xFFFFFFFFFFFFFFFF, *(f[k] & 0xFFFF for k in
                        ("channels", "height", "width", "row_start", "row_count")))


def rewrite_header(packet: bytes, **fields: int) -> bytes:
    """`packet` with some header fields changed (by name) and its CRC made valid again: what a
    forger, a test or the fuzzer does to a real packet."""
    body = header_bytes(header_fields(packet) | fields) + bytes(packet[HEADER_BYTES:-CRC_BYTES])
    return body + struct.pack(">I", zlib.crc32(body))


def header_fields(data: bytes) -> dict[str, int]:
    """The raw fields of a packet's first 30 bytes (`HEADER_FIELDS`), unchecked."""
    (magic_version, flags, level, ref_distance, model_id, frame_number, ts, channels, height, width,
     row_start, row_count) = _HEADER.unpack_from(data)
    return {"magic_version": magic_version, "frame_type": flags >> 7, "coding": flags >> 6 & 1,
            "quant_mode": flags >> 4 & 3, "bits": (flags >> 1 & 7) + 1, "conditional": flags & 1, "level": level,
            "ref_distance": ref_distance, "model_id": model_id, "frame_number": frame_number, "timestamp_us": ts,
            "channels": channels, "height": height, "width": width, "row_start": row_start, "row_count": row_count}


@dataclass
class Packet:
    header: PacketHeader
    codes: np.ndarray | None  # (channels, row_count, width) uint8; None in an inter slice
    lo: np.ndarray | None  # (channels,) float32; None in fixed mode (the model holds the range)
    hi: np.ndarray | None
    residual: np.ndarray | None = None  # inter slice: (channels, row_count, width) int16 residuals
    conditional: bytes | None = None  # a learned P-frame's range stream (decoded by the assembler)
    conditional_crc: int = 0  # ... and the CRC of the reference it leaves at the sender


# -- bit packing ---------------------------------------------------------------------------

def _group(bits: int) -> tuple[int, int, type]:
    """The smallest run of codes that fills whole bytes: (codes, bytes, word dtype).
    6 bits: 4 codes in 3 bytes; 3, 5 or 7 bits: 8 codes in 3, 5 or 7 bytes."""
    codes = 8 // math.gcd(bits, 8)
    nbytes = codes * bits // 8
    return codes, nbytes, (np.uint64 if nbytes > 4 else np.uint32)


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack uint8 codes (< 2**bits) into bytes, `bits` bits each, MSB first.

    Codes are taken a whole-byte group at a time (see `_group`): each group is OR-ed into one
    machine word with vectorized shifts, and the word's bytes are written out big-endian."""
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    n = flat.size
    g, nb, dt = _group(bits)
    groups = -(-n // g)
    if groups * g != n:
        flat = np.concatenate([flat, np.zeros(groups * g - n, np.uint8)])
    cols = flat.reshape(groups, g)
    word = np.zeros(groups, dt)
    for i in range(g):
        word |= cols[:, i].astype(dt) << dt(bits * (g - 1 - i))
    out = np.empty((groups, nb), np.uint8)
    for j in range(nb):
        out[:, j] = word >> dt(8 * (nb - 1 - j))  # the cast keeps the low byte
    return out.tobytes()[: packed_size(n, bits)]


def unpack_bits(data: bytes, count: int, bits: int) -> np.ndarray:
    """The inverse of `pack_bits`: `count` codes of `bits` bits from `data`."""
    if len(data) != packed_size(count, bits):
        raise PacketError(f"payload holds {len(data)} bytes, {packed_size(count, bits)} expected")
    g, nb, dt = _group(bits)
    groups = -(-count // g)
    raw = np.zeros(groups * nb, np.uint8)
    raw[: len(data)] = np.frombuffer(data, np.uint8)
    rows = raw.reshape(groups, nb)
    word = np.zeros(groups, dt)
    for j in range(nb):
        word |= rows[:, j].astype(dt) << dt(8 * (nb - 1 - j))
    out = np.empty((groups, g), np.uint8)
    mask = dt((1 << bits) - 1)
    for i in range(g):
        out[:, i] = (word >> dt(bits * (g - 1 - i))) & mask
    return out.reshape(-1)[:count]


# -- packets -------------------------------------------------------------------------------

def side_bytes(quant_mode: str, channels: int) -> int:
    return 4 * channels if quant_mode == "minmax" else 0


def pack(header: PacketHeader, codes: np.ndarray, lo: np.ndarray | None = None,
         hi: np.ndarray | None = None, coder: EntropyCoder | None = None, check_size: bool = True,
         residual_coder: ResidualCoder | None = None) -> bytes:
    """One packet for one slice. `codes` is (channels, row_count, width) uint8; a range-coded
    header (coding 1) needs the model's `coder`; an inter header (frame type 1) takes int16
    residuals as `codes` and needs the model's `residual_coder`."""
    h = header
    if codes.shape != (h.channels, h.row_count, h.width):
        raise ValueError(f"codes shape {codes.shape} does not match header {(h.channels, h.row_count, h.width)}")
    side = b""
    if h.quant_mode == "minmax":
        if lo is None or hi is None:
            raise ValueError("minmax packets need the lo/hi side information")
        side = np.asarray(lo, np.float32).astype(">f2").tobytes() + np.asarray(hi, np.float32).astype(">f2").tobytes()
    if h.frame_type == FRAME_INTER:
        if residual_coder is None:
            raise ValueError("an inter packet needs the model's residual coder")
        payload = residual_coder.encode(codes, h.level)
    elif h.coding == CODING_RANGE:
        if coder is None:
            raise ValueError("a range-coded packet needs the model's entropy coder")
        payload = coder.encode(codes, h.level)
    else:
        payload = pack_bits(codes, h.bits)
    if not 1 <= h.bits <= 8 or (h.frame_type == FRAME_INTER) != (1 <= h.ref_distance <= 255):
        raise ValueError(f"header of {h.bits} bits per code, frame type {h.frame_type}, "
                         f"reference distance {h.ref_distance}: not a packet")
    head = header_bytes({"magic_version": MAGIC_VERSION, "frame_type": h.frame_type, "coding": h.coding,
                         "quant_mode": QUANT_MODES[h.quant_mode], "bits": h.bits, "level": h.level,
                         "ref_distance": h.ref_distance, "model_id": h.model_id, "frame_number": h.frame_number,
                         "timestamp_us": h.timestamp_us, "channels": h.channels, "height": h.height,
                         "width": h.width, "row_start": h.row_start, "row_count": h.row_count})
    body = head + side + payload
    packet = body + struct.pack(">I", zlib.crc32(body))
    if check_size and len(packet) > MAX_PACKET_BYTES:
        raise ValueError(f"packet of {len(packet)} bytes exceeds {MAX_PACKET_BYTES}; use more slices")
    return packet


def rows_per_slice(q_shape: tuple[int, int, int], bits: int, quant_mode: str,
                   max_packet_bytes: int | None) -> int:
    """The most latent rows whose packet fits `max_packet_bytes` (at least one row)."""
    channels, height, width = q_shape
    if max_packet_bytes is None:
        return height
    room = max_packet_bytes - OVERHEAD_BYTES - side_bytes(quant_mode, channels)
    per_row_bits = channels * width * bits
    return max(1, min(height, room * 8 // per_row_bits))


def pack_frame(q: Quantized, model_id: int, frame_number: int, timestamp_us: int,
               max_packet_bytes: int | None = None, coder: EntropyCoder | None = None,
               rows: tuple[int, int] | None = None) -> list[bytes]:
    """A quantized frame as packets: one, or slices that each fit `max_packet_bytes`; `rows`
    (start, stop): only that band of latent rows (the intra band of a refreshing P-frame).

    With a `coder`, slices are range-coded and sized by their estimated coded size (so a slice
    holds more rows than raw codes would); a slice whose range-coded payload is not smaller than
    its raw codes, or overshoots the limit, is sent as raw slices instead. A range-coded slice
    holds at most `entropy.MAX_DECODE_CODES` codes (only frames over ~740x740 pixels need more)."""
    channels, height, width = q.codes.shape

    def header(start: int, count: int, coding: int = CODING_RAW) -> PacketHeader:
        return PacketHeader(model_id=model_id, frame_number=frame_number & 0xFFFFFFFF,
                            timestamp_us=timestamp_us, channels=channels, height=height, width=width,
                            row_start=start, row_count=count, bits=q.bits, quant_mode=q.mode,
                            level=q.level, coding=coding)

    def raw_slices(start: int, stop: int) -> list[bytes]:
        rows = rows_per_slice(q.codes.shape, q.bits, q.mode, max_packet_bytes)
        return [pack(header(s, min(rows, stop - s)), q.codes[:, s:s + min(rows, stop - s)], q.lo, q.hi)
                for s in range(start, stop, rows)]

    first, stop = (0, height) if rows is None else rows
    if not 0 <= first < stop <= height:
        raise ValueError(f"rows {rows} outside a frame of {height} latent rows")
    if coder is None:
        return raw_slices(first, stop)
    limit = MAX_PACKET_BYTES if max_packet_bytes is None else max_packet_bytes
    room = limit - OVERHEAD_BYTES - side_bytes(q.mode, channels)
    row_bytes = coder.estimate_bits(q.codes, q.level) / 8 if max_packet_bytes is not None else None
    packets: list[bytes] = []
    start = first
    while start < stop:
        count = min(stop - start, max(1, MAX_DECODE_CODES // (channels * width)))  # what a receiver decodes
        if row_bytes is not None:  # as many rows as the estimate fits, with 2 % + a word to spare
            fits = np.cumsum(row_bytes[start:stop]) * 1.02 + 8 <= room
            count = max(1, min(count, int(fits.sum())))
        codes = q.codes[:, start:start + count]
        ranged = pack(header(start, count, CODING_RANGE), codes, q.lo, q.hi, coder, check_size=False)
        smaller = len(ranged) - OVERHEAD_BYTES - side_bytes(q.mode, channels) < packed_size(codes.size, q.bits)
        if smaller and len(ranged) <= limit:
            packets.append(ranged)
        else:
            packets += raw_slices(start, start + count)
        start += count
    return packets


def pack_inter_frame(q: Quantized, residual: np.ndarray, model_id: int, frame_number: int, timestamp_us: int,
                     max_packet_bytes: int | None, residual_coder: ResidualCoder,
                     ref_frame_number: int | None = None, coder: EntropyCoder | None = None,
                     intra_rows: tuple[int, int] | None = None) -> list[bytes]:
    """A P-frame as packets: `residual` (C, H, W) int16 = q.codes - the prediction from the
    reference, frame `ref_frame_number` (default: the frame before this one), which each inter
    slice names so the receiver applies it only to that frame. Slices of residuals sized by
    their estimated coded size; a band whose residuals would not code smaller than its raw codes
    (a scene cut, a face turning) is sent as intra slices of its raw codes instead, which decode
    without the reference. `intra_rows` (start, stop): a band sent as intra slices whatever it
    costs, range-coded with `coder` (intra refresh: the receiver's reference heals there)."""
    channels, height, width = q.codes.shape
    distance = 1 if ref_frame_number is None else frame_number - ref_frame_number
    if not 1 <= distance <= 255:
        raise ValueError(f"frame {frame_number} cannot name reference {ref_frame_number}: 1..255 frames back")

    def header(start: int, count: int, coding: int, frame_type: int) -> PacketHeader:
        return PacketHeader(model_id=model_id, frame_number=frame_number & 0xFFFFFFFF,
                            timestamp_us=timestamp_us, channels=channels, height=height, width=width,
                            row_start=start, row_count=count, bits=q.bits, quant_mode=q.mode,
                            level=q.level, coding=coding, frame_type=frame_type,
                            ref_distance=distance if frame_type == FRAME_INTER else 0)

    limit = MAX_PACKET_BYTES if max_packet_bytes is None else max_packet_bytes
    room = limit - OVERHEAD_BYTES
    row_bytes = residual_coder.estimate_bits(residual, q.level) / 8
    packets: list[bytes] = []
    a, b = intra_rows if intra_rows is not None else (height, height)
    start = 0
    while start < height:
        if start == a:  # the refresh band
            packets += pack_frame(q, model_id, frame_number, timestamp_us, max_packet_bytes, coder, rows=(a, b))
            start = b
            continue
        stop = a if start < a else height
        count = min(stop - start, max(1, MAX_DECODE_CODES // (channels * width)))
        fits = np.cumsum(row_bytes[start:start + count]) * 1.02 + 8 <= room
        count = max(1, int(fits.sum()))
        band = slice(start, start + count)
        inter = pack(header(start, count, CODING_RANGE, FRAME_INTER), residual[:, band], check_size=False,
                     residual_coder=residual_coder)
        if len(inter) - OVERHEAD_BYTES < packed_size(channels * count * width, q.bits) and len(inter) <= limit:
            packets.append(inter)
        else:  # intra for this band: its raw codes
            rows = rows_per_slice(q.codes.shape, q.bits, q.mode, max_packet_bytes)
            for s in range(start, start + count, rows):
                n = min(rows, start + count - s)
                packets.append(pack(header(s, n, CODING_RAW, FRAME_INTRA), q.codes[:, s:s + n]))
        start += count
    return packets


def pack_conditional(payload: bytes, coder_id: int, frame_number: int, timestamp_us: int,
                     shape: tuple[int, int, int], bits: int, level: int, ref_frame_number: int,
                     reference_crc: int) -> bytes:
    """A learned P-frame (its range stream `payload`, conditional.encode_frame) as one packet:
    the learned coder's id (`conditional.coder_id`, in the model_id field), the frame's latent
    `shape` (C, H, W), its level, the reference it was coded against, and the CRC of the
    reference it leaves."""
    channels, height, width = shape
    distance = frame_number - ref_frame_number
    if not 1 <= distance <= 255:
        raise ValueError(f"frame {frame_number} cannot name reference {ref_frame_number}: 1..255 frames back")
    payload = bytes(payload) + struct.pack(">I", reference_crc & 0xFFFFFFFF)
    if len(payload) % 4 or len(payload) >= packed_size(channels * height * width, bits):
        raise ValueError(f"a learned payload is whole words, smaller than raw codes; got {len(payload)} bytes")
    head = header_bytes({"magic_version": MAGIC_VERSION, "frame_type": FRAME_INTER, "coding": CODING_RANGE,
                         "quant_mode": QUANT_MODES["step"], "bits": bits, "conditional": 1, "level": level,
                         "ref_distance": distance, "model_id": coder_id, "frame_number": frame_number & 0xFFFFFFFF,
                         "timestamp_us": timestamp_us, "channels": channels, "height": height, "width": width,
                         "row_start": 0, "row_count": height})
    body = head + payload
    packet = body + struct.pack(">I", zlib.crc32(body))
    if len(packet) > MAX_PACKET_BYTES:
        raise ValueError(f"packet of {len(packet)} bytes exceeds {MAX_PACKET_BYTES}")
    return packet


def unpack(data: bytes, expect_model_id: int | None = None, coder: EntropyCoder | None = None,
           residual_coder: "ResidualCoder | None" = None,
           expect_shape: tuple[int, int, int] | None = None,
           check_header: Callable[[PacketHeader], None] | None = None,
           expect_learned_id: int | None = None) -> Packet:
    """Parse one packet strictly. Every malformed input raises `PacketError` with the reason.
    Range-coded packets need the model's `coder` (`NeuralCodec.unpack` passes it).

    Work and memory are bounded by the packet's own bytes, never by what its header claims:
    the framing (fields, ranges, lengths) is checked first; then, from the header alone,
    `expect_model_id` (of a conditional packet: `expect_learned_id`, the receiver's learned
    coder; with an `expect_model_id` and no learned coder, every conditional packet is foreign),
    `expect_shape` (the whole frame's latent (C, H, W) the receiver's call makes) and
    `check_header` (more expectations: it raises `ForeignPacketError` for a packet that is not
    for this decoder); then the CRC; only a packet that passes them all is decoded. A range-coded payload must be long enough for
    the codes it claims (`EntropyCoder.max_codes`), so not even a valid-CRC header with an
    absurd shape reaches the range decoder."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PacketError(f"a packet is bytes, got {type(data).__name__}")
    if len(data) > MAX_PACKET_BYTES:  # (before copying it)
        raise PacketError(f"packet of {len(data)} bytes is over the {MAX_PACKET_BYTES}-byte limit")
    data = bytes(data)
    if len(data) < OVERHEAD_BYTES:
        raise PacketError(f"truncated packet: {len(data)} bytes, a header alone is {OVERHEAD_BYTES}")
    f = header_fields(data)
    if f["magic_version"] != MAGIC_VERSION:
        if data[:4] == LEGACY_MAGIC:
            raise PacketError(f"packet format version {data[4]}; this decoder reads version {VERSION}")
        if f["magic_version"] & 0xF0 == MAGIC_VERSION & 0xF0:
            raise PacketError(f"packet format version {f['magic_version'] & 0x0F}; this decoder reads version {VERSION}")
        raise PacketError(f"not a frame packet (first byte 0x{f['magic_version']:02x}, expected 0x{MAGIC_VERSION:02x})")
    coding, frame_type, bits, qmode, level = f["coding"], f["frame_type"], f["bits"], f["quant_mode"], f["level"]
    channels, height, width, row_start, row_count = (f[k] for k in ("channels", "height", "width", "row_start", "row_count"))
    conditional = bool(f["conditional"])
    if conditional and (frame_type != FRAME_INTER or f["row_start"] != 0 or f["row_count"] != f["height"]):
        raise PacketError("a conditional packet is a whole inter frame (all its rows)")
    if frame_type == FRAME_INTER and (coding != CODING_RANGE or QUANT_NAMES.get(qmode) != "step"):
        raise PacketError("an inter slice is range-coded residuals of a step quantizer")
    if (frame_type == FRAME_INTER) != (f["ref_distance"] > 0):
        raise PacketError(f"reference distance {f['ref_distance']} in an {'inter' if frame_type else 'intra'} "
                          f"slice (inter slices name their reference 1..255 frames back; intra slices none)")
    if frame_type == FRAME_INTER and f["ref_distance"] > f["frame_number"]:
        raise PacketError(f"frame {f['frame_number']} names a reference {f['ref_distance']} frames back, before frame 0")
    if qmode not in QUANT_NAMES:
        raise PacketError(f"unknown quantizer mode {qmode}")
    if level != 0 and QUANT_NAMES.get(qmode) != "step":
        raise PacketError(f"quantizer level {level} in a {QUANT_NAMES.get(qmode)} packet (only step mode has levels)")
    if not (1 <= channels <= MAX_CHANNELS and 1 <= height <= MAX_LATENT_SIDE and 1 <= width <= MAX_LATENT_SIDE):
        raise PacketError(f"latent shape {channels}x{height}x{width} out of range")
    if row_count < 1 or row_start + row_count > height:
        raise PacketError(f"slice rows {row_start}+{row_count} outside a frame of {height} rows")
    mode = QUANT_NAMES[qmode]
    side_len = side_bytes(mode, channels)
    payload_len = len(data) - OVERHEAD_BYTES - side_len
    if payload_len < 0:
        raise PacketError(f"truncated packet: {len(data)} bytes, the header and side information need "
                          f"{OVERHEAD_BYTES + side_len}")
    count = channels * row_count * width
    if coding == CODING_RAW and payload_len != packed_size(count, bits):
        kind = "truncated" if payload_len < packed_size(count, bits) else "oversized"
        raise PacketError(f"{kind} packet: a payload of {payload_len} bytes for {count} codes of {bits} bits "
                          f"({packed_size(count, bits)} bytes)")
    if coding == CODING_RANGE and (payload_len % 4 or payload_len >= packed_size(count, bits)):
        raise PacketError(f"range-coded payload of {payload_len} bytes: not whole words smaller than "
                          f"the {packed_size(count, bits)} bytes of raw codes")
    # is it for this decoder? (from the header alone: nothing of the payload is read before this)
    model_id = f["model_id"]
    if conditional and expect_model_id is not None:
        if expect_learned_id is None:
            raise ForeignPacketError("a learned P-frame, but this receiver has no learned coder for its model "
                                     "(streamer/weights/conditional/)")
        if model_id != expect_learned_id:
            raise ForeignPacketError(f"a learned P-frame of learned coder {model_id:08x}; this receiver's learned "
                                     f"coder is {expect_learned_id:08x} (another release's streamer/weights/conditional/)")
    elif expect_model_id is not None and model_id != expect_model_id:
        raise ForeignPacketError(f"packet from model {model_id:08x}, this decoder runs model {expect_model_id:08x}")
    if expect_shape is not None and (channels, height, width) != tuple(expect_shape):
        c, h, w = expect_shape
        raise ForeignPacketError(f"latent shape {channels}x{height}x{width} (a {width * STRIDE}x{height * STRIDE} "
                                 f"frame); this call expects {c}x{h}x{w} ({w * STRIDE}x{h * STRIDE})")
    header = PacketHeader(model_id=model_id, frame_number=f["frame_number"], timestamp_us=f["timestamp_us"],
                          channels=channels, height=height, width=width, row_start=row_start, row_count=row_count,
                          bits=bits, quant_mode=mode, level=level, coding=coding, frame_type=frame_type,
                          ref_distance=f["ref_distance"], conditional=conditional)
    if check_header is not None:
        check_header(header)
    (crc,) = struct.unpack_from(">I", data, len(data) - CRC_BYTES)
    if crc != zlib.crc32(memoryview(data)[: len(data) - CRC_BYTES]):
        raise PacketError("checksum mismatch: the packet is corrupt")
    lo = hi = None
    if mode == "minmax":
        side = np.frombuffer(data, dtype=">f2", count=2 * channels, offset=HEADER_BYTES).astype(np.float32)
        lo, hi = side[:channels], side[channels:]
        if not (np.isfinite(side).all() and (hi >= lo).all()):
            raise PacketError("side information holds a non-finite or inverted range")
    payload = data[HEADER_BYTES + side_len: HEADER_BYTES + side_len + payload_len]
    if conditional:  # decoded by the assembler, on its reference (bounded: one frame's work)
        if payload_len < 4:
            raise PacketError("a conditional packet ends with its reference's CRC: 4 bytes at least")
        (ref_crc,) = struct.unpack_from(">I", payload, payload_len - 4)
        return Packet(header, None, lo, hi, conditional=payload[:-4], conditional_crc=ref_crc)
    if frame_type == FRAME_INTER:
        if residual_coder is None:
            raise PacketError("inter slice, but no residual tables to decode it with (the model's weights have none)")
        residual = residual_coder.decode(payload, (channels, row_count, width), level)  # bounded: max_codes
        return Packet(header, None, lo, hi, residual)
    if coding == CODING_RANGE:
        if coder is None:
            raise PacketError("range-coded packet, but no entropy tables to decode it with "
                              "(the model's weights have none)")
        codes = coder.decode(payload, (channels, row_count, width), level)  # bounded: max_codes
    else:
        codes = unpack_bits(payload, count, bits).reshape(channels, row_count, width)
        if bits < 8 and (count * bits) % 8 and (payload[-1] & ((1 << (8 - (count * bits) % 8)) - 1)):
            raise PacketError("non-zero padding bits after the last code")
    return Packet(header, codes, lo, hi)


def compression_ratio(packet_bytes: int, height_px: int, width_px: int) -> float:
    """The seed's definition: 24 bits per pixel of the RGB input over the packet's bits per pixel."""
    return 24.0 / bits_per_pixel(packet_bytes, height_px, width_px)


def bits_per_pixel(packet_bytes: int, height_px: int, width_px: int) -> float:
    return packet_bytes * 8 / (height_px * width_px)


def payload_compression_ratio(channels: int, bits: int) -> float:
    """Codes alone (no header): 24 bits per pixel over C*bits per 8x8 block. 24 ch x 6 bit: 10.67."""
    return 24.0 * 64 / (channels * bits)
