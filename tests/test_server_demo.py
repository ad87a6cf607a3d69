"""`python -m streamer.demo` (what `make demo` runs): server + receiver + sender come up, the
printed URL shows a live call to a viewer, and Ctrl-C stops everything cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from websockets.asyncio.client import connect

from server.protocol import unpack_frame

ROOT = Path(__file__).resolve().parents[1]


async def watch(url: str, seconds: float) -> tuple[dict[int, int], dict[str, dict]]:
    """Join the printed URL's room as a viewer; count pictures per kind and keep last stats
    (until a receiver's stats show frames: the first ones may predate the call)."""
    parts = urlsplit(url)
    q = parse_qs(parts.query)
    ws = await connect(f"ws://{parts.netloc}/ws", compression=None, max_size=2**23)
    await ws.send(json.dumps({"type": "join", "room": q["room"][0], "token": q["token"][0],
                              "role": "viewer"}))
    kinds: dict[int, int] = {}
    stats: dict[str, dict] = {}

    def live() -> bool:
        return stats.get("receiver", {}).get("fps", 0) > 0

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (kinds.get(1, 0) >= 5 and len(stats) == 2 and live()):
        try:
            m = await asyncio.wait_for(ws.recv(), 1)
        except asyncio.TimeoutError:
            continue
        if isinstance(m, bytes):
            kind = unpack_frame(m)[0].kind  # (the header's format byte comes first)
            kinds[kind] = kinds.get(kind, 0) + 1
        elif (msg := json.loads(m))["type"] == "stats":
            stats[msg["from_role"]] = msg["stats"]
    await ws.close()
    return kinds, stats


def check_demo(cmd: list[str], cwd: Path) -> None:
    """Run a demo command; its printed viewers' link must show a live call (decoded pictures,
    originals and both ends' stats), serve the page, and Ctrl-C must stop everything."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    output: list[str] = []
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            output.append(line)
            if "http://127.0.0.1:" in line:
                url = line.strip()
        assert url and "room=demo&token=" in url, "".join(output)
        assert url.endswith("&role=viewer"), url  # the page gets the view-only link
        with urllib.request.urlopen(url, timeout=10) as page:  # the page itself, not a 404
            html = page.read().decode()
        assert page.status == 200 and "<canvas" in html and "app.js" in html, html[:300]
        kinds, stats = asyncio.run(watch(url, 60))
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.2)
    while not lines.empty():
        output.append(lines.get())
    text = "".join(output)
    assert kinds.get(1, 0) >= 5, (kinds, text)  # decoded pictures at the printed URL
    assert kinds.get(2, 0) >= 1, (kinds, text)  # and the sender's originals
    assert set(stats) == {"sender", "receiver"}
    # frames really went through the call: the receiver showed some in its last second
    assert stats["receiver"]["fps"] > 0, stats
    assert proc.returncode == 0 and "Traceback" not in text, text
    port = urlsplit(url).port
    with pytest.raises(OSError):  # the server is gone with the demo
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


@pytest.mark.slow
def test_demo_brings_up_a_viewable_call_and_stops_cleanly() -> None:
    check_demo([sys.executable, "-m", "streamer.demo", "--port", "0"], ROOT)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_installed_wheel_runs_the_demo_from_another_folder(tmp_path) -> None:
    """`pip install .` (not editable) into a fresh venv, torch pinned first as the Makefile
    does; then `neural-call demo` from a folder that is not the checkout."""
    wheels, venv, elsewhere = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()

    def sh(*cmd: str | Path) -> None:
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])

    sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, ROOT)
    (wheel,) = wheels.glob("neural_video_call-*.whl")
    sh(sys.executable, "-m", "venv", venv)
    sh(venv / "bin" / "pip", "install", "-q", "torch==2.13.*")
    sh(venv / "bin" / "pip", "install", "-q", wheel)
    check_demo([str(venv / "bin" / "neural-call"), "demo", "--port", "0"], elsewhere)


def test_demo_kills_an_end_that_ignores_ctrl_c_and_says_so(monkeypatch, capsys):
    """A child that does not stop on Ctrl-C is killed after STOP_WAIT_S and named, so the demo
    itself always ends (a hung child once held a demo for 30 s and outlived it)."""
    from streamer import demo

    monkeypatch.setattr(demo, "STOP_WAIT_S", 0.5)
    d = demo.Demo(demo.parse_args([]))
    stubborn = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    polite = "import time; print('up', flush=True); time.sleep(60)"  # Ctrl-C ends it
    for name, code in (("receiver", polite), ("sender", stubborn), ("server", polite)):
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline() == "up\n"  # its handler is in place
        d.children.append((name, p))
    t0 = time.monotonic()
    d.stop()
    took = time.monotonic() - t0
    assert all(p.poll() is not None for _, p in d.children)
    assert d.killed == ["sender"] and took < 5, (d.killed, took)
    assert "the sender did not stop within 0.5 s of Ctrl-C; killed it" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_stops_a_demo_started_in_the_background() -> None:
    """A shell starts a background job with SIGINT ignored, and Python keeps it ignored unless
    told otherwise: Ctrl-C (SIGINT) must still stop the demo and its children."""
    proc = subprocess.Popen([sys.executable, "-m", "streamer.demo", "--port", "0"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # (the server and both ends are up once this is printed)
            if "Ctrl-C stops everything" in line:
                break
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(20)
        assert rc == 0 and time.monotonic() - t0 < 12, (rc, time.monotonic() - t0)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # (the demo stops its children on SIGTERM too)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
            proc.kill()
