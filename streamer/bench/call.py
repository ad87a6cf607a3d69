"""`python -m streamer.bench call`: a live call on loopback, measured.

Starts the call server (`python -m server`), a receiver and a sender (`python -m
streamer.receive` / `streamer.send`) as three subprocesses on 127.0.0.1 (ICE restricted to
loopback, no STUN), sends the bundled sample clip for --seconds, and reports from the
receiver's per-frame log and the programs' summaries:

* delivered fps (frames shown per second), frames sent / shown / concealed / lost / skipped;
* capture -> display latency p50/p95/p99 (sender's capture timestamp vs receiver's display
  time, same machine clock), and per minute for long runs (with RSS at start and end);
* kbps on the data channel, CPU % of each process, the machine's load average;
* with --loss P: outgoing SCTP packets of the sender are dropped with probability P (at the
  DTLS transport, below SCTP: see streamer/transport.py) during the first --loss-seconds
  (default: half the run) after the call opens, then the loss stops; the longest freeze (gap
  between shown frames) after that moment is reported, and how soon the picture recovers.

Recovery after loss (--loss P > 0). The same call is first run without loss (the *baseline*:
same source, kbps, seconds, one after the other in this invocation so both share the machine's
state; --no-baseline skips it), and both senders run with --measure. What a shown frame is worth:

* *exact*: complete, and its codes' CRC matched the sender's (the receiver's reference and
  latents are the sender's, bit for bit), so the picture is exactly the sender's own decode;
  its PSNR is the one the sender measured for that frame, when it measured it (the sender
  measures latest-only: a frame can be exact and *unmeasured*);
* *not exact*: concealed, CRC mismatch, or no CRC verdict (the meta message was lost): its PSNR
  is not known, so it never counts as recovered.

The windows: loss_end = the sender's moment the loss stopped; the run's end = the call's open
(loss_end - --loss-seconds) + --seconds, and at most RECOVERY_TAIL_S before the last shown frame
(whose PSNR messages may still be in flight). The baseline's window is the same offsets from its
call's open (its first shown frame's capture time). psnr_after_loss / psnr_baseline = mean
measured PSNR of exact frames shown in [loss_end, end] of each run.

A 1-second window starting at a shown frame *passes* when every frame shown in it is exact, at
least RECOVERY_MIN_MEASURED of them (and one) have a measured PSNR, and their mean PSNR is at least
psnr_baseline - 0.5 dB (better than the baseline passes). recovery_ms = shown time of the first
frame F after loss_end, itself exact and measured and shown at least 1 s before the end, such
that the window starting at every frame shown from F until end - 1 s passes and every frame
shown from F to the end is exact, minus loss_end; null (recovered: false) when there is none.
The same test on the baseline against its own mean (baseline_self_recovery_ms, ~0) shows the
definition's noise floor; recovery.windows_failed_by says why windows failed (a sender too
loaded to measure most frames fails windows as too_few_measured, never passes them). Issue 13
asks for recovery_ms <= 1000 and freeze_after_loss_ms <= 200 (the "issue13" flags).

    python -m streamer.bench call --seconds 20 [--loss 0.05] [--no-baseline] [--transport slices|lifetime] [--json]

--two-way: a two-way call instead (`python -m streamer.call`, issue 15): two callers, each
sending --source at --fps and --kbps and showing the other's picture over one peer connection;
the same numbers per direction (a->b: the first caller's frames shown by the second), from each
caller's frame log and summary; no loss.

Sound (--audio SPEC, default auto: the sample clip's own): every sender sends it; the received
audio frames and ms are reported. --audio tone measures lip-sync: the source becomes
`sample:flash` (the sample clip, a corner whitened at each beep; unless --source says otherwise), the receivers run with --measure-av, and
av_offset_ms (p5/p50/p95: each beep as played vs its flash as shown; positive = sound early;
ITU-R BT.1359 tolerates +45 / -125 ms) is reported per direction.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from server.tokens import role_token
from streamer.backends import CHOICES
from streamer.stats import percentile

ROOT = Path(__file__).resolve().parents[2]
STARTUP_S = 6.0  # model load + join + ICE/DTLS before the first frame, generously
COMPILE_S = 40.0  # more for backends that compile at start (int8 ~22 s on 2 cores, compile ~10 s)
RECOVERY_WINDOW_S = 1.0  # the rolling mean's window
RECOVERY_TOLERANCE_DB = 0.5  # "back within 0.5 dB of a loss-free run"
RECOVERY_MIN_MEASURED = 0.5  # a window needs a known PSNR for at least this share of its frames
RECOVERY_TAIL_S = 0.5  # the last shown frames' PSNR messages may not have arrived: not judged


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)


def _wait_for_line(log: Path, prefix: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if log.exists():
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"no '{prefix}' from {log.name}:\n{log.read_text(errors='replace') if log.exists() else ''}")


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def analyse(frames: list[dict[str, Any]], sender: dict[str, Any], receiver: dict[str, Any], seconds: float,
            loss_end_us: int | None, warmup_s: float = 1.0) -> dict[str, Any]:
    """Numbers of one run from the receiver's frame log and both summaries."""
    if not frames:
        return {"error": "the receiver showed no frames"}
    t0 = frames[0]["shown"] + int(warmup_s * 1e6)  # skip the first second (ramp-up)
    t_end = t0 + int((seconds - warmup_s) * 1e6)
    win = [f for f in frames if t0 <= f["shown"] <= t_end]
    span = max(1e-6, (min(t_end, frames[-1]["shown"]) - t0) / 1e6)
    lat = [f["lat"] for f in win]
    shown_times = [f["shown"] for f in frames]
    gaps = [(b - a) / 1000 for a, b in zip(shown_times, shown_times[1:])]
    out: dict[str, Any] = {
        "delivered_fps": round(len(win) / span, 2),
        "latency_ms": {k: round(percentile(lat, q) or 0, 1) for k, q in (("p50", 50), ("p95", 95), ("p99", 99))},
        "sent": sender.get("sent"), "shown": receiver.get("shown"),
        "shown_pct": round(100 * receiver.get("shown", 0) / max(1, sender.get("sent", 0)), 1),
        "assembled_pct": round(100 * (receiver.get("complete", 0) + receiver.get("concealed", 0))
                               / max(1, sender.get("sent", 0)), 1),
        "complete": receiver.get("complete"), "concealed": receiver.get("concealed"),
        "learned_p_frames": receiver.get("learned"), "learned_mismatched": receiver.get("learned_mismatched"),
        "lost": receiver.get("lost"), "skipped_by_decoder": receiver.get("skipped"),
        "dropped_at_sender": sender.get("dropped"), "capture_dropped": sender.get("capture_dropped"),
        "bad_packets": receiver.get("bad_packets"), "late_slices": receiver.get("late"),
        "verified_bit_exact": receiver.get("verified"), "mismatched": receiver.get("mismatched"),
        "shown_known_broken": receiver.get("known_broken"),
        "longest_freeze_ms": round(max(gaps, default=0), 1),
        "i_frames": sender.get("i_frames"), "p_frames": sender.get("p_frames"),
        "keyframe_requests": sender.get("keyframe_requests"), "target_kbps": sender.get("target_kbps"),
        "recovery": sender.get("recovery"), "refresh_frames": sender.get("refresh_frames"),
    }
    hist = [h for h in sender.get("history", []) if h.get("fps", 0) > 0]
    if hist:
        out["kbps"] = round(sum(h["kbps"] for h in hist) / len(hist), 1)
    if loss_end_us is not None:
        after = [t for t in shown_times if t >= loss_end_us]
        before = [t for t in shown_times if t < loss_end_us]
        seq = ([before[-1]] if before else []) + after
        post = [(b - a) / 1000 for a, b in zip(seq, seq[1:])]
        out["loss_dropped_packets"] = sender.get("loss_dropped")
        out["freeze_after_loss_ms"] = round(max(post, default=float("inf")), 1)
        during = [f for f in frames if f["shown"] < loss_end_us]
        out["during_loss"] = {"frames": len(during),
                              "concealed": sum(1 for f in during if not f["complete"])}
    if seconds >= 120:  # long runs: drift per minute
        minutes: dict[int, list[float]] = {}
        for f in frames:
            minutes.setdefault(int((f["shown"] - frames[0]["shown"]) / 60e6), []).append(f["lat"])
        out["per_minute"] = [{"minute": m, "frames": len(v), "p50": round(percentile(v, 50) or 0, 1),
                              "p95": round(percentile(v, 95) or 0, 1)} for m, v in sorted(minutes.items())]
    for role, summ in (("sender", sender), ("receiver", receiver)):
        h = summ.get("history", [])
        if h:
            out[f"rss_mb_{role}"] = {"start": h[min(2, len(h) - 1)]["rss_mb"], "end": h[-1]["rss_mb"]}
    return out


Shown = tuple[int, bool, "float | None"]  # (shown µs, exact, measured PSNR)


def frame_states(frames: list[dict[str, Any]], events: list[dict[str, Any]]) -> list[Shown]:
    """Each shown frame, in display order: (shown time, exact, PSNR). Exact = complete and its CRC
    verdict (its own line of the frame log) says bit-exact; the PSNR only for an exact frame."""
    verdict: dict[int, bool] = {}
    measured: dict[int, float] = {}
    for e in events:
        if "crc_ok" in e:
            verdict[int(e["f"])] = bool(e["crc_ok"])
        if "psnr" in e:
            measured[int(e["f"])] = float(e["psnr"])
    out: list[Shown] = []
    for f in sorted(frames, key=lambda f: f["shown"]):
        exact = bool(f.get("complete")) and verdict.get(int(f["f"])) is True
        out.append((int(f["shown"]), exact, measured.get(int(f["f"])) if exact else None))
    return out


def window_psnr(states: list[Shown], start_us: int, end_us: int) -> dict[str, Any]:
    """Mean measured PSNR of the exact frames shown in [start, end], and how many frames it saw."""
    win = [s for s in states if start_us <= s[0] <= end_us]
    vals = [s[2] for s in win if s[2] is not None]
    return {"psnr": round(sum(vals) / len(vals), 3) if vals else None, "frames": len(win),
            "exact": sum(1 for s in win if s[1]), "measured": len(vals)}


def recovery(states: list[Shown], loss_end_us: int, end_us: int, baseline_db: float,
             window_s: float = RECOVERY_WINDOW_S, tolerance_db: float = RECOVERY_TOLERANCE_DB,
             min_measured: float = RECOVERY_MIN_MEASURED) -> dict[str, Any]:
    """When the picture is back (see the module docstring): the first exact, measured frame shown
    after loss_end from which on every 1-s window of shown frames passes (all exact, enough of
    them measured, mean PSNR >= baseline - tolerance) up to end_us, and every frame is exact."""
    post = [s for s in states if loss_end_us <= s[0] <= end_us]
    w = int(window_s * 1e6)
    threshold = baseline_db - tolerance_db

    def window(i: int) -> tuple[str | None, float | None]:  # (why it fails or None, mean)
        win = [s for s in post[i:] if s[0] < post[i][0] + w]
        vals = [s[2] for s in win if s[2] is not None]
        mean = sum(vals) / len(vals) if vals else None
        if not all(s[1] for s in win):
            return "not_exact", mean
        if mean is None or len(vals) < min_measured * len(win):
            return "too_few_measured", mean
        return ("below_threshold" if mean < threshold else None), mean

    anchors = [i for i, s in enumerate(post) if s[0] <= end_us - w]  # a whole window fits before the end
    results = {i: window(i) for i in anchors}
    good_from = len(post)  # post[good_from:] are all exact and every window starting there passes
    for i in range(len(post) - 1, -1, -1):
        if not post[i][1] or (i in results and results[i][0] is not None):
            break
        good_from = i
    rec = next((i for i in range(good_from, len(post)) if post[i][2] is not None and i in results), None)
    means = [m for _, m in results.values() if m is not None]
    out: dict[str, Any] = {
        "recovered": rec is not None,
        "recovery_ms": round((post[rec][0] - loss_end_us) / 1000, 1) if rec is not None else None,
        "threshold_db": round(threshold, 3), "windows": len(results),
        "windows_failed": sum(1 for why, _ in results.values() if why is not None),
        "windows_failed_by": {k: sum(1 for why, _ in results.values() if why == k)
                              for k in ("not_exact", "too_few_measured", "below_threshold")},
        "worst_window_db": round(min(means), 3) if means else None,
        "frames": len(post), "not_exact": sum(1 for s in post if not s[1]),
        "measured": sum(1 for s in post if s[2] is not None),
    }
    if rec is not None:
        after = [results[i][1] for i in anchors if i >= rec and results[i][1] is not None]
        out["worst_window_after_recovery_db"] = round(min(after), 3) if after else None
    return out


def loss_recovery(lossy: dict[str, Any], base: dict[str, Any] | None, seconds: float, loss_s: float) -> dict[str, Any]:
    """recovery_ms, psnr_after_loss and psnr_baseline from the raw logs of the lossy run and the
    loss-free one (each {"frames", "events", "loss_end_us"}); windows as in the module docstring."""
    states = frame_states(lossy["frames"], lossy["events"])
    loss_end = lossy.get("loss_end_us")
    out: dict[str, Any] = {"recovery_ms": None, "recovered": False, "psnr_after_loss": None, "psnr_baseline": None}
    if loss_end is None or not states:
        out["recovery_error"] = "the loss never stopped (no loss_end_us from the sender)" if states else "no frames"
        return out
    opened = loss_end - int(loss_s * 1e6)

    def end_of(states: list[Shown], opened: int) -> int:
        return min(opened + int(seconds * 1e6), states[-1][0] - int(RECOVERY_TAIL_S * 1e6))
    end = end_of(states, opened)
    after = window_psnr(states, loss_end, end)
    out["psnr_after_loss"] = after["psnr"]
    out["after_loss"] = {**after, "window_s": round((end - loss_end) / 1e6, 2)}
    if base is None:
        out["recovery_error"] = "no baseline run (--no-baseline)"
        return out
    bstates = frame_states(base["frames"], base["events"])
    if not bstates:
        out["recovery_error"] = "the baseline run showed no frames"
        return out
    b_opened = min(int(f["cap"]) for f in base["frames"])  # its first frame is captured as the call opens
    b_start, b_end = b_opened + int(loss_s * 1e6), end_of(bstates, b_opened)
    bw = window_psnr(bstates, b_start, b_end)
    out["psnr_baseline"] = bw["psnr"]
    out["baseline_window"] = {**bw, "window_s": round((b_end - b_start) / 1e6, 2)}
    if bw["psnr"] is None:
        out["recovery_error"] = "no measured PSNR in the baseline's window"
        return out
    rec = recovery(states, loss_end, end, bw["psnr"])
    out["recovery_ms"], out["recovered"] = rec.pop("recovery_ms"), rec.pop("recovered")
    out["recovery"] = rec
    self_rec = recovery(bstates, b_start, b_end, bw["psnr"])
    out["baseline_self_recovery_ms"] = self_rec["recovery_ms"]
    return out


def _startup_s(backend: str) -> float:
    """Seconds a call needs to start: more for backends that compile at start."""
    return STARTUP_S + (COMPILE_S if backend in ("auto", "int8", "compile", "tensorrt") else 0)


def _start_server(tmp: Path, room: str, secret: str, procs: dict[str, subprocess.Popen[bytes]]) -> str:
    """The call server on a free port (into `procs`); its websocket URL once it listens."""
    procs["server"] = _spawn(["-m", "server", "--port", "0", "--room", room, f"--secret={secret}"], tmp / "server.log")
    line = _wait_for_line(tmp / "server.log", "server listening on", procs["server"], 20)
    return f"ws://{line.rsplit(' ', 1)[1]}/ws"


def call(args: argparse.Namespace, loss: float, measure: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """One call with this loss: its numbers, and the raw logs ({"frames", "events", "loss_end_us"})."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-call-"))
    secret = secrets.token_hex(16)  # hex: never starts with "-", which argparse would take for an option
    room = "bench"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    cpu: dict[str, float | None] = {}
    load0 = os.getloadavg()
    startup = _startup_s(args.backend)
    try:
        ws = _start_server(tmp, room, secret, procs)
        # each end holds its own role's token (docs/protocol.md, "Roles and tokens")
        common = ["--server", ws, "--room", room, "--ice-address", "127.0.0.1",
                  "--weights", args.weights, "--backend", args.backend, "--threads", str(args.threads), "--quiet"]
        if args.rto_min is not None:
            common += ["--sctp-rto-min", str(args.rto_min)]
        procs["receiver"] = _spawn(["-m", "streamer.receive", *common, *_measure_av(args),
                                    f"--token={role_token(secret, room, 'receiver')}", "--frame-log", str(tmp / "frames.jsonl"),
                                    "--summary", str(tmp / "receiver.json")], tmp / "receiver.log")
        time.sleep(0.5)
        loss_s = args.loss_seconds if args.loss_seconds is not None else args.seconds / 2
        send = ["-m", "streamer.send", *common, f"--token={role_token(secret, room, 'sender')}", "--source", args.source, "--fps", str(args.fps),
                "--audio", args.audio, "--transport", args.transport, "--lifetime-ms", str(args.lifetime_ms),
                "--seconds", str(args.seconds + startup), "--summary", str(tmp / "sender.json")]
        if args.size:
            send += ["--size", str(args.size)]
        if args.kbps is not None:
            send += ["--kbps", str(args.kbps)]
        if args.level is not None:
            send += ["--level", str(args.level)]
        if args.recovery is not None:
            send += ["--recovery", args.recovery]
        if args.p_frames is not None:
            send += ["--p-frames", args.p_frames]
        if loss > 0:
            send += ["--simulate-loss", str(loss), "--loss-seconds", str(loss_s)]
        if measure:
            send.append("--measure")
        procs["sender"] = _spawn(send, tmp / "sender.log")
        try:
            procs["sender"].wait(args.seconds + startup + 60)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.5)
        for name in ("receiver", "server"):
            cpu[name] = _cpu_seconds(procs[name].pid)
        for name in ("sender", "receiver", "server"):
            _stop(procs[name])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    load1 = os.getloadavg()

    def read_json(name: str) -> dict[str, Any]:
        try:
            return json.loads((tmp / name).read_text())
        except (OSError, ValueError):
            return {}

    sender, receiver = read_json("sender.json"), read_json("receiver.json")
    records = []
    if (tmp / "frames.jsonl").exists():
        records = [json.loads(l) for l in (tmp / "frames.jsonl").read_text().splitlines() if l.strip()]
    frames = [r for r in records if "shown" in r]  # the shown frames; the rest: CRC verdicts and PSNRs
    events = [r for r in records if "shown" not in r]
    loss_end_us = sender.get("loss_end_us") if loss > 0 else None
    result = analyse(frames, sender, receiver, args.seconds, loss_end_us)
    result.update(sound(receiver))
    wall = args.seconds + startup
    pct: dict[str, float | None] = {}
    for name, summ in (("sender", sender), ("receiver", receiver)):
        pct[name] = round(100 * summ["cpu_s"] / summ["wall_s"], 1) if summ.get("wall_s") else None
    pct["server"] = round(100 * cpu["server"] / wall, 1) if cpu.get("server") is not None else None
    result["cpu_pct"] = pct
    # CPU while frames flow (per-second samples of each program), without start-up and model load
    for name, summ in (("sender", sender), ("receiver", receiver)):
        live = [h["cpu"] for h in summ.get("history", []) if h.get("fps", 0) > 0]
        if live:
            result.setdefault("cpu_pct_in_call", {})[name] = round(sum(live) / len(live), 1)
    result["config"] = {"seconds": args.seconds, "fps": args.fps, "source": args.source, "audio": args.audio,
                        "audio_delay_ms": args.audio_delay_ms, "transport": args.transport,
                        "loss": loss, "loss_seconds": loss_s if loss > 0 else 0, "weights": args.weights,
                        "backend": args.backend, "threads": args.threads, "rto_min": args.rto_min,
                        "kbps": args.kbps, "level": args.level, "recovery": args.recovery, "p_frames": args.p_frames,
                        "measure": measure, "model": sender.get("model")}
    psnrs = [float(e["psnr"]) for e in events if "psnr" in e]
    if psnrs:  # the measured PSNR of the exact frames shown (the receiver's per-second stats, pooled)
        result["psnr_shown_exact"] = round(sum(psnrs) / len(psnrs), 3)
        result["psnr_measured_frames"] = len(psnrs)
    result["machine"] = {"cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in load0],
                         "loadavg_end": [round(x, 2) for x in load1]}
    result["logs"] = str(tmp)
    if not frames:
        for name in ("sender.log", "receiver.log"):
            p = tmp / name
            if p.exists():
                result[name] = p.read_text(errors="replace")[-2000:]
    return result, {"frames": frames, "events": events, "loss_end_us": loss_end_us}


def two_way(args: argparse.Namespace) -> dict[str, Any]:
    """A two-way call: the server and two `streamer.call` processes; numbers per direction."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-call2-"))
    secret, room = secrets.token_hex(16), "bench"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    load0 = os.getloadavg()
    startup = _startup_s(args.backend)
    try:
        ws = _start_server(tmp, room, secret, procs)
        common = ["-m", "streamer.call", "--server", ws, "--room", room, "--ice-address", "127.0.0.1",
                  f"--token={role_token(secret, room, 'caller')}", "--weights", args.weights, "--backend",
                  args.backend, "--threads", str(args.threads), "--quiet", "--source", args.source,
                  "--audio", args.audio, *_measure_av(args),
                  "--fps", str(args.fps), "--transport", args.transport, "--lifetime-ms", str(args.lifetime_ms)]
        for flag, value in (("--size", args.size or None), ("--kbps", args.kbps), ("--level", args.level),
                            ("--recovery", args.recovery), ("--p-frames", args.p_frames),
                            ("--sctp-rto-min", args.rto_min)):
            if value is not None:
                common += [flag, str(value)]
        if args.measure:
            common.append("--measure")
        for name in ("a", "b"):  # a joins first: it offers
            procs[name] = _spawn([*common, "--seconds", str(args.seconds + startup), "--frame-log",
                                  str(tmp / f"frames-{name}.jsonl"), "--summary", str(tmp / f"{name}.json")],
                                 tmp / f"{name}.log")
            time.sleep(0.5)
        for name in ("a", "b"):
            try:
                procs[name].wait(args.seconds + startup + 60)
            except subprocess.TimeoutExpired:
                pass
        _stop(procs["server"])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    load1 = os.getloadavg()
    summ: dict[str, dict[str, Any]] = {}
    frames: dict[str, list[dict[str, Any]]] = {}
    for name in ("a", "b"):
        try:
            summ[name] = json.loads((tmp / f"{name}.json").read_text())
        except (OSError, ValueError):
            summ[name] = {}
        path = tmp / f"frames-{name}.jsonl"
        records = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
        frames[name] = [r for r in records if "shown" in r]
    result: dict[str, Any] = {"two_way": True}
    for direction, src, dst in (("a_to_b", "a", "b"), ("b_to_a", "b", "a")):
        d = analyse(frames[dst], summ[src].get("send", {}), summ[dst].get("recv", {}), args.seconds, None)
        d.update(sound(summ[dst].get("recv", {})))
        live = [h["cpu"] for h in summ[src].get("send", {}).get("history", []) if h.get("fps", 0) > 0]
        if live:
            d["cpu_pct_in_call_of_sender"] = round(sum(live) / len(live), 1)  # one process: both directions
        result[direction] = d
        if "error" in d:
            result["error"] = f"{direction}: {d['error']}"
            result[f"{src}.log"] = (tmp / f"{src}.log").read_text(errors="replace")[-2000:]
    result["config"] = {"seconds": args.seconds, "fps": args.fps, "source": args.source, "audio": args.audio,
                        "audio_delay_ms": args.audio_delay_ms, "transport": args.transport,
                        "weights": args.weights, "backend": args.backend, "threads": args.threads,
                        "kbps": args.kbps, "level": args.level, "recovery": args.recovery,
                        "model": summ["a"].get("send", {}).get("model")}
    result["machine"] = {"cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in load0],
                         "loadavg_end": [round(x, 2) for x in load1]}
    result["logs"] = str(tmp)
    return result


def report_two_way(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [f"two-way call bench: {c['seconds']:g} s, {c['source']} at {c['fps']:g} fps each way, "
             f"kbps {c['kbps'] if c['kbps'] is not None else 'default'}, model {c.get('model') or c['weights']}, "
             f"backend {c['backend']}"]
    for direction in ("a_to_b", "b_to_a"):
        d = r.get(direction, {})
        if "error" in d:
            lines.append(f"  {direction}  failed: {d['error']}")
            continue
        lat = d["latency_ms"]
        lines.append(f"  {direction}  {d['delivered_fps']:.1f} fps  latency p50 {lat['p50']:.0f} / p95 {lat['p95']:.0f}"
                     f" / p99 {lat['p99']:.0f} ms  {d.get('kbps', 0):.0f} kbps  sent {d['sent']} shown {d['shown']}"
                     f"  bit-exact {d['verified_bit_exact']} mismatched {d['mismatched']}  concealed {d['concealed']}"
                     f"  longest freeze {d['longest_freeze_ms']:.0f} ms  cpu (caller) "
                     f"{d.get('cpu_pct_in_call_of_sender', 'n/a')}%")
        lines.extend(report_sound(d, f"  {direction}  "))
    lines.append(f"  load avg {r['machine']['loadavg_start'][0]} -> {r['machine']['loadavg_end'][0]} on "
                 f"{r['machine']['cpus']} cpus; logs {r['logs']}")
    return "\n".join(lines)


def _measure_av(args: argparse.Namespace) -> list[str]:
    """The receiving ends' sound options: lip-sync measured with --audio tone, the alignment."""
    return (["--measure-av"] if args.audio == "tone" else []) + ["--audio-delay-ms", str(args.audio_delay_ms)]


def sound(recv: dict[str, Any]) -> dict[str, Any]:
    """The receiving end's sound numbers: audio frames and ms, and with --audio tone the lip-sync."""
    out: dict[str, Any] = {k: recv.get(k) for k in ("audio_frames", "audio_ms", "audio_delay_ms", "audio_aligned_ms")}
    if "av_sync" in recv:
        out["av_sync"] = recv["av_sync"]
        out["av_offset_ms"] = recv["av_sync"].get("av_offset_ms")
    return out


def report_sound(r: dict[str, Any], indent: str) -> list[str]:
    lines = [f"{indent}sound      {r.get('audio_frames')} audio frames received ({(r.get('audio_ms') or 0) / 1000:.1f} s); "
             f"capture -> play {r.get('audio_delay_ms')} ms at the end, of which alignment delay "
             f"{r.get('audio_aligned_ms')} ms"]
    av = r.get("av_sync")
    if av:
        def fmt(d: dict[str, Any]) -> str:
            return " / ".join("n/a" if d.get(k) is None else f"{d[k]:+.0f}" for k in ("p5", "p50", "p95"))
        lines.append(f"{indent}lip-sync   av_offset_ms p5/p50/p95 {fmt(av['av_offset_ms'])} (+ = sound early; "
                     f"BT.1359: +45 / -125) over {av['pairs']} beeps, {av['within_bt1359']} within; less the "
                     f"flash's capture phase {fmt(av['path_offset_ms'])}; after the marker: sound p50 "
                     f"{av['audio_after_marker_ms']['p50']} ms, picture p50 {av['video_after_marker_ms']['p50']} ms")
    return lines


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The call; with --loss, first the same call without loss (the baseline, unless
    --no-baseline), and the recovery after the loss stops (both senders --measure)."""
    if args.loss <= 0:
        return call(args, 0.0, args.measure)[0]
    base = base_raw = None
    if not args.no_baseline:
        base, base_raw = call(args, 0.0, True)
    result, raw = call(args, args.loss, True)
    if "error" in result:
        return result
    loss_s = result["config"]["loss_seconds"]
    rec = loss_recovery(raw, base_raw if base is not None and "error" not in base else None, args.seconds, loss_s)
    if base is not None and "error" in base:
        rec["recovery_error"] = f"the baseline run failed: {base['error']}"
    freeze = result.get("freeze_after_loss_ms")
    out = {"recovery_ms": rec.pop("recovery_ms"), "recovered": rec.pop("recovered"),
           "psnr_after_loss": rec.pop("psnr_after_loss"), "psnr_baseline": rec.pop("psnr_baseline"),
           "freeze_after_loss_ms": freeze}
    out["issue13"] = {"recovery_within_1s": out["recovery_ms"] is not None and out["recovery_ms"] <= 1000,
                      "no_freeze_over_200ms_after_loss": freeze is not None and freeze <= 200}
    result.update(out)
    result.update(rec)
    if base is not None:
        keep = ("delivered_fps", "latency_ms", "kbps", "shown", "verified_bit_exact", "mismatched", "concealed",
                "longest_freeze_ms", "psnr_shown_exact", "psnr_measured_frames", "i_frames", "cpu_pct_in_call",
                "machine", "logs", "error")
        result["baseline"] = {k: base[k] for k in keep if k in base}
    return result


def _db(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} dB"


def report_recovery(r: dict[str, Any]) -> list[str]:
    a = r.get("after_loss", {})
    psnr = (f"  psnr       after the loss stopped {_db(r['psnr_after_loss'])} ({a.get('measured', 0)} of "
            f"{a.get('frames', 0)} shown frames bit-exact and measured, {a.get('window_s', 0):g} s); loss-free "
            f"run, same window: {_db(r['psnr_baseline'])}")
    lines = [psnr]
    if "recovery_error" in r:
        lines.append(f"  recovery   not measured: {r['recovery_error']}")
        return lines
    rec = r.get("recovery", {})
    how = (f"from then on every shown frame bit-exact and every 1 s window's mean measured PSNR >= "
           f"{_db(rec.get('threshold_db'))}, the baseline - {RECOVERY_TOLERANCE_DB:g} dB")
    if r["recovered"]:
        lines.append(f"  recovery   {r['recovery_ms']:.0f} ms after the loss stopped ({how}; worst window after it "
                     f"{_db(rec.get('worst_window_after_recovery_db'))})")
    else:
        lines.append(f"  recovery   NOT within the run ({how}): {rec.get('windows_failed')} of {rec.get('windows')} "
                     f"windows failed {rec.get('windows_failed_by')}, {rec.get('not_exact')} of {rec.get('frames')} "
                     "frames not bit-exact, "
                     f"worst window {_db(rec.get('worst_window_db'))}")
    i13 = r.get("issue13", {})
    own = r.get("baseline_self_recovery_ms")
    lines.append(f"  issue 13   recovery <= 1 s: {'yes' if i13.get('recovery_within_1s') else 'NO'}; no freeze > 200 ms "
                 f"after the loss: {'yes' if i13.get('no_freeze_over_200ms_after_loss') else 'NO'}; the loss-free run "
                 f"judged so against its own mean: {'never back' if own is None else f'{own:.0f} ms'}")
    b = r.get("baseline")
    if b and "error" not in b:
        lines.append(f"  baseline   loss-free run first: {b.get('delivered_fps')} fps, {b.get('kbps', 0):.0f} kbps, "
                     f"bit-exact {b.get('verified_bit_exact')} of {b.get('shown')} shown, longest freeze "
                     f"{b.get('longest_freeze_ms')} ms, logs {b.get('logs')}")
    return lines


def report(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"call bench failed: {r['error']}\n" + "\n".join(r.get(k, "") for k in ("sender.log", "receiver.log"))
    c, lat = r["config"], r["latency_ms"]
    lines = [
        f"call bench: {c['seconds']:g} s, {c['source']} at {c['fps']:g} fps, {c['transport']} transport, "
        f"loss {c['loss']:g}" + (f" for {c['loss_seconds']:g} s" if c["loss"] else "")
        + f", model {c.get('model') or c['weights']}, backend {c['backend']}",
        f"  delivered  {r['delivered_fps']:.1f} fps   latency p50 {lat['p50']:.0f} ms  p95 {lat['p95']:.0f} ms  "
        f"p99 {lat['p99']:.0f} ms   {r.get('kbps', 0):.0f} kbps",
        f"  frames     sent {r['sent']}  shown {r['shown']} ({r['shown_pct']}%)  assembled {r['assembled_pct']}%  "
        f"complete {r['complete']}  concealed {r['concealed']}  lost {r['lost']}  skipped {r['skipped_by_decoder']}  "
        f"dropped@sender {r['dropped_at_sender']}",
        f"  integrity  bit-exact {r['verified_bit_exact']}  mismatched {r['mismatched']}  bad packets {r['bad_packets']}"
        f"  late slices {r['late_slices']}  longest freeze {r['longest_freeze_ms']:.0f} ms",
    ]
    lines.extend(report_sound(r, "  "))
    if "freeze_after_loss_ms" in r:
        lines.append(f"  loss       {r['loss_dropped_packets']} packets dropped; longest freeze after loss stopped "
                     f"{r['freeze_after_loss_ms']:.0f} ms; during loss {r['during_loss']}")
    if "recovered" in r:
        lines.extend(report_recovery(r))
    elif r.get("psnr_shown_exact") is not None:
        lines.append(f"  psnr       {r['psnr_shown_exact']:.2f} dB (mean of {r['psnr_measured_frames']} measured "
                     "bit-exact shown frames)")
    in_call = "  ".join(f"{k} {v}%" for k, v in r.get("cpu_pct_in_call", {}).items())
    lines.append("  cpu        " + "  ".join(f"{k} {v}%" for k, v in r["cpu_pct"].items())
                 + f"  (while frames flow: {in_call})"
                 + f"   (load avg {r['machine']['loadavg_start'][0]} -> {r['machine']['loadavg_end'][0]} "
                 f"on {r['machine']['cpus']} cpus)")
    for role in ("sender", "receiver"):
        if f"rss_mb_{role}" in r:
            lines.append(f"  rss {role:8s} {r[f'rss_mb_{role}']['start']} -> {r[f'rss_mb_{role}']['end']} MB")
    for m in r.get("per_minute", []):
        lines.append(f"  minute {m['minute']:2d}  {m['frames']} frames  p50 {m['p50']} ms  p95 {m['p95']} ms")
    lines.append(f"  logs       {r['logs']}")
    return "\n".join(lines)


# -- transport only: the two channel designs compared without the codec's CPU load -----------

async def _loopback_pair(cfg: Any) -> tuple[Any, Any, Any, Any]:
    """Two peer connections in this process, offer/answer handed over directly, ICE on 127.0.0.1."""
    from streamer import transport as T

    a, b = T.create_peer_connection(), T.create_peer_connection()
    latents, _meta = T.create_channels(a, cfg)
    received: list[Any] = []
    opened = asyncio.Event()
    b.on("datachannel", lambda ch: ch.label == T.LATENT_LABEL and ch.on("message", received.append))
    latents.on("open", opened.set)
    offer = await T.make_offer(a, ["127.0.0.1"])
    answer = await T.accept_offer(b, offer, ["127.0.0.1"])
    await T.accept_answer(a, answer, ["127.0.0.1"])
    await asyncio.wait_for(opened.wait(), 30)
    return a, b, latents, received


async def _transport_run(mode: str, args: argparse.Namespace, packets_of: Any, codec: Any) -> dict[str, Any]:
    """Send pre-encoded frames of the sample clip at --fps for --seconds over one design; the
    receiving side only reassembles (no decode). Latency here is send -> frame assembled."""
    from streamer import transport as T
    from streamer.assembler import FrameAssembler

    cfg = T.TransportConfig(mode, args.lifetime_ms)
    a, b, channel, received = await _loopback_pair(cfg)
    asm = FrameAssembler(codec, latent_shape=codec.latent_shape(args.size or codec.frame_size))
    ready: list[tuple[int, int, bool]] = []  # (frame, assembled µs, complete)
    sent_at: dict[int, int] = {}
    sender = T.ChannelSender(channel, cfg.buffer_threshold)
    inj = T.LossInjector(a, args.loss, seed=1) if args.loss > 0 else None
    t3 = [0]  # SCTP retransmission timer expiries at the sender (each one resets cwnd to 1 MTU)
    sctp = a.sctp
    t3_orig = sctp._t3_expired

    def t3_count() -> None:
        t3[0] += 1
        t3_orig()
    sctp._t3_expired = t3_count
    loss_s = args.loss_seconds if args.loss_seconds is not None else args.seconds / 2
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    loss_end_us = None
    n = 0
    period = 1.0 / args.fps
    next_t = t0
    taken = 0

    def drain() -> None:
        nonlocal taken
        now = time.time_ns() // 1000
        while taken < len(received):
            for f in asm.add(received[taken]):
                ready.append((f.frame_number, now, f.complete))
            taken += 1
        for f in asm.poll():
            ready.append((f.frame_number, now, f.complete))

    while loop.time() - t0 < args.seconds:
        if inj is not None and loss_end_us is None and loop.time() - t0 >= loss_s:
            inj.p = 0.0
            loss_end_us = time.time_ns() // 1000
        ts = time.time_ns() // 1000
        if sender.send_frame(packets_of(n, ts, cfg.max_packet_bytes)):
            sent_at[n] = ts
            n += 1
        next_t += period
        while loop.time() < next_t:  # poll the receiving side at 1 ms, like a busy event loop would
            drain()
            await asyncio.sleep(0.001)
    await asyncio.sleep(0.3)
    drain()
    await a.close()
    await b.close()
    lat = [(t - sent_at[f]) / 1000 for f, t, _ in ready if f in sent_at]
    times = [t for _, t, _ in ready]
    gaps = [(y - x) / 1000 for x, y in zip(times, times[1:])]
    out: dict[str, Any] = {
        "transport": mode, "loss": args.loss, "sent": n, "dropped_at_sender": sender.frames_dropped,
        "frames_ready": len(ready), "ready_pct": round(100 * len(ready) / max(1, n), 1),
        "complete_pct": round(100 * sum(1 for r in ready if r[2]) / max(1, n), 1),
        "latency_ms": {k: round(percentile(lat, q) or 0, 2) for k, q in (("p50", 50), ("p95", 95), ("p99", 99))},
        "longest_freeze_ms": round(max(gaps, default=0), 1),
        "packets_dropped": inj.dropped if inj else 0, "t3_expiries": t3[0],
    }
    if loss_end_us is not None:
        seq = [t for t in times if t < loss_end_us][-1:] + [t for t in times if t >= loss_end_us]
        out["freeze_after_loss_ms"] = round(max(((y - x) / 1000 for x, y in zip(seq, seq[1:])), default=0), 1)
        out["freeze_during_loss_ms"] = round(max(((y - x) / 1000 for x, y in zip(times, times[1:])
                                                   if y < loss_end_us), default=0), 1)
    return out


def transport_only(args: argparse.Namespace) -> dict[str, Any]:
    from streamer import transport as T
    from streamer.cli import load_codec
    from streamer.sources import open_source

    codec = load_codec(args.weights, "eager", args.threads)
    T.tune_sctp(args.rto_min if args.rto_min is not None else T.DEFAULT_RTO_MIN_S)
    # at the call's rate: a file plays at its own speed, so a faster capture would repeat pictures
    src = open_source(args.source, args.size or codec.frame_size, args.fps, quiet=True)
    frames = []

    async def grab() -> None:
        src.start()
        while len(frames) < 30:
            frames.append(codec.encode((await src.frame()).image))
    asyncio.run(grab())
    src.close()

    def packets_of(n: int, ts: int, max_bytes: int | None) -> list[bytes]:
        return codec.pack(frames[n % len(frames)], n, ts, max_bytes)

    modes = ["slices", "lifetime"] if args.transport == "both" else [args.transport]
    runs = [asyncio.run(_transport_run(m, args, packets_of, codec)) for m in modes]
    return {"transport_only": runs, "config": {"seconds": args.seconds, "fps": args.fps, "loss": args.loss,
                                               "rto_min": args.rto_min, "lifetime_ms": args.lifetime_ms},
            "machine": {"cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()]}}


def report_transport(r: dict[str, Any]) -> str:
    lines = [f"transport only (one process, no decode): {r['config']['seconds']:g} s at {r['config']['fps']:g} fps, "
             f"loss {r['config']['loss']:g}; load avg {r['machine']['loadavg'][0]} on {r['machine']['cpus']} cpus"]
    for x in r["transport_only"]:
        lat = x["latency_ms"]
        line = (f"  {x['transport']:8s} ready {x['ready_pct']:5.1f}%  complete {x['complete_pct']:5.1f}%  "
                f"send->assembled p50 {lat['p50']:.1f} p95 {lat['p95']:.1f} p99 {lat['p99']:.1f} ms  "
                f"longest freeze {x['longest_freeze_ms']:.0f} ms  dropped@sender {x['dropped_at_sender']}  T3 {x['t3_expiries']}")
        if "freeze_after_loss_ms" in x:
            line += f"  freeze during/after loss {x['freeze_during_loss_ms']:.0f}/{x['freeze_after_loss_ms']:.0f} ms"
        lines.append(line)
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m streamer.bench call", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--loss", type=float, default=0.0, help="drop outgoing SCTP packets with this probability")
    ap.add_argument("--loss-seconds", type=float, default=None, help="loss lasts this long (default: half the run)")
    ap.add_argument("--transport", choices=("slices", "lifetime", "both"), default="slices",
                    help="channel design (both: only with --transport-only)")
    ap.add_argument("--transport-only", action="store_true",
                    help="compare the channel designs without the codec: pre-encoded frames, no decode, one process")
    ap.add_argument("--lifetime-ms", type=int, default=100)
    ap.add_argument("--source", default=None, help="the senders' --source (default sample; sample:flash "
                    "with --audio tone)")
    ap.add_argument("--audio", default="auto", help="the senders' --audio (default auto: the sample clip's own "
                    "sound); tone: measure lip-sync")
    ap.add_argument("--audio-delay-ms", default="auto", help="the receiving ends' --audio-delay-ms (default auto: "
                    "sound that would come before its pictures is delayed; 0: never)")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--size", type=int, default=0)
    ap.add_argument("--kbps", type=float, default=None, help="the sender's bitrate target (default: its own, 300)")
    ap.add_argument("--level", type=int, default=None, help="a fixed quantizer level instead of --kbps")
    ap.add_argument("--recovery", choices=("keyframe", "refresh"), default=None,
                    help="the sender's answer to a broken reference (default: its own)")
    ap.add_argument("--p-frames", choices=("tables", "learned"), default=None,
                    help="the sender's P-frames (default: its own, tables)")
    ap.add_argument("--weights", default="default")
    ap.add_argument("--backend", choices=CHOICES, default="eager",
                    help="sender and receiver backend (int8 adds ~20 s of start-up compilation)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--measure", action="store_true",
                    help="the sender also decodes and reports PSNR (always on with --loss: the recovery needs it)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="with --loss: skip the loss-free run first (no psnr_baseline, no recovery_ms)")
    ap.add_argument("--rto-min", type=float, default=None, help="SCTP minimum RTO in seconds (aiortc: 1)")
    ap.add_argument("--two-way", action="store_true",
                    help="a two-way call (streamer.call): two callers, numbers per direction")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.source is None:
        args.source = "sample:flash" if args.audio == "tone" else "sample"
    if args.transport_only:
        r = transport_only(args)
        print(json.dumps(r) if args.json else report_transport(r))
        return 0
    if args.transport == "both":
        print("call bench: --transport both needs --transport-only", file=sys.stderr)
        return 2
    if args.two_way and args.loss > 0:
        print("call bench: --two-way has no --loss", file=sys.stderr)
        return 2
    measure, describe = (two_way, report_two_way) if args.two_way else (run, report)
    try:
        r = measure(args)
    except RuntimeError as e:
        print(f"call bench: {e}", file=sys.stderr)
        return 1
    print(json.dumps(r) if args.json else describe(r))
    return 0 if "error" not in r else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
