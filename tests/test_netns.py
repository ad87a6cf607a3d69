"""A call between two hosts: the server and the receiver in one network namespace, the sender
in another, joined by a veth pair (`tests/netns.py`), so signaling (TCP) and the call (ICE over
UDP) really cross a network link; and the same over a link with 40 ms delay and 2 % loss each
way (netem, or the userspace bridge where the kernel has no netem). ICE gathers on the veth
addresses only; nothing is sent anywhere but the other namespace. Run as the user does: the
server's printed links, `python -m streamer.receive` / `streamer.send`, their --summary JSON.
And a call through a TURN relay (coturn, where `turnserver` is installed) between two hosts
that cannot reach each other. Skipped, with the reason, where namespaces cannot be made (not
root, no `ip`, EPERM) or coturn is missing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import netns
from netns import PYTHON, hosts  # noqa: F401 - hosts is the fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
CALL_S = 10  # seconds of call after it opens (10 fps: ~100 frames)


def call_across(link: netns.Link, tmp_path: Path) -> tuple[dict, dict]:
    """Server + receiver on host a, sender on host b; CALL_S seconds of call; both summaries."""
    links = netns.start_server(link.a, "netns")
    assert links["sender"].startswith(f"http://{link.a.addr}:8765/"), links
    rx = link.a.start([PYTHON, "-m", "streamer.receive", "--url", links["receiver"], "--ice-address", link.a.addr,
                       "--summary", str(tmp_path / "rx.json")], "receive")
    rx.wait_for("waiting for a sender", 120)
    tx = link.b.start([PYTHON, "-m", "streamer.send", "--url", links["sender"], "--ice-address", link.b.addr,
                       "--source", "synthetic", "--fps", "10", "--summary", str(tmp_path / "tx.json")], "send")
    rx.wait_for("call open", 120)
    time.sleep(CALL_S)
    assert tx.stop(10) == 0, tx.describe()
    assert rx.stop(10) == 0, rx.describe()
    for p in (rx, tx):
        assert "Traceback" not in "".join(p.err), p.describe()
    return json.loads((tmp_path / "rx.json").read_text()), json.loads((tmp_path / "tx.json").read_text())


def brief(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "history"}


def test_netns_link_is_made_and_removed():
    """The fixture's own promise: the namespaces exist inside the block, are gone after it,
    also when the block fails."""
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    made = []
    with pytest.raises(RuntimeError, match="inside"):
        with netns.two_hosts() as link:
            made = list(link.namespaces)
            listed = netns._ip("netns", "list").stdout
            assert all(ns in listed for ns in made)
            r = link.b.run(PYTHON, "-c", f"import socket; socket.create_connection(('{link.a.addr}', 9), 3)")
            assert "Connection refused" in r.stderr  # b reaches a (nobody listens on 9): the link works
            raise RuntimeError("failure inside the block")
    listed = netns._ip("netns", "list").stdout
    assert made and not any(ns in listed for ns in made), listed


def test_call_across_two_namespaces(hosts, tmp_path):  # noqa: F811
    rxs, txs = call_across(hosts, tmp_path)
    print(f"receiver {brief(rxs)}; sender {brief(txs)}")
    sent = txs["sent"]
    assert sent >= 5 * CALL_S, txs
    assert rxs["shown"] >= 0.8 * sent, (rxs, txs)
    assert rxs["mismatched"] == 0 and rxs["verified"] >= 0.8 * rxs["shown"], rxs
    assert rxs["latency_ms"]["p50"] > 0, rxs


def test_two_way_call_across_two_namespaces(hosts, tmp_path):  # noqa: F811
    """The two-way call as two people run it from one caller link: the server and caller A on
    host a, caller B on host b, one peer connection across the link. Both directions' frames
    are verified bit-exact, and each caller's sound (the tone source) reaches the other."""
    links = netns.start_server(hosts.a, "netns-call")
    callers = []
    for host, name in ((hosts.a, "a"), (hosts.b, "b")):
        p = host.start([PYTHON, "-m", "streamer.call", "--url", links["caller"], "--ice-address", host.addr,
                        "--source", "synthetic", "--fps", "10", "--audio", "tone",
                        "--summary", str(tmp_path / f"{name}.json")], f"call-{name}")
        p.wait_for("joined room", 120)
        callers.append(p)
    for p in callers:
        p.wait_for("call open", 120)
    time.sleep(CALL_S)
    for p in reversed(callers):
        assert p.stop(10) == 0, p.describe()
        assert "Traceback" not in "".join(p.err), p.describe()
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    print(f"a: send {brief(a['send'])} recv {brief(a['recv'])}; b: send {brief(b['send'])} recv {brief(b['recv'])}")
    for name, tx, rx in (("a->b", a["send"], b["recv"]), ("b->a", b["send"], a["recv"])):
        assert tx["sent"] >= 5 * CALL_S, (name, tx)
        assert rx["shown"] >= 0.7 * tx["sent"], (name, rx, tx)
        assert rx["mismatched"] == 0 and rx["verified"] >= 0.5 * rx["shown"], (name, rx)
        assert rx["audio_frames"] >= 25 * CALL_S, (name, rx)  # 50 a second were sent: most arrived


@pytest.mark.parametrize("hosts", [{"delay_ms": 40, "loss": 0.02}], indirect=True, ids=["delay40ms-loss2pct"])
def test_call_across_a_delayed_lossy_link(hosts, tmp_path):  # noqa: F811
    """40 ms and 2 % loss each way: most frames still shown, none taken for another, references
    verified again after each loss; the delay shows in capture-to-display latency (both
    namespaces share one clock)."""
    rxs, txs = call_across(hosts, tmp_path)
    stats = hosts.impairment_stats()
    print(f"impairment {hosts.impairment}: {stats}; receiver {brief(rxs)}; sender {brief(txs)}")
    assert stats["dropped"] > 0 and stats["passed"] > 100, (hosts.impairment, stats)  # the link really lost packets
    sent = txs["sent"]
    assert sent >= 5 * CALL_S, txs
    assert rxs["shown"] >= 0.7 * sent, (rxs, txs)
    # no frame is taken for the sender's when it is not; between losses the receiver's reference
    # is proven bit-exact again (recovery works over a real link). Measured here (bridge, 10 fps):
    # with a fixed 100 ms slice deadline, 13-42 of 84-94 shown were verified in four runs, since
    # slices came after it ("late": 27-39) once SCTP's window shrank after a loss at this RTT;
    # with the deadline learning the gaps between slices (assembler.current_deadline_s), 47 of
    # 98, no late slices, the rest shown on a reference known broken while it recovered.
    assert rxs["mismatched"] == 0 and rxs["verified"] >= 5, rxs
    assert rxs["verified"] + rxs["known_broken"] >= 0.85 * rxs["complete"], rxs  # meta may be lost too
    assert rxs["latency_ms"]["p50"] >= 40, rxs["latency_ms"]  # the link's one-way delay is in it


def test_call_through_a_turn_relay_when_no_direct_path_exists(tmp_path):
    """Two hosts that cannot reach each other (no route, the middle host forwards nothing) and a
    third both reach, running the call server and a TURN relay (coturn): with `--turn` on both
    ends, user and credential (from $STREAMER_TURN_CREDENTIAL), the call connects through the
    relay and delivers bit-exact frames."""
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    try:
        cm = netns.relay_hosts()
        link = cm.__enter__()
    except netns.NetnsUnavailable as e:
        pytest.skip(str(e))
    try:
        try:
            turn = netns.start_turn_server(link.t_a, link.t_b, "alice", "relay-pass", tmp_path)
        except netns.NetnsUnavailable as e:
            pytest.skip(str(e))
        r = link.a.run(PYTHON, "-c", f"import socket; socket.create_connection(('{link.b.addr}', 9), 3)")
        assert "unreachable" in r.stderr, r.stderr  # no direct path: a cannot even send to b
        server = link.t_a.start([PYTHON, "-m", "server", "--host", "0.0.0.0", "--port", "8765", "--room", "relay",
                                 "--secret", "netns-test-secret"], "server")
        links = netns.join_links_of(server)
        env = {"STREAMER_TURN_CREDENTIAL": "relay-pass"}
        rx = link.a.start([PYTHON, "-m", "streamer.receive", "--url", netns.with_host(links["receiver"], link.t_a.addr),
                           "--ice-address", link.a.addr, "--turn", f"turn:{link.t_a.addr}:3478?transport=udp",
                           "--turn-user", "alice", "--summary", str(tmp_path / "rx.json")], "receive", env)
        rx.wait_for("waiting for a sender", 120)
        tx = link.b.start([PYTHON, "-m", "streamer.send", "--url", netns.with_host(links["sender"], link.t_b.addr),
                           "--ice-address", link.b.addr, "--turn", f"turn:{link.t_b.addr}:3478",
                           "--turn-user", "alice", "--source", "synthetic", "--fps", "10",
                           "--summary", str(tmp_path / "tx.json")], "send", env)
        rx.wait_for("call open", 120)
        time.sleep(6)
        assert tx.stop(10) == 0, tx.describe()
        assert rx.stop(10) == 0, rx.describe()
        turn_log = "".join(turn.out + turn.err)
        rxs = json.loads((tmp_path / "rx.json").read_text())
        txs = json.loads((tmp_path / "tx.json").read_text())
        print(f"receiver {brief(rxs)}; sender {brief(txs)}")
        assert txs["sent"] >= 30 and rxs["shown"] >= 0.8 * txs["sent"], (rxs, txs)
        assert rxs["mismatched"] == 0 and rxs["verified"] >= 0.8 * rxs["shown"], rxs
        assert "relay-pass" not in "".join(rx.out + rx.err + tx.out + tx.err)  # the credential is never printed
        assert "ALLOCATE processed, success" in turn_log, turn_log[-3000:]  # the relay was used
    finally:
        cm.__exit__(None, None, None)
