"""The call's programs as a user runs them: every mistake is one line and exit code 2, said
before anything connects; Ctrl-C ends both ends within seconds, without a traceback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def closed_port() -> int:
    """A port nobody listens on: a program that tried to connect would fail there instead."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(module: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env, stdin=subprocess.DEVNULL)


NOWHERE = ["--server", f"ws://127.0.0.1:{closed_port()}/ws", "--room", "demo", "--token", "t"]

MISTAKES = [
    # (module, extra argv, what the one line must say)
    ("streamer.send", ["--size", "100"], "--size 100"),
    ("streamer.send", ["--size", "-8"], "--size must be"),
    ("streamer.send", ["--source", "no-such-clip.mp4"], "no such file: no-such-clip.mp4"),
    ("streamer.send", ["--source", "webcamm"], "unknown source"),
    ("streamer.send", ["--fps", "0"], "--fps must be"),
    ("streamer.send", ["--level", "99"], "quantizer level 99"),
    ("streamer.send", ["--simulate-loss", "1.5"], "--simulate-loss"),
    ("streamer.send", ["--weights", "/no/such/weights"], "weights"),
    ("streamer.send", ["--threads", "0"], "--threads"),
    ("streamer.send", ["--ice-address", "not-an-ip"], "not an IP address"),
    ("streamer.receive", ["--size", "100"], "--size 100"),
    ("streamer.receive", ["--record", "/proc/no/such/dir/out.mp4"], "--record"),
    ("streamer.receive", ["--deadline-ms", "0"], "--deadline-ms"),
    ("streamer.receive", ["--seconds", "-1"], "--seconds"),
    ("streamer.receive", ["--weights", "/no/such/weights"], "weights"),
]


@pytest.mark.parametrize("module,argv,says", MISTAKES, ids=[f"{m.split('.')[1]} {' '.join(a)}" for m, a, _ in MISTAKES])
def test_a_mistake_is_one_line_and_exit_2_before_connecting(module, argv, says, capsys):
    """In-process through the programs' own `main` (what `python -m` runs), for speed; the
    test below runs one as a real process."""
    import importlib

    code = importlib.import_module(module).main([*NOWHERE, *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert says in lines[0] and "Traceback" not in err
    assert "cannot reach the call server" not in lines[0]  # said before trying to connect


def test_without_a_server_the_one_line_says_so():
    r = run("streamer.receive", *NOWHERE)
    assert r.returncode == 2 and "cannot reach the call server" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


class Program:
    """One end of a call as a child process, its output read as it comes."""

    def __init__(self, module: str, *argv: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", module, *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, k=sink: [k.append(line) for line in s], daemon=True).start()

    def wait_for(self, text: str, timeout: float = 90) -> None:
        end = time.monotonic() + timeout
        while not any(text in line for line in self.out):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"no {text!r}; out: {''.join(self.out)} err: {''.join(self.err)}")
            time.sleep(0.05)

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def ended_within(self, seconds: float) -> float:
        t0 = time.monotonic()
        try:
            self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            spy = Path(sys.executable).with_name("py-spy")  # where it is installed: say where it hangs
            if spy.exists():
                subprocess.run([str(spy), "dump", "--pid", str(self.proc.pid)], timeout=30)
            self.proc.kill()
            raise AssertionError(f"still running {seconds} s after Ctrl-C; out: {''.join(self.out[-5:])}")
        return time.monotonic() - t0


@pytest.mark.slow
def test_ctrl_c_ends_both_ends_within_3_s_even_while_the_other_leaves():
    """The race that hung the receiver: Ctrl-C reaches it while the sender is leaving (its
    teardown of the peer connection swallows the cancellation). Three calls, three ways."""
    from server.app import serve_in_thread

    with serve_in_thread(rooms={"demo": "secret"}) as srv:
        common = ["--ice-address", "127.0.0.1"]
        for order in ("together", "sender first", "receiver first"):
            rx = Program("streamer.receive", "--url", srv.join_url("demo", "receiver"), *common)
            tx = Program("streamer.send", "--url", srv.join_url("demo", "sender"), "--source", "synthetic",
                         "--fps", "10", *common)
            rx.wait_for("call open")
            rx.wait_for("fps")  # frames are flowing
            first, second = (tx, rx) if order != "receiver first" else (rx, tx)
            first.interrupt()
            if order != "together":
                time.sleep(0.3)
            second.interrupt()
            for p in (first, second):
                took = p.ended_within(3.0)
                assert p.proc.returncode == 0, (order, "".join(p.err))
                assert "Traceback" not in "".join(p.err), (order, took, "".join(p.err))


@pytest.mark.slow
def test_receiver_says_when_the_sender_leaves_and_comes_back():
    from server.app import serve_in_thread

    with serve_in_thread(rooms={"demo": "secret"}) as srv:
        common = ["--ice-address", "127.0.0.1"]
        rx = Program("streamer.receive", "--url", srv.join_url("demo", "receiver"), *common)
        rx.wait_for("waiting for a sender")
        tx = Program("streamer.send", "--url", srv.join_url("demo", "sender"), "--source", "synthetic", "--fps", "10",
                     *common)
        rx.wait_for("call open")
        tx.interrupt()
        tx.ended_within(3.0)
        rx.wait_for("the sender left")
        tx = Program("streamer.send", "--url", srv.join_url("demo", "sender"), "--source", "synthetic", "--fps", "10",
                     *common)
        rx.wait_for("call open again")
        for p in (tx, rx):
            p.interrupt()
        for p in (tx, rx):
            p.ended_within(3.0)


@pytest.mark.slow
def test_receiver_says_why_it_refuses_a_sender_of_another_size():
    """A sender at --size 160 and a receiver at the model's 224: instead of a silent call
    without pictures, the receiver says what it refuses; with --size 160 the same call works."""
    from server.app import serve_in_thread

    with serve_in_thread(rooms={"demo": "secret"}) as srv:
        common = ["--ice-address", "127.0.0.1"]
        for receiver_size, works in ((None, False), ("160", True)):
            size = ["--size", receiver_size] if receiver_size else []
            rx = Program("streamer.receive", "--url", srv.join_url("demo", "receiver"), *common, *size)
            tx = Program("streamer.send", "--url", srv.join_url("demo", "sender"), "--source", "synthetic",
                         "--fps", "10", "--size", "160", *common)
            rx.wait_for("call open")
            if works:
                rx.wait_for("| lat ")  # a stats line with latencies: frames were shown
                assert not any("refusing" in line for line in rx.err), "".join(rx.err)
            else:
                end = time.monotonic() + 30
                while not any("refusing the sender's packets" in line for line in rx.err):
                    assert time.monotonic() < end, "".join(rx.out + rx.err)
                    time.sleep(0.1)
                assert any("24x20x20" in line and "24x28x28" in line for line in rx.err), "".join(rx.err)
            for p in (tx, rx):
                p.interrupt()
            for p in (tx, rx):
                p.ended_within(3.0)


# -- ICE servers: --stun, --turn, --turn-user, --turn-credential -------------------------------
# Documentation addresses (RFC 5737) only: nothing here gathers candidates or contacts a server.

TURN_MISTAKES = [
    (["--turn", "stun:192.0.2.1:3478", "--turn-user", "u", "--turn-credential", "p"], "the scheme must be turn: or turns:"),
    (["--turn", "http://192.0.2.1:3478", "--turn-user", "u", "--turn-credential", "p"], "is not a TURN URL"),
    (["--turn", "turn:192.0.2.1:3478"], "needs --turn-user"),
    (["--turn", "turn:192.0.2.1:3478", "--turn-user", "u"], "needs --turn-credential or $STREAMER_TURN_CREDENTIAL"),
    (["--turn", "turn:192.0.2.1:0", "--turn-user", "u", "--turn-credential", "p"], "the port must be a number in 1..65535"),
    (["--turn", "turn:192.0.2.1:70000", "--turn-user", "u", "--turn-credential", "p"], "the port must be"),
    (["--turn", "turn:192.0.2.1:34x", "--turn-user", "u", "--turn-credential", "p"], "the port must be"),
    (["--turn", "turn:192.0.2.1?transport=sctp", "--turn-user", "u", "--turn-credential", "p"], "?transport=udp|tcp"),
    (["--turn", "turns:192.0.2.1?transport=udp", "--turn-user", "u", "--turn-credential", "p"], "?transport=tcp"),
    (["--turn-user", "u"], "without --turn"),
    (["--stun", "turn:192.0.2.1:3478"], "the scheme must be stun: or stuns:"),
    (["--stun", "stun:192.0.2.1:port"], "the port must be"),
]


@pytest.mark.parametrize("module", ["streamer.send", "streamer.receive", "streamer.call"])
@pytest.mark.parametrize("argv,says", TURN_MISTAKES, ids=[" ".join(a) for a, _ in TURN_MISTAKES])
def test_a_bad_ice_server_is_one_line_and_exit_2_before_connecting(module, argv, says, capsys, monkeypatch):
    import importlib

    monkeypatch.delenv("STREAMER_TURN_CREDENTIAL", raising=False)
    code = importlib.import_module(module).main([*NOWHERE, *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in err, err
    assert "cannot reach the call server" not in lines[0]
    assert "--turn-credential" not in argv or "'p'" not in lines[0]  # the secret is never echoed


def common_args(argv: list[str]):
    import argparse

    from streamer import cli

    ap = argparse.ArgumentParser()
    cli.add_common_args(ap)
    args = ap.parse_args(argv)
    cli.check_common_args(args)
    return args


def test_turn_reaches_the_peer_connections_configuration(monkeypatch):
    """--turn with user and credential (the credential from the environment) becomes an
    RTCIceServer beside the STUN one, and aiortc's ICE layer reads it as its TURN server."""
    from aiortc import RTCIceServer
    from aiortc.rtcicetransport import connection_kwargs

    from streamer import transport as T

    monkeypatch.setenv("STREAMER_TURN_CREDENTIAL", "s3cret")
    args = common_args(["--stun", "stun:192.0.2.1:3478", "--turn", "turn:192.0.2.2:3479?transport=tcp",
                        "--turn-user", "alice"])
    assert args.ice_servers == [RTCIceServer(urls="stun:192.0.2.1:3478"),
                                RTCIceServer(urls="turn:192.0.2.2:3479?transport=tcp", username="alice",
                                             credential="s3cret")]
    pc = T.create_peer_connection(args.stun)  # what the programs hand it
    try:
        servers = pc._RTCPeerConnection__configuration.iceServers
        assert servers == args.ice_servers
        kw = connection_kwargs(servers)
        assert kw["stun_server"] == ("192.0.2.1", 3478)
        assert (kw["turn_server"], kw["turn_transport"], kw["turn_ssl"]) == (("192.0.2.2", 3479), "tcp", False)
        assert (kw["turn_username"], kw["turn_password"]) == ("alice", "s3cret")
    finally:
        import asyncio

        asyncio.run(pc.close())


def test_turn_credential_on_the_command_line_wins_and_defaults_are_aiortcs(monkeypatch):
    from aiortc.rtcicetransport import connection_kwargs

    monkeypatch.setenv("STREAMER_TURN_CREDENTIAL", "from-env")
    args = common_args(["--turn", "turn:192.0.2.2", "--turn-user", "bob", "--turn-credential", "from-cli"])
    kw = connection_kwargs(args.ice_servers)
    assert (kw["turn_server"], kw["turn_transport"], kw["turn_password"]) == (("192.0.2.2", 3478), "udp", "from-cli")
    assert "stun_server" not in kw


def test_no_ice_server_unless_asked(monkeypatch):
    """The default stays offline: no STUN or TURN server, even with the credential exported."""
    monkeypatch.setenv("STREAMER_TURN_CREDENTIAL", "s3cret")
    args = common_args([])
    assert args.ice_servers == [] and args.stun == []
    from streamer import transport as T

    pc = T.create_peer_connection(args.stun)
    try:
        assert pc._RTCPeerConnection__configuration.iceServers == []
    finally:
        import asyncio

        asyncio.run(pc.close())
