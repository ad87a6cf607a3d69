"""`python -m streamer.bench fuzz`: hostile packets into the parser and the frame assembler.

Feeds --inputs messages, as a peer could send them on the latent data channel, to the receiver's
two stages, with the shipped model (its shape for its own frame size is the call's shape):

* parser: `codec.unpack(data, expect_shape=..., learned_id=...)`, what `FrameAssembler.add` runs per packet;
  anything but a `PacketError` out of it is a crash;
* assembler: one `FrameAssembler` for the whole run (its state carries over, as in a call
  under attack): `add(data)`, and `poll()` every 10th input on a clock that moves 1 ms per
  input; any exception out of either, or out of building an emitted frame's latents, is a crash;
* every 10th input also goes through the bare parser, `bitstream.unpack(data, coder=...)` with
  no expected model or shape (crashes only; its work is bounded by the payload, see entropy.py).

Inputs (`KINDS`, drawn with --seed): random bytes; bytes behind a valid magic and version;
byte-level mutations (flip, set, truncate, insert, delete, append) of valid raw and range-coded
packets (slices and whole frames, several quantizer levels); truncations; valid packets with
their payload damaged and the CRC made valid again; valid-CRC headers with absurd fields (huge
or zero shapes, row ranges, reference distances, bits, levels, modes, codings, versions,
with the payload resized to match a claim where that fits a packet), among them the two found
by hand: a 34-byte range-coded packet claiming 24x1024x1024 latents and a 24,610-byte raw slice
of an 8192x8192 frame; valid packets with forged frame numbers and timestamps; packets of
another model and of another frame size; and a legitimate stream interleaved throughout (table-
based frames, then an I-frame and learned P-frames, whose conditional packets are mutated and
resealed with the rest, so the assembler's learned decoder meets them on its reference).

Reported: inputs, crashes (with the first few tracebacks' last lines), the slowest input (ms,
parser + assembler) with its kind, p99 ms, the slowest per stage, and peak memory per input.
Times are CPU ms of the calling thread (the work an input costs, with one torch thread, as
in a call; wall-clock ms, which other processes' load inflates, are reported beside them).
Memory per input is tracemalloc's peak over one input's parser + assembler work, measured on
every 100th input (in place) and on every input slower than 5 ms (run again on a fresh
assembler); plus the process's peak RSS growth over the run. Targets: 0 crashes, slowest <= 50 ms, peak <= 2 MB per input.

    python -m streamer.bench fuzz [--inputs 100000] [--seed 0] [--weights default] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import struct
import sys
import time
import traceback
import tracemalloc
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..assembler import FrameAssembler
from ..codec import NeuralCodec, bitstream
from ..codec.conditional import coder_id, shipped_for
from ..codec.bitstream import CODING_RANGE, CODING_RAW
from ..errors import PacketError
from ..session import EncoderSession

KINDS = ("random", "random_header", "mutated_raw", "mutated_range", "truncated", "resealed_raw",
         "resealed_range", "absurd", "forged_number", "foreign", "valid")
WEIGHTS = (6, 4, 8, 8, 4, 4, 8, 22, 10, 4, 22)  # relative frequency of each kind
SLICE_BYTES = 1160  # the transport's slice size (transport.SLICE_BYTES; no aiortc import here)
SLOW_MS = 5.0  # inputs slower than this get their memory measured
MEMORY_EVERY = 100
TARGET_SLOWEST_MS = 50.0
TARGET_PEAK_BYTES = 2 * 1024 * 1024


def reseal(body: bytes | bytearray) -> bytes:
    """`body` (a packet without its CRC) with a valid CRC32 appended."""
    body = bytes(body)
    return body + struct.pack(">I", zlib.crc32(body))


def forge(header: dict[str, int], payload: bytes, side: bytes = b"") -> bytes:
    """A valid-CRC packet with any header fields (`bitstream.HEADER_FIELDS`, by name): the
    payload's length is what the packet holds after the header and side information."""
    h = {"magic_version": bitstream.MAGIC_VERSION, "coding": CODING_RAW, "frame_type": 0, "bits": 8,
         "quant_mode": 2, "channels": 24, "height": 28, "width": 28, "row_start": 0, "row_count": 28, **header}
    return reseal(bitstream.header_bytes(h) + side + payload)


def fields_of(packet: bytes) -> dict[str, int]:
    return bitstream.header_fields(packet)


def split_body(packet: bytes) -> tuple[bytes, bytes]:
    """A valid packet's (side information, payload)."""
    h = fields_of(packet)
    side = bitstream.side_bytes(bitstream.QUANT_NAMES.get(h["quant_mode"], "step"), h["channels"])
    body = packet[bitstream.HEADER_BYTES:-4]
    return body[:side], body[side:]


def attack_range_packet(model_id: int, level: int = 3) -> bytes:
    """The 34-byte range-coded packet with a valid CRC claiming 24x1024x1024 latents."""
    return forge({"coding": CODING_RANGE, "model_id": model_id, "level": level, "height": 1024, "width": 1024,
                  "row_count": 1024}, b"")


def attack_raw_slice(model_id: int, level: int = 3) -> bytes:
    """A 24,610-byte raw one-row slice of an 8192x8192 frame (24x1024x1024 latents), valid CRC."""
    return forge({"model_id": model_id, "level": level, "height": 1024, "width": 1024, "row_start": 0,
                  "row_count": 1}, bytes(24 * 1024))


class Corpus:
    """Valid packets of `codec` (raw and range-coded, slices and whole frames, several levels),
    a legitimate stream of sliced frames, and packets of other models and sizes."""

    def __init__(self, codec: NeuralCodec, frames: np.ndarray | None = None) -> None:
        self.codec = codec
        if frames is None:
            frames = sample_frames(codec.frame_size, 6)
        levels = sorted({0, codec.levels // 2, codec.levels - 1})
        self.raw: list[bytes] = []
        self.range: list[bytes] = []
        self.stream: list[list[bytes]] = []  # per frame, its slices in order
        for i, f in enumerate(frames):
            lv = levels[i % len(levels)]
            q = codec.encode(f, lv)
            self.raw += bitstream.pack_frame(q, codec.model_id, i, 10 ** 15 + i, SLICE_BYTES)
            self.raw += bitstream.pack_frame(q, codec.model_id, i, 10 ** 15 + i)
            packets = codec.pack(q, i, 10 ** 15 + i, SLICE_BYTES)
            self.stream.append(packets)
            self.range += packets + codec.pack(q, i, 10 ** 15 + i)
        # learned P-frames (one conditional packet each) after an I-frame, when a learned coder fits
        learned = shipped_for(codec.model_id) if codec.cfg.quantizer.mode == "step" else None
        if learned is not None:
            enc = EncoderSession(codec, max_packet_bytes=SLICE_BYTES, level=levels[len(levels) // 2], learned=learned)
            for f in frames:
                n = len(self.stream)
                cand = enc.encode(f, n, 10 ** 15 + n)
                enc.commit(cand)
                self.stream.append(cand.packets)
                self.range += cand.packets
        if not self.range:  # a model without entropy tables: its packets are all raw
            self.range = list(self.raw)
        self.range = [p for p in self.range if fields_of(p)["coding"] == CODING_RANGE] or list(self.raw)
        self.foreign: list[bytes] = []
        other = NeuralCodec.untrained("lite", frame_size=codec.frame_size, seed=1)
        self.foreign += other.packets(frames[0], 1, 0, SLICE_BYTES)
        big = codec.frame_size + 32  # another call's frame size, this model
        f = np.resize(frames[0], (big, big, 3))
        self.foreign += codec.packets(f, 1, 0, SLICE_BYTES, level=levels[0])[:3]
        self.foreign.append(codec.packets(f, 1, 0, level=levels[0])[0])
        self.foreign += [attack_range_packet(codec.model_id), attack_raw_slice(codec.model_id)]


def sample_frames(size: int, count: int) -> np.ndarray:
    """Frames of the bundled clip (random pixels where it cannot be read)."""
    try:
        from ..backends.calibration import sample_frames as clip

        return clip(size, count)
    except Exception:  # noqa: BLE001 - any trouble reading the clip: noise frames do as well here
        return np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


ABSURD = {
    "magic_version": [0, 0xA2, 0xA4, 0x4E, 255], "coding": [0, 1], "frame_type": [0, 1],
    "bits": [1, 2, 7, 8], "quant_mode": [0, 1, 2, 3], "conditional": [1], "level": [0, 1, 6, 7, 255],
    "ref_distance": [0, 1, 2, 255], "channels": [0, 1, 23, 25, 1024, 1025, 65535],
    "height": [0, 1, 27, 29, 1024, 1025, 65535], "width": [0, 1, 27, 29, 1024, 1025, 65535],
    "row_start": [1, 27, 28, 1023, 65535], "row_count": [0, 1, 28, 29, 1024, 65535],
}


class Inputs:
    """The fuzz inputs: an endless, reproducible stream of (kind, bytes) for one `Corpus`."""

    def __init__(self, corpus: Corpus, seed: int = 0) -> None:
        self.c = corpus
        self.rng = random.Random(seed)
        self.number = 1000  # the legitimate stream's frame numbers
        self.stream_pos = 0
        self.queue: list[tuple[str, bytes]] = []

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        while True:
            yield self.next()

    def next(self) -> tuple[str, bytes]:
        if self.queue:
            return self.queue.pop()
        kind = self.rng.choices(KINDS, WEIGHTS)[0]
        return kind, getattr(self, "_" + kind)()

    # -- kinds -----------------------------------------------------------------------------
    def _random(self) -> bytes:
        r = self.rng
        n = r.choice((r.randrange(0, 50), r.randrange(0, 400), r.randrange(1000, 3000)))
        return r.randbytes(n)

    def _random_header(self) -> bytes:
        r = self.rng
        body = bytes([bitstream.MAGIC_VERSION]) + r.randbytes(r.randrange(29, 300))
        return reseal(body) if r.random() < 0.5 else body + r.randbytes(4)

    def _mutate(self, packet: bytes) -> bytes:
        r = self.rng
        b = bytearray(packet)
        for _ in range(r.randint(1, 4)):
            op, i = r.randrange(6), r.randrange(len(b) + 1)
            if op == 0 and b:
                b[i % len(b)] ^= r.randint(1, 255)
            elif op == 1 and b:
                b[i % len(b)] = r.randrange(256)
            elif op == 2:
                del b[i:]
            elif op == 3:
                b.insert(i, r.randrange(256))
            elif op == 4 and b:
                del b[i % len(b)]
            elif op == 5:
                b.extend(bytes([r.randrange(256)]) * r.randint(1, 64))
        return bytes(b)

    def _mutated_raw(self) -> bytes:
        return self._mutate(self.rng.choice(self.c.raw))

    def _mutated_range(self) -> bytes:
        return self._mutate(self.rng.choice(self.c.range))

    def _truncated(self) -> bytes:
        p = self.rng.choice(self.c.raw + self.c.range)
        return p[: self.rng.randrange(len(p))]

    def _reseal_damaged(self, packet: bytes) -> bytes:
        r = self.rng
        body = bytearray(packet[:-4])
        start = bitstream.HEADER_BYTES + len(split_body(packet)[0])
        for _ in range(r.randint(1, 8)):
            i = r.randrange(start, len(body)) if len(body) > start else r.randrange(len(body))
            body[i] = r.randrange(256)
        if r.random() < 0.3:  # or random words of the right length
            body[start:] = r.randbytes(len(body) - start)
        return reseal(body)

    def _resealed_raw(self) -> bytes:
        return self._reseal_damaged(self.rng.choice(self.c.raw))

    def _resealed_range(self) -> bytes:
        return self._reseal_damaged(self.rng.choice(self.c.range))

    def _absurd(self) -> bytes:
        r = self.rng
        base = r.choice(self.c.raw + self.c.range)
        if r.random() < 0.05:
            return r.choice((attack_range_packet, attack_raw_slice))(self.c.codec.model_id, r.randrange(8))
        h = fields_of(base)
        side, payload = split_body(base)
        for name in r.sample(list(ABSURD), r.randint(1, 4)):
            h[name] = r.choice(ABSURD[name] + [r.randrange(1 << (8 * _field_bytes(name)))])
        fit = r.random()
        count = h["channels"] * h["row_count"] * h["width"]
        if fit < 0.4:  # the payload the claim needs, where a packet can hold it
            need = bitstream.packed_size(count, max(1, min(8, h["bits"])))
            if h["coding"] == CODING_RANGE:
                need = max(0, need - 4) // 4 * 4 if r.random() < 0.5 else r.randrange(0, 64) * 4
            if need <= bitstream.MAX_PACKET_BYTES - bitstream.OVERHEAD_BYTES - len(side):
                payload = (r.randbytes(need) if r.random() < 0.5 else bytes(need))
        elif fit < 0.7:  # or a payload some bytes or words off
            payload = payload[: max(0, len(payload) + r.choice((-8, -4, -1, 1, 4, 8)))] + bytes(8)[: r.randrange(9)]
        if r.random() < 0.2:  # and the side information of another mode
            side = r.choice((b"", bytes(48), r.randbytes(96)))
        return forge(h, payload, side)

    def _forged_number(self) -> bytes:
        r = self.rng
        base = r.choice(self.c.range + self.c.raw)
        h = fields_of(base)
        pick = r.random()
        if pick < 0.4:
            h["frame_number"] = r.randrange(1 << 32)
        elif pick < 0.8:
            h["frame_number"] = max(0, min((1 << 32) - 1, self.number + r.randint(-600, 600)))
        else:
            h["frame_number"] = max(0, self.number + r.randint(-3, 3))
        if r.random() < 0.5:
            h["timestamp_us"] = r.choice((0, r.randrange(1 << 64), (1 << 64) - 1, 10 ** 15 + r.randint(-10 ** 7, 10 ** 9)))
        side, payload = split_body(base)
        return forge(h, payload, side)

    def _foreign(self) -> bytes:
        return self.rng.choice(self.c.foreign)

    def _valid(self) -> bytes:
        """The next slice of the legitimate stream (renumbered; sometimes a slice is lost)."""
        frame = self.c.stream[self.number % len(self.c.stream)]
        if self.stream_pos >= len(frame):
            self.number += 1 + (self.rng.random() < 0.05)  # now and then a whole frame is lost
            self.stream_pos = 0
            frame = self.c.stream[self.number % len(self.c.stream)]
        p = frame[self.stream_pos]
        self.stream_pos += 1 + (self.rng.random() < 0.05)  # and now and then a slice
        h = fields_of(p)
        h["frame_number"], h["timestamp_us"] = self.number, 10 ** 15 + self.number * 33_333
        side, payload = split_body(p)
        return forge(h, payload, side)


def _field_bytes(name: str) -> int:
    return {"channels": 2, "height": 2, "width": 2, "row_start": 2, "row_count": 2, "model_id": 4}.get(name, 1)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Fuzzer:
    """Runs inputs through the parser and one assembler and keeps the numbers."""

    def __init__(self, codec: NeuralCodec, seed: int = 0, frames: np.ndarray | None = None,
                 memory_every: int = MEMORY_EVERY) -> None:
        self.codec = codec
        self.memory_every = memory_every
        self.shape = codec.latent_shape()
        self.corpus = Corpus(codec, frames)
        self.inputs = Inputs(self.corpus, seed)
        self.clock = Clock()
        learned = shipped_for(codec.model_id)
        self.asm = FrameAssembler(codec, clock=self.clock, learned=learned)
        self.learned_id = None if learned is None else coder_id(learned, codec.model_id)
        self.times: list[float] = []  # ms per input, parser + assembler
        self.kinds: dict[str, int] = {k: 0 for k in KINDS}
        self.wall: list[float] = []  # the same in wall-clock ms (other processes' load shows here)
        self.slowest = {k: (0.0, "") for k in ("total", "parser", "assembler", "wall")}
        self.crashes = 0
        self.crash_notes: list[str] = []
        self.peak = (0, "")  # bytes, kind
        self.measured = 0
        self.emitted = 0

    def _crash(self, stage: str, kind: str, data: bytes, e: BaseException) -> None:
        self.crashes += 1
        if len(self.crash_notes) < 5:
            last = traceback.format_exception(type(e), e, e.__traceback__)[-2:]
            self.crash_notes.append(f"{stage} on {kind} ({data[:48].hex()}...): {''.join(last).strip()}")

    def _parse(self, kind: str, data: bytes) -> None:
        try:
            self.codec.unpack(data, expect_shape=self.shape, learned_id=self.learned_id)
        except PacketError:
            pass
        except Exception as e:  # noqa: BLE001 - that is what we are looking for
            self._crash("parser", kind, data, e)

    def _assemble(self, asm: FrameAssembler, kind: str, data: bytes, poll: bool) -> list[Any]:
        try:
            out = asm.add(data)
            if poll:
                out += asm.poll()
            return out
        except Exception as e:  # noqa: BLE001
            self._crash("assembler", kind, data, e)
            return []

    def _bare(self, kind: str, data: bytes) -> None:
        try:
            bitstream.unpack(data, coder=self.codec.entropy)
        except PacketError:
            pass
        except Exception as e:  # noqa: BLE001
            self._crash("bare parser", kind, data, e)

    def _memory(self, kind: str, data: bytes, asm: FrameAssembler, poll: bool) -> int:
        tracemalloc.start()
        try:
            self._parse(kind, data)
            self._assemble(asm, kind, data, poll)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.measured += 1
        if peak > self.peak[0]:
            self.peak = (peak, kind)
        return peak

    def run(self, count: int) -> None:
        for i in range(count):
            kind, data = self.inputs.next()
            self.kinds[kind] += 1
            self.clock.t += 0.001
            poll = i % 10 == 0
            if i % self.memory_every == self.memory_every - 1:  # measured in place (this input's real run)
                self._memory(kind, data, self.asm, poll)
                frames: list[Any] = []
                self.times.append(float("nan"))  # (time under tracemalloc is not the code's)
                self.wall.append(float("nan"))
            else:
                w0, t0 = time.perf_counter(), time.thread_time()
                self._parse(kind, data)
                t1 = time.thread_time()
                frames = self._assemble(self.asm, kind, data, poll)
                t2, w2 = time.thread_time(), time.perf_counter()
                ms = (t2 - t0) * 1000
                self.times.append(ms)
                self.wall.append((w2 - w0) * 1000)
                for stage, v in (("total", ms), ("parser", (t1 - t0) * 1000), ("assembler", (t2 - t1) * 1000),
                                 ("wall", (w2 - w0) * 1000)):
                    if v > self.slowest[stage][0]:
                        self.slowest[stage] = (v, kind)
                if ms > SLOW_MS:  # again, for its memory, on a fresh assembler (the state differs)
                    self._memory(kind, data, FrameAssembler(self.codec, clock=self.clock), poll)
            for f in frames:  # what the receiver's decoder thread does next
                self.emitted += 1
                try:
                    f.latents(self.codec)
                except Exception as e:  # noqa: BLE001
                    self._crash("latents", kind, data, e)
            if i % 10 == 5:
                self._bare(kind, data)

    def report(self) -> dict[str, Any]:
        t = np.array([x for x in self.times if not math.isnan(x)])
        w = np.array([x for x in self.wall if not math.isnan(x)])
        n = self.asm.n
        return {
            "inputs": len(self.times), "crashes": self.crashes, "crash_notes": self.crash_notes,
            "slowest_ms": round(self.slowest["total"][0], 3), "slowest_kind": self.slowest["total"][1],
            "p99_ms": round(float(np.percentile(t, 99)), 3) if t.size else None,
            "median_ms": round(float(np.median(t)), 4) if t.size else None,
            "slowest_wall_ms": round(self.slowest["wall"][0], 3), "slowest_wall_kind": self.slowest["wall"][1],
            "p99_wall_ms": round(float(np.percentile(w, 99)), 3) if w.size else None,
            "slowest_parser_ms": round(self.slowest["parser"][0], 3), "slowest_parser_kind": self.slowest["parser"][1],
            "slowest_assembler_ms": round(self.slowest["assembler"][0], 3),
            "slowest_assembler_kind": self.slowest["assembler"][1],
            "peak_memory_bytes": self.peak[0], "peak_memory_kind": self.peak[1], "memory_measured": self.measured,
            "kinds": self.kinds, "frames_emitted": self.emitted,
            "assembler": {k: getattr(n, k) for k in ("packets", "bad_packets", "foreign", "late", "duplicate",
                                                      "complete", "concealed", "lost", "restarts")},
            "pending_frames": len(self.asm._pending),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m streamer.bench fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default="default", help="the model (default: the shipped one)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    import torch

    from ..roundtrip import load_codec

    torch.set_num_threads(1)
    codec = load_codec(args.weights)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    fz = Fuzzer(codec, args.seed)
    fz.run(args.inputs)
    r = fz.report()
    r["seconds"] = round(time.perf_counter() - t0, 1)
    r["rss_growth_bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    r["model"] = {"name": codec.name, "model_id": f"{codec.model_id:08x}", "latent_shape": list(fz.shape),
                  "range_coded": codec.entropy is not None}
    r["ok"] = (r["crashes"] == 0 and r["slowest_ms"] <= TARGET_SLOWEST_MS and r["peak_memory_bytes"] <= TARGET_PEAK_BYTES)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"fuzz: {r['inputs']} inputs in {r['seconds']} s on {codec.name} ({'x'.join(map(str, fz.shape))} latents)")
        print(f"  crashes {r['crashes']}")
        for note in r["crash_notes"]:
            print(f"    {note}")
        print(f"  slowest {r['slowest_ms']} ms ({r['slowest_kind']}); p99 {r['p99_ms']} ms; median {r['median_ms']} ms "
              f"(CPU); wall: slowest {r['slowest_wall_ms']} ms ({r['slowest_wall_kind']}), p99 {r['p99_wall_ms']} ms")
        print(f"  slowest parser {r['slowest_parser_ms']} ms ({r['slowest_parser_kind']}), "
              f"assembler {r['slowest_assembler_ms']} ms ({r['slowest_assembler_kind']})")
        print(f"  peak memory per input {r['peak_memory_bytes']} bytes ({r['peak_memory_kind']}; "
              f"{r['memory_measured']} inputs measured); process RSS growth {r['rss_growth_bytes']} bytes")
        print(f"  assembler counters {r['assembler']}; pending {r['pending_frames']}")
        print(f"  targets (0 crashes, <= {TARGET_SLOWEST_MS:g} ms, <= {TARGET_PEAK_BYTES} bytes): "
              f"{'met' if r['ok'] else 'NOT met'}")
    return 0 if r["crashes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
