"""Two hosts on one machine, for tests whose call must really cross a network link.

`two_hosts()` makes two Linux network namespaces joined by a veth pair (10.77.0.1/24 in `a`,
10.77.0.2/24 in `b`, by default), optionally with delay and loss on the link, and removes all
of it on the way out, whatever happened inside. Nothing is made in the caller's own namespace
and no route leads out of the two, so a program started there can reach only the other host.

    with two_hosts(delay_ms=40, loss=0.02) as link:
        links = start_server(link.a)          # python -m server on a's address; its printed links
        rx = link.a.start([PYTHON, "-m", "streamer.receive", "--url", links["receiver"],
                           "--ice-address", link.a.addr], "receive")
        tx = link.b.start([...same, links["sender"], "--ice-address", link.b.addr], "send")

In a test module, `from netns import hosts` gives the same as a fixture (skipped with the
reason where it cannot be made; `@pytest.mark.parametrize("hosts", [{"delay_ms": 40,
"loss": 0.02}], indirect=True)` for an impaired link).

Delay and loss. `tc qdisc ... netem delay D loss P` on both ends of the veth pair (each
direction D ms and P loss) where the kernel has netem (sch_netem). Where it has not (some VM
kernels, this project's CI machines among them), the same impairment comes from a small
bridge in a third namespace between the two ends (`python tests/netns.py bridge ...`): it
reads every Ethernet frame from one veth with an AF_PACKET socket and writes it to the other
after D ms, dropping it with probability P. It keeps the kernel's offload metadata
(PACKET_VNET_HDR: GSO sizes and partial checksums), so TCP and UDP pass exactly as on a wire.
`link.impairment` says which ("netem" or "bridge"), `link.impairment_stats()` how many packets
were passed and dropped.

`unavailable()` is the reason namespaces cannot be made here (not root, no `ip`, EPERM in a
container) or None; tests skip with it. Stale namespaces of a test process that died without
its teardown (killed -9) are removed by the next `two_hosts()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]
PYTHON = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else sys.executable
PREFIX = "nvct"  # every namespace this module makes is called nvct<pid>x<n><role>


class NetnsUnavailable(RuntimeError):
    """Namespaces (or the asked impairment) cannot be made here; str() is the reason."""


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(argv)}` failed: {(r.stderr or r.stdout).strip()}")
    return r


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) to make network namespaces"
    if os.geteuid() != 0:
        return "making network namespaces (`ip netns add`) needs root"
    probe = f"{PREFIX}{os.getpid()}probe"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` is not allowed here: {(r.stderr or r.stdout).strip()}"
    r = _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1", check=False)
    _ip("netns", "del", probe, check=False)
    if r.returncode != 0:
        return f"cannot make a veth pair here: {(r.stderr or r.stdout).strip()}"
    return None


def remove_stale() -> list[str]:
    """Delete namespaces left by test processes that no longer run (their teardown never ran)."""
    r = _ip("netns", "list", check=False)
    gone = []
    for line in r.stdout.splitlines():
        m = re.match(rf"^({PREFIX}(\d+)\S*)", line.strip())
        if m and not Path(f"/proc/{m.group(2)}").exists():
            _ip("netns", "del", m.group(1), check=False)
            gone.append(m.group(1))
    return gone


class Proc:
    """A program running in a namespace, its output collected as it comes."""

    def __init__(self, ns: str, argv: Sequence[str], name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(s, k), daemon=True)
                         for s, k in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)

    def wait_for(self, text: str, timeout: float = 120, stream: str = "out") -> str:
        """The first line of stdout (or stderr) holding `text`; AssertionError if the program
        ends or `timeout` passes first."""
        lines = self.out if stream == "out" else self.err
        end = time.monotonic() + timeout
        while True:
            for line in list(lines):
                if text in line:
                    return line
            if self.proc.poll() is not None or time.monotonic() > end:
                time.sleep(0.2)  # the rest of its output
                raise AssertionError(f"{self.name}: no {text!r} ({self.describe()})")
            time.sleep(0.05)

    def describe(self) -> str:
        return (f"exit {self.proc.poll()}; out: {''.join(self.out[-20:])!r}; "
                f"err: {''.join(self.err[-20:])!r}")

    def interrupt(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def stop(self, timeout: float = 10) -> int:
        """Ctrl-C, then SIGKILL after `timeout` s; its exit code."""
        self.interrupt()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for t in self._readers:
            t.join(2)
        return self.proc.returncode


@dataclass
class Host:
    """One end of the link: its namespace, its interface and its address there."""

    ns: str
    dev: str
    addr: str
    _procs: list[Proc] = field(default_factory=list, repr=False)

    def start(self, argv: Sequence[str], name: str | None = None, env: dict[str, str] | None = None) -> Proc:
        """Run `argv` in this host's namespace (stopped at the link's teardown at the latest)."""
        p = Proc(self.ns, argv, name or Path(argv[0]).name, env)
        self._procs.append(p)
        return p

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], capture_output=True, text=True,
                              timeout=timeout)


@dataclass
class Link:
    a: Host
    b: Host
    namespaces: list[str]
    delay_ms: float = 0
    loss: float = 0
    impairment: str = "none"  # "none", "netem" or "bridge"
    bridge: Proc | None = None
    bridge_stats: Path | None = None

    def impairment_stats(self) -> dict[str, int]:
        """Packets passed and dropped by the impairment so far (both directions)."""
        if self.impairment == "netem":
            sent = dropped = 0
            for h in (self.a, self.b):
                text = h.run("tc", "-s", "qdisc", "show", "dev", h.dev).stdout
                m = re.search(r"Sent \d+ bytes (\d+) pkt \(dropped (\d+)", text)
                if m:
                    sent, dropped = sent + int(m.group(1)), dropped + int(m.group(2))
            return {"passed": sent, "dropped": dropped}
        if self.impairment == "bridge" and self.bridge is not None:
            self.bridge.proc.send_signal(signal.SIGUSR1)  # write the counters now
            for _ in range(50):
                time.sleep(0.05)
                with contextlib.suppress(OSError, ValueError):
                    return json.loads(self.bridge_stats.read_text())  # type: ignore[union-attr]
        return {"passed": 0, "dropped": 0}


_count = 0


def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (tried on the loopback of a throwaway namespace)."""
    probe = f"{PREFIX}{os.getpid()}netem"
    if _ip("netns", "add", probe, check=False).returncode != 0:
        return False
    try:
        r = subprocess.run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                            "delay", "1ms"], capture_output=True, text=True, timeout=30)
        return r.returncode == 0
    finally:
        _ip("netns", "del", probe, check=False)


def _fresh_base() -> str:
    """A new namespace-name prefix for this process (stale ones of dead processes removed);
    NetnsUnavailable when namespaces cannot be made here."""
    global _count
    reason = unavailable()
    if reason:
        raise NetnsUnavailable(reason)
    remove_stale()
    _count += 1
    return f"{PREFIX}{os.getpid()}x{_count}"


@contextlib.contextmanager
def two_hosts(delay_ms: float = 0, loss: float = 0.0, subnet: str = "10.77.0",
              impairment: str = "auto") -> Iterator[Link]:
    """Two namespaces `a` (SUBNET.1) and `b` (SUBNET.2) joined by a veth pair; with `delay_ms`
    or `loss`, each direction of the link is delayed and lossy (`impairment`: "auto" = netem
    where the kernel has it, else the bridge; "netem" or "bridge" to insist). Everything made
    is removed on the way out, and the programs started on either host are stopped first.
    NetnsUnavailable when it cannot be made (a test skips with its reason)."""
    base = _fresh_base()
    ns_a, ns_b, ns_m = base + "a", base + "b", base + "m"
    impaired = bool(delay_ms or loss)
    if impaired and impairment == "auto":
        impairment = "netem" if netem_available() else "bridge"
    if impaired and impairment == "netem" and not netem_available():
        raise NetnsUnavailable("the kernel has no netem qdisc (sch_netem): `tc qdisc add ... netem` fails")
    link = Link(Host(ns_a, "veth0", f"{subnet}.1"), Host(ns_b, "veth0", f"{subnet}.2"), [],
                delay_ms, loss, impairment if impaired else "none")
    tmp = tempfile.TemporaryDirectory(prefix="netns-")
    try:
        for ns in (ns_a, ns_b) + ((ns_m,) if link.impairment == "bridge" else ()):
            _ip("netns", "add", ns)
            link.namespaces.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        if link.impairment == "bridge":  # a -- m (bridge) -- b
            _ip("-n", ns_a, "link", "add", "veth0", "type", "veth", "peer", "name", "to_a", "netns", ns_m)
            _ip("-n", ns_b, "link", "add", "veth0", "type", "veth", "peer", "name", "to_b", "netns", ns_m)
            for dev in ("to_a", "to_b"):
                _ip("-n", ns_m, "link", "set", dev, "up")
        else:
            _ip("-n", ns_a, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", ns_b)
        for h in (link.a, link.b):
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", h.dev)
            _ip("-n", h.ns, "link", "set", h.dev, "up")
        if link.impairment == "netem":
            for h in (link.a, link.b):
                r = h.run("tc", "qdisc", "add", "dev", h.dev, "root", "netem", "delay", f"{delay_ms:g}ms",
                          "loss", f"{loss * 100:g}%")
                if r.returncode != 0:
                    raise NetnsUnavailable(f"tc netem on {h.ns}: {r.stderr.strip()}")
        elif link.impairment == "bridge":
            link.bridge_stats = Path(tmp.name) / "bridge.json"
            link.bridge = Proc(ns_m, [PYTHON, str(Path(__file__).resolve()), "bridge", "to_a", "to_b",
                                      "--delay-ms", f"{delay_ms:g}", "--loss", f"{loss:g}",
                                      "--stats", str(link.bridge_stats)], "bridge")
            link.bridge.wait_for("bridge ready", 30)
        yield link
    finally:
        for h in (link.a, link.b):
            for p in h._procs:
                with contextlib.suppress(Exception):
                    p.stop(10)
        if link.bridge is not None:
            with contextlib.suppress(Exception):
                link.bridge.stop(5)
        for ns in link.namespaces:  # the veth pairs go with their namespaces
            _ip("netns", "del", ns, check=False)
        tmp.cleanup()


@dataclass
class RelayLink:
    """Two hosts that cannot reach each other, both reaching a third, public one (`t`), which
    holds an address on each side (`t_a` on a's subnet, `t_b` on b's) and forwards nothing:
    two homes behind firewalls, and a server both can reach. A call between a and b connects
    only through a TURN relay on t."""

    a: Host
    b: Host
    t_a: Host
    t_b: Host
    namespaces: list[str]


@contextlib.contextmanager
def relay_hosts(subnet_a: str = "10.77.1", subnet_b: str = "10.77.2") -> Iterator[RelayLink]:
    """a (SUBNET_A.1) -- t (SUBNET_A.254 | SUBNET_B.254, no forwarding) -- b (SUBNET_B.2).
    Removed on the way out, as `two_hosts`."""
    base = _fresh_base()
    ns_a, ns_b, ns_t = base + "a", base + "b", base + "t"
    link = RelayLink(Host(ns_a, "veth0", f"{subnet_a}.1"), Host(ns_b, "veth0", f"{subnet_b}.2"),
                     Host(ns_t, "to_a", f"{subnet_a}.254"), Host(ns_t, "to_b", f"{subnet_b}.254"), [])
    try:
        for ns in (ns_a, ns_b, ns_t):
            _ip("netns", "add", ns)
            link.namespaces.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns_a, "link", "add", "veth0", "type", "veth", "peer", "name", "to_a", "netns", ns_t)
        _ip("-n", ns_b, "link", "add", "veth0", "type", "veth", "peer", "name", "to_b", "netns", ns_t)
        r = link.t_a.run("sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward")
        if r.returncode != 0:
            raise NetnsUnavailable(f"cannot turn forwarding off in {ns_t}: {r.stderr.strip()}")
        for h in (link.a, link.b, link.t_a, link.t_b):
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", h.dev)
            _ip("-n", h.ns, "link", "set", h.dev, "up")
        yield link
    finally:
        for h in (link.a, link.b, link.t_a, link.t_b):
            for p in h._procs:
                with contextlib.suppress(Exception):
                    p.stop(10)
        for ns in link.namespaces:
            _ip("netns", "del", ns, check=False)


def start_turn_server(t_a: Host, t_b: Host, user: str, password: str, folder: Path) -> Proc:
    """coturn (`turnserver`, Debian's `coturn`) on the relay host, listening on both of its
    addresses, relaying from the one on b's side; long-term credentials `user`/`password`.
    NetnsUnavailable when it is not installed."""
    exe = shutil.which("turnserver")
    if exe is None:
        raise NetnsUnavailable("no `turnserver` (coturn: apt-get install coturn) for the TURN relay")
    turn = t_a.start([exe, "-n", "--no-cli", "--no-tls", "--no-dtls", "--listening-ip", t_a.addr,
                      "--listening-ip", t_b.addr, "--relay-ip", t_b.addr, "--listening-port", "3478",
                      "--min-port", "49152", "--max-port", "49407", "--lt-cred-mech", "--fingerprint",
                      "--user", f"{user}:{password}", "--realm", "netns.test",
                      "--userdb", str(folder / "turndb"), "--pidfile", str(folder / "turnserver.pid"),
                      "--log-file", "stdout", "--simple-log", "--verbose"], "turnserver")
    with contextlib.suppress(AssertionError):
        turn.wait_for("listener opened on", 10)  # its log says so per address; no line: go on, the call says
    if turn.proc.poll() is not None:
        raise AssertionError(f"turnserver did not start: {turn.describe()}")
    return turn


def start_server(host: Host, room: str = "netns", secret: str = "netns-test-secret", port: int = 8765,
                 extra: Sequence[str] = ()) -> dict[str, str]:
    """`python -m server` on `host` (listening on its address only); the join links it prints,
    by role ("caller", "sender", "receiver", "camera", "viewers"), as a user would copy them."""
    server = host.start([PYTHON, "-m", "server", "--host", host.addr, "--port", str(port), "--room", room,
                         "--secret", secret, *extra], "server")
    return join_links_of(server)


def with_host(url: str, host: str) -> str:
    """A printed join link with its host replaced (what a user does with `--host 0.0.0.0`)."""
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(url)
    return urlunsplit(u._replace(netloc=f"{host}:{u.port}" if u.port else host))


def join_links_of(server: Proc) -> dict[str, str]:
    """The join links a running server printed, by role."""
    server.wait_for("viewers:", 60)
    links = {}
    for line in server.out:
        m = re.match(r"^\s*(caller|sender|receiver|camera|viewers):\s+(\S+)", line)
        if m:
            links[m.group(1)] = m.group(2)
    return links


try:  # the fixture, for test modules: `from netns import hosts`
    import pytest
except ImportError:  # the bridge runs without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    @pytest.fixture
    def hosts(request):
        """A `Link` from `two_hosts(**request.param)` (parametrize with indirect=True for delay
        and loss), skipped with the reason where namespaces or the impairment cannot be made."""
        reason = unavailable()
        if reason:
            pytest.skip(reason)
        cm = two_hosts(**getattr(request, "param", {}))
        try:
            link = cm.__enter__()
        except NetnsUnavailable as e:
            pytest.skip(str(e))
        try:
            yield link
        finally:
            cm.__exit__(None, None, None)


# -- the bridge (run in the middle namespace) -----------------------------------------------

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4


def bridge_main(argv: list[str]) -> int:
    """Forward Ethernet frames between two interfaces, each direction delayed and lossy."""
    import argparse
    import heapq
    import random
    import select
    import socket

    ap = argparse.ArgumentParser(prog="tests/netns.py bridge")
    ap.add_argument("dev1")
    ap.add_argument("dev2")
    ap.add_argument("--delay-ms", type=float, default=0)
    ap.add_argument("--loss", type=float, default=0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stats", type=Path)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    socks = {}
    for dev in (args.dev1, args.dev2):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)  # keep GSO / partial-checksum metadata
        s.bind((dev, ETH_P_ALL))
        s.setblocking(False)
        socks[dev] = s
    other = {socks[args.dev1]: (args.dev2, socks[args.dev2]), socks[args.dev2]: (args.dev1, socks[args.dev1])}
    counts = {"passed": 0, "dropped": 0, "send_errors": 0}
    stop = False
    write_now = False

    def on_stop(*_: object) -> None:
        nonlocal stop
        stop = True

    def on_usr1(*_: object) -> None:
        nonlocal write_now
        write_now = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, on_usr1)

    def write_stats() -> None:
        if args.stats:
            tmp = args.stats.with_suffix(".tmp")
            tmp.write_text(json.dumps(counts))
            tmp.replace(args.stats)

    queue: list[tuple[float, int, socket.socket, bytes]] = []
    seq = 0
    delay = args.delay_ms / 1000
    print("bridge ready", flush=True)
    while not stop:
        if write_now:
            write_now = False
            write_stats()
        timeout = 0.2 if not queue else max(0.0, min(0.2, queue[0][0] - time.monotonic()))
        try:
            ready, _, _ = select.select(list(socks.values()), [], [], timeout)
        except InterruptedError:
            continue
        for s in ready:
            out_dev, out = other[s]
            while True:
                try:
                    data, addr = s.recvfrom(1 << 17)
                except (BlockingIOError, InterruptedError):
                    break
                if addr[2] == PACKET_OUTGOING or addr[0] == out_dev:
                    continue  # what we sent ourselves
                if args.loss and rng.random() < args.loss:
                    counts["dropped"] += 1
                    continue
                seq += 1
                heapq.heappush(queue, (time.monotonic() + delay, seq, out, data))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, data = heapq.heappop(queue)
            try:
                out.send(data)
                counts["passed"] += 1
            except OSError:
                counts["send_errors"] += 1
    write_stats()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "bridge":
        sys.exit(bridge_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} bridge DEV1 DEV2 [--delay-ms D] [--loss P] [--stats PATH]")
