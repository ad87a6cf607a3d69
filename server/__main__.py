"""`python -m server`: run the call server until Ctrl-C, printing each room's join URLs: one per
role (sender, receiver, camera, viewers), each granting only its own role."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from .app import RunningServer, run_server
from .tokens import new_secret

# What each printed link is for (the role's name, padded, then the URL, then this note).
LINK_NOTES = (
    ("caller", "both people of a two-way call: python -m streamer.call --url '<this>'"),
    ("sender", "this machine's camera end: python -m streamer.send --url '<this>'"),
    ("receiver", "the other end of the call: python -m streamer.receive --url '<this>'"),
    ("camera", "a browser whose webcam feeds the sender's --source browser"),
    ("viewer", "share this one: it only watches"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1",
                    help="interface to listen on (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8765, help="TCP port, 0 = any free one")
    ap.add_argument("--room", action="append", dest="rooms", metavar="NAME",
                    help="a room to open (repeatable; default: demo)")
    ap.add_argument("--secret", "--token", dest="secret", metavar="SECRET",
                    help="the rooms' secret, from which each role's token is derived; it is "
                    "never sent (default: a random one per room). With the same secret a "
                    "restarted server prints the same links")
    ap.add_argument("--max-viewers", type=int, default=64, help="viewers per room")
    ap.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                    help="another web origin whose pages may connect (repeatable)")
    ap.add_argument("--client-dir", type=Path, default=None,
                    help="the browser client's files (default: client/ of this checkout)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every join and leave")
    return ap.parse_args(argv)


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("server.ws").setLevel(logging.WARNING)  # one line per HTTP GET is noise
    rooms = {name: args.secret or new_secret() for name in args.rooms or ["demo"]}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with run_server(args.host, args.port, rooms, max_viewers=args.max_viewers,
                              allowed_origins=args.allow_origin,
                              client_dir=args.client_dir) as srv:
            print(f"server listening on {args.host}:{srv.port}", flush=True)
            for name in rooms:
                print(join_links(srv, name), flush=True)
            await stop.wait()
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    return 0


def join_links(srv: RunningServer, room: str) -> str:
    """The lines the server prints for a room: `  ROLE: URL  (what it is for)` per role."""
    lines = [f"room {room}: one link per role; each lets in only its own role"]
    for role, note in LINK_NOTES:
        label = "viewers" if role == "viewer" else role
        lines.append(f"  {label + ':':<10}{srv.join_url(room, role)}  ({note})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
