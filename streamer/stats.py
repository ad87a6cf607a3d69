"""Call statistics: per-second counters and latency windows, one compact line per second.

Both ends keep a `CallStats`; every second `tick()` turns the counters into rates, prints
`line()` and sends `snapshot()` to the server (`{"type":"stats","stats":{...}}`), which relays it
to viewers and the other call peer. Process CPU and RSS are sampled too, so the bench can read
them from the same records.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from collections import deque
from typing import Any, Iterable, TextIO


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation; None for no values."""
    v = sorted(values)
    if not v:
        return None
    k = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def rss_mb() -> float:
    """Resident set size now (Linux /proc), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if os.uname().sysname == "Darwin" else peak / 1024


class CallStats:
    """Counters (monotonic totals) plus per-interval rates and latency percentiles.

    `count(name, n)` adds to a total; `add_latency(ms)` feeds the current interval's window;
    `tick()` closes the interval and returns the snapshot."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.totals: dict[str, float] = {}
        self._last_totals: dict[str, float] = {}
        self._latency: list[float] = []
        self._t0 = self._last_t = time.monotonic()
        self._cpu0 = self._last_cpu = time.process_time()
        self.values: dict[str, Any] = {}  # gauges set by the owner (psnr, encode ms, ...)
        self.snapshot_last: dict[str, Any] = {}
        self.history: deque[dict[str, Any]] = deque(maxlen=3600)

    def count(self, name: str, n: float = 1) -> None:
        self.totals[name] = self.totals.get(name, 0) + n

    def add_latency(self, ms: float) -> None:
        self._latency.append(ms)

    def rate(self, name: str, dt: float) -> float:
        return (self.totals.get(name, 0) - self._last_totals.get(name, 0)) / dt if dt > 0 else 0.0

    def tick(self) -> dict[str, Any]:
        now = time.monotonic()
        dt = now - self._last_t
        cpu = time.process_time()
        lat = self._latency
        snap: dict[str, Any] = {
            "role": self.role,
            "t": round(now - self._t0, 2),
            "fps": round(self.rate("frames", dt), 1),
            "kbps": round(self.rate("bytes", dt) * 8 / 1000, 1),
            "cpu": round(100 * (cpu - self._last_cpu) / dt, 1) if dt > 0 else 0.0,
            "rss_mb": round(rss_mb(), 1),
        }
        if lat:
            snap["latency_ms"] = {"p50": round(percentile(lat, 50) or 0, 1),
                                  "p95": round(percentile(lat, 95) or 0, 1),
                                  "max": round(max(lat), 1)}
        snap.update({k: int(v) for k, v in self.totals.items() if k not in ("bytes",)})
        snap.update(self.values)
        self._last_totals = dict(self.totals)
        self._last_t, self._last_cpu = now, cpu
        self._latency = []
        self.snapshot_last = snap
        self.history.append(snap)
        return snap

    def line(self, snap: dict[str, Any] | None = None) -> str:
        """One compact line, e.g. `recv 29.9 fps 3512 kbps lat 52/61 ms lost 0 conc 0 bad 0`."""
        s = snap or self.snapshot_last
        parts = [f"{self.role:<4} {s.get('fps', 0):5.1f} fps {s.get('kbps', 0):6.0f} kbps"]
        if "latency_ms" in s:
            parts.append(f"lat {s['latency_ms']['p50']:.0f}/{s['latency_ms']['p95']:.0f} ms")
        for key, short in (("dropped", "drop"), ("lost", "lost"), ("concealed", "conc"), ("skipped", "skip"),
                           ("bad_packets", "bad"), ("late", "late")):
            if key in s:
                parts.append(f"{short} {s[key]}")
        if s.get("psnr") is not None:
            parts.append(f"psnr {s['psnr']:.1f} dB")
        for key, fmt in (("encode_ms", "enc {:.0f} ms"), ("decode_ms", "dec {:.0f} ms")):
            if s.get(key) is not None:
                parts.append(fmt.format(s[key]))
        parts.append(f"cpu {s.get('cpu', 0):.0f}%")
        return " | ".join(parts)


class FrameLog:
    """Optional per-frame JSON lines (the bench reads them): one object per shown frame."""

    def __init__(self, path: str | None) -> None:
        self.f: TextIO | None = open(path, "w", buffering=1) if path else None

    def write(self, record: dict[str, Any]) -> None:
        if self.f is not None:
            self.f.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
