"""`make demo` / `python -m streamer.demo`: a whole call on this machine.

Starts the call server, a receiver and a sender (the bundled sample clip by default) as child
processes, prints the URL to open in a browser, and stops them all cleanly on Ctrl-C (or
SIGTERM, or after --seconds). Everything listens on 127.0.0.1.

The server prints one join URL per role; the sender and receiver get their own, and the page's
link is the viewers' one (with --source browser the camera link, which may also feed the
sender).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from types import FrameType

ROOM = "demo"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m streamer.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8765,
                    help="server port (default 8765; a free one if that is taken; 0 = any)")
    ap.add_argument("--source", default="sample",
                    help="the sender's source: sample (default) | synthetic | webcam | browser | PATH "
                    "(browser: press 'Send my camera' on the page)")
    ap.add_argument("--secret", "--token", dest="secret", default=None,
                    help="the room's secret, from which each role's token is derived "
                    "(default: a random one)")
    ap.add_argument("--seconds", type=float, default=0, help="stop after this long (0: until Ctrl-C)")
    ap.add_argument("--verbose", action="store_true", help="show the sender's and receiver's "
                    "per-second stats lines")
    return ap.parse_args(argv)


NEEDED_LINKS = {"sender", "receiver", "camera", "viewers"}  # the roles the demo hands out
# How long the call's ends, and then the server, get to stop after Ctrl-C (each end stops within
# 3 s, tests/test_cli.py): one that has not is killed and named, so the demo never hangs.
STOP_WAIT_S = 5.0


class Demo:
    """The three child processes and their orderly shutdown."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.secret = args.secret or secrets.token_hex(16)
        self.children: list[tuple[str, subprocess.Popen[str]]] = []
        self.stopping = False
        self.killed: list[str] = []  # children that had to be killed at the end

    def spawn(self, name: str, module: str, *argv: str, capture: bool = False) -> subprocess.Popen[str]:
        # Own session: the terminal's Ctrl-C reaches only us, and we stop the children in order
        # (the call's two ends together, then the server), so neither end sees the server vanish.
        proc = subprocess.Popen([sys.executable, "-m", module, *argv], text=True,
                                stdout=subprocess.PIPE if capture else None,
                                start_new_session=True)
        self.children.append((name, proc))
        return proc

    def start_server(self) -> dict[str, str]:
        """Start the server and return the join URLs it prints: {"sender": URL, "receiver":
        URL, "camera": URL, "viewers": URL}."""
        for port in dict.fromkeys([self.args.port, 0]):  # the asked port, else any free one
            proc = self.spawn("server", "server", "--port", str(port), "--room", ROOM,
                              f"--secret={self.secret}", capture=True)
            assert proc.stdout is not None
            # The server prints its join URLs once listening ("  ROLE: URL  (note)"), or exits
            # (EOF) when it cannot.
            links: dict[str, str] = {}
            for line in proc.stdout:
                words = line.split()
                if len(words) >= 2 and words[0].endswith(":") and words[1].startswith("http"):
                    links[words[0][:-1]] = words[1]
                    if NEEDED_LINKS <= links.keys():  # (the server prints more, e.g. callers')
                        return links
            self.children.remove(("server", proc))
            proc.kill()
            proc.wait()
        raise RuntimeError("the call server did not start")

    def stop(self) -> None:
        """Ctrl-C to the sender and receiver together, then to the server; each group gets
        STOP_WAIT_S, and whatever has not stopped by then is killed (and said)."""
        if self.stopping:
            return
        self.stopping = True
        ends = [(n, p) for n, p in reversed(self.children) if n != "server"]
        servers = [(n, p) for n, p in self.children if n == "server"]
        for group in (ends, servers):  # the server last, so neither end sees it vanish first
            for _, proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + STOP_WAIT_S
            for name, proc in group:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    print(f"demo: the {name} did not stop within {STOP_WAIT_S:g} s of Ctrl-C; killed it",
                          file=sys.stderr, flush=True)
                    self.killed.append(name)
                    proc.kill()
                    proc.wait(5)

    def run(self) -> int:
        links = self.start_server()
        quiet = [] if self.args.verbose else ["--quiet"]
        common = ["--ice-address", "127.0.0.1", *quiet]
        self.spawn("receiver", "streamer.receive", "--url", links["receiver"], *common)
        self.spawn("sender", "streamer.send", "--url", links["sender"], *common,
                   "--source", self.args.source, "--share-original", "--measure")
        # The page's link: view-only, unless this browser's camera is the call's source.
        url = links["camera" if self.args.source == "browser" else "viewers"]
        print(f"\n  Neural video call running. Open this in a browser:\n\n    {url}\n", flush=True)
        if self.args.source == "browser":
            print("  Then press 'Send my camera' on the page.\n", flush=True)
        print("  Ctrl-C stops everything.", flush=True)
        deadline = time.monotonic() + self.args.seconds if self.args.seconds else None
        while not self.stopping:
            for name, proc in self.children:
                if proc.poll() is not None:
                    print(f"demo: the {name} stopped (exit code {proc.returncode}); stopping the "
                          "rest", file=sys.stderr, flush=True)
                    self.stop()
                    return 1
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        self.stop()
        return 0


def main(argv: list[str] | None = None) -> int:
    demo = Demo(parse_args(argv))

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    # Ctrl-C (SIGINT) stops the demo however it was started: a shell starts a background job
    # with SIGINT ignored, and Python keeps an ignored SIGINT ignored (measured: a demo started
    # with `&` ran on after Ctrl-C, and the test that stopped it left its children behind).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return demo.run()
    except KeyboardInterrupt:
        print("\ndemo: stopping…", flush=True)
        # Ignore further Ctrl-C while the children shut down, so nothing is left behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        demo.stopping = False
        demo.stop()
        return 1 if demo.killed else 0
    except RuntimeError as exc:
        demo.stop()
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        for _, proc in demo.children:  # never leave an orphan behind
            if proc.poll() is None:
                proc.kill()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
