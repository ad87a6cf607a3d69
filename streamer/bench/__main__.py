"""`python -m streamer.bench antialias|codec|call|fuzz [options]`: benchmarks that print numbers
(and one JSON object with --json). Speed is measured here, never asserted in tests."""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "antialias": "anti-alias downsamplers vs the FOMM reference (error and CPU time)",
    "codec": "encode/decode/pack/unpack ms per backend, preset and size",
    "call": "a live loopback call: fps, latency percentiles, kbps, CPU, loss",
    "fuzz": "hostile packets into the parser and assembler: crashes, slowest ms, p99, peak memory",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHES:
        print("usage: python -m streamer.bench {antialias|codec|call|fuzz} [--json] [options]\n")
        for name, what in BENCHES.items():
            print(f"  {name:10s} {what}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"streamer.bench.{argv[0]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
