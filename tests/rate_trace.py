"""A recorded trace of frame sizes: the bundled sample clip through the call's encoder session
(I-frame, then P-frames with the RD decision) at every quantizer level of the shipped model,
real packets' bytes. tests/test_ratecontrol.py plays the rate controller against it.

    python tests/rate_trace.py      # (re)records tests/data/rate_trace_sample.json

Frame i's bytes at level L are those of a P-frame chain held at L: the controller moving between
levels sees, at each frame, what that level would have cost there (an approximation: a real
chain's residuals also depend on the levels before)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

TRACE = Path(__file__).parent / "data" / "rate_trace_sample.json"
FRAMES = 150  # 5 s at 30 fps


def record(frames: int = FRAMES) -> dict:
    from streamer.codec import NeuralCodec
    from streamer.session import EncoderSession
    from streamer.sources import prepare
    from streamer.video import SAMPLE_CLIP, read_frames

    codec = NeuralCodec.load()
    images = [prepare(f, codec.frame_size) for f in read_frames(SAMPLE_CLIP, frames)]
    by_level = []
    for level in range(codec.levels):
        s = EncoderSession(codec, max_packet_bytes=1160, keyframe_interval=0, level=level)
        sizes = []
        for n, image in enumerate(images):
            cand = s.encode(image, n, n * 33_333)
            s.commit(cand)
            sizes.append(sum(map(len, cand.packets)))
        by_level.append(sizes)
    return {"clip": SAMPLE_CLIP.name, "model_id": f"{codec.model_id:08x}", "fps": 30, "frames": len(images),
            "bytes": by_level}  # bytes[level][frame]; frame 0 is the I-frame


if __name__ == "__main__":
    TRACE.write_text(json.dumps(record(), separators=(",", ":")) + "\n")
    print(f"wrote {TRACE}", file=sys.stderr)
