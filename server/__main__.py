"""`python -m server`: run the call server until Ctrl-C, printing each room's join URL."""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
import sys
from pathlib import Path

from .app import run_server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1",
                    help="interface to listen on (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8765, help="TCP port, 0 = any free one")
    ap.add_argument("--room", action="append", dest="rooms", metavar="NAME",
                    help="a room to open (repeatable; default: demo)")
    ap.add_argument("--token", help="the rooms' secret token (default: a random one per room)")
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
    rooms = {name: args.token or secrets.token_hex(16) for name in args.rooms or ["demo"]}
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
                print(f"join: {srv.join_url(name)}", flush=True)
            await stop.wait()
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
