"""The call bench's recovery-after-loss analysis on synthetic frame logs (no call is run).

A frame log as streamer/receive.py writes it: one line per shown frame ({"f", "cap", "shown",
"lat", "complete", "rows"}) and, as they become known, {"f", "crc_ok"} and {"f", "psnr"}.
"""

from __future__ import annotations

from streamer.bench import call

FPS = 30
US = 1_000_000
OPEN = 100 * US  # the call opened (first capture) at t = 100 s
LOSS_S, SECONDS = 10.0, 20.0
LOSS_END = OPEN + int(LOSS_S * US)


def log(psnr_at, *, exact=lambda t: True, measured=lambda i: True, seconds: float = SECONDS + 3,
        skip=lambda t: False):
    """Frames at FPS from OPEN for `seconds`, shown 50 ms after capture; psnr_at(t_since_open_s)."""
    frames, events = [], []
    for i in range(int(seconds * FPS)):
        cap = OPEN + i * US // FPS
        t = (cap - OPEN) / US
        if skip(t):
            continue
        ok = exact(t)
        frames.append({"f": i, "cap": cap, "shown": cap + 50_000, "lat": 50.0, "complete": ok != "concealed",
                       "rows": 14})
        if ok != "concealed" and ok != "no-verdict":
            events.append({"f": i, "crc_ok": ok is True})
            if ok is True and measured(i):
                events.append({"f": i, "psnr": psnr_at(t)})
    return {"frames": frames, "events": events, "loss_end_us": LOSS_END}


def baseline():
    return log(lambda t: 32.0 + 0.1 * (round(t * FPS) % 3 - 1))  # a little content noise around 32 dB


def test_recovered_after_the_loss_stops():
    # damaged until 0.4 s after the loss stops, then the baseline's quality
    lossy = log(lambda t: 27.0 if t < LOSS_S + 0.4 else 32.0,
                exact=lambda t: True if t < 3 or t >= LOSS_S + 0.2 else "concealed")
    r = call.loss_recovery(lossy, baseline(), SECONDS, LOSS_S)
    assert abs(r["psnr_baseline"] - 32.0) < 0.05
    assert r["recovered"]
    # the first frame whose 1-s window has a mean >= 31.5: about 0.4 s - 1/10 s of 27 dB frames
    # (30 frames at 32 and ≤ 3 at 27 average >= 31.5), shown 50 ms after capture
    assert 250 <= r["recovery_ms"] <= 500, r
    assert r["baseline_self_recovery_ms"] is not None and r["baseline_self_recovery_ms"] < 100
    assert r["psnr_after_loss"] < r["psnr_baseline"]  # the damaged 0.4 s pulls the mean down
    assert r["recovery"]["windows_failed"] > 0


def test_never_recovered_when_the_picture_stays_worse():
    lossy = log(lambda t: 31.3)  # 0.7 dB below the baseline for good: every frame exact, never back
    r = call.loss_recovery(lossy, baseline(), SECONDS, LOSS_S)
    assert not r["recovered"] and r["recovery_ms"] is None
    assert r["recovery"]["windows_failed"] == r["recovery"]["windows"] > 0
    # within the tolerance it is recovered at once
    r = call.loss_recovery(log(lambda t: 31.6), baseline(), SECONDS, LOSS_S)
    assert r["recovered"] and r["recovery_ms"] <= 100


def test_a_relapse_moves_recovery_past_it():
    # good at once, but a 0.3 s dip 4 s after the loss stops: recovery only after the dip
    lossy = log(lambda t: 25.0 if LOSS_S + 4 <= t < LOSS_S + 4.3 else 32.0)
    r = call.loss_recovery(lossy, baseline(), SECONDS, LOSS_S)
    assert r["recovered"] and 4000 <= r["recovery_ms"] <= 4400, r


def test_frames_not_proven_bit_exact_never_count_as_recovered():
    def good(t):  # the PSNR the sender measured is fine throughout
        return 32.0
    # concealed frames once a second: no window after the loss passes, whatever the PSNR
    for bad in ("concealed", False, "no-verdict"):  # concealed, CRC mismatch, CRC verdict never came
        lossy = log(good, exact=lambda t, bad=bad: bad if round(t * FPS) % FPS == 0 else True)
        r = call.loss_recovery(lossy, baseline(), SECONDS, LOSS_S)
        assert not r["recovered"], bad
        assert r["recovery"]["not_exact"] >= 9
    # one mismatched frame 2 s after the loss: recovered only after it
    lossy = log(good, exact=lambda t: abs(t - (LOSS_S + 2)) >= 0.5 / FPS)
    r = call.loss_recovery(lossy, baseline(), SECONDS, LOSS_S)
    assert r["recovered"] and 2000 < r["recovery_ms"] < 2200, r


def test_unmeasured_frames_are_not_evidence():
    # exact, but the sender measured only every 4th frame after the loss: windows lack known PSNRs
    lossy = log(lambda t: 32.0, measured=lambda i: i < LOSS_S * FPS or i % 4 == 0)
    r = call.loss_recovery(lossy, baseline(), SECONDS, LOSS_S)
    assert not r["recovered"]
    # every 2nd measured is enough (RECOVERY_MIN_MEASURED = 0.5), and the recovery frame is a measured one
    lossy = log(lambda t: 32.0, measured=lambda i: i % 2 == 1)
    r = call.loss_recovery(lossy, baseline(), SECONDS, LOSS_S)
    assert r["recovered"]
    # the first 10 frames after the loss exact but unmeasured: their windows pass (2/3 measured),
    # yet the recovery frame must be one whose PSNR is known, ~1/3 s after the loss stopped
    first = round(LOSS_S * FPS)
    lossy = log(lambda t: 32.0, measured=lambda i: not first - 2 <= i < first + 10)
    r = call.loss_recovery(lossy, baseline(), SECONDS, LOSS_S)
    assert r["recovered"] and 330 <= r["recovery_ms"] <= 400, r
    # no frame shown at all after the loss (a freeze to the end): nothing recovered
    lossy = log(lambda t: 32.0, skip=lambda t: t >= LOSS_S)
    r = call.loss_recovery(lossy, baseline(), SECONDS, LOSS_S)
    assert not r["recovered"] and r["psnr_after_loss"] is None


def test_recovery_needs_a_whole_window_before_the_end():
    # back only 0.5 s before the end of the judged window: not shown to stay back for 1 s
    lossy = log(lambda t: 32.0 if t >= SECONDS - 0.5 else 27.0)
    r = call.loss_recovery(lossy, baseline(), SECONDS, LOSS_S)
    assert not r["recovered"]


def test_no_baseline_reports_no_recovery():
    r = call.loss_recovery(log(lambda t: 32.0), None, SECONDS, LOSS_S)
    assert r["recovery_ms"] is None and not r["recovered"] and "recovery_error" in r
    assert abs(r["psnr_after_loss"] - 32.0) < 1e-6
    base = baseline()
    base["events"] = [e for e in base["events"] if "psnr" not in e]  # the baseline measured nothing
    r = call.loss_recovery(log(lambda t: 32.0), base, SECONDS, LOSS_S)
    assert r["recovery_ms"] is None and r["psnr_baseline"] is None and "recovery_error" in r


def test_frame_states_pair_shown_frames_with_their_verdicts():
    frames = [{"f": 1, "shown": 20, "complete": True}, {"f": 0, "shown": 10, "complete": True},
              {"f": 2, "shown": 30, "complete": False}, {"f": 3, "shown": 40, "complete": True}]
    events = [{"f": 1, "crc_ok": True}, {"f": 1, "psnr": 30.5}, {"f": 0, "crc_ok": False},
              {"f": 3, "crc_ok": True}]
    assert call.frame_states(frames, events) == [(10, False, None), (20, True, 30.5), (30, False, None),
                                                 (40, True, None)]
