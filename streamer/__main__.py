"""`neural-call COMMAND [options]` (or `python -m streamer COMMAND`): every program of the
project under one name, for an installed package as for a checkout.

    neural-call demo                      # a whole call on this machine, with its page
    neural-call serve --room demo         # the call server
    neural-call join CALLER_LINK          # a two-way call: your camera to the other caller, theirs to you
    neural-call send --url SENDER_LINK    # this machine's camera end
    neural-call receive --url RECEIVER_LINK
    neural-call roundtrip | bench NAME | train | evaluate | tables
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from typing import Callable

# command -> (module, what it does); each module has main(argv) -> exit code
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("streamer.demo", "a whole call on this machine: server, sender, receiver and the page's link"),
    "serve": ("server.__main__", "the call server (rooms, signaling, the browser page)"),
    "join": ("streamer.call", "join a two-way call: neural-call join CALLER_LINK (sends and receives)"),
    "send": ("streamer.send", "the sending end of a call"),
    "receive": ("streamer.receive", "the receiving end of a call"),
    "roundtrip": ("streamer.roundtrip", "a clip through the codec without a network"),
    "bench": ("streamer.bench.__main__", "benchmarks: antialias, codec, call, fuzz"),
    "train": ("training.train", "train a model (needs the [train] extra)"),
    "evaluate": ("training.evaluate", "rate-distortion against JPEG, WebP, JPEG 2000, x264"),
    "tables": ("training.tables", "refit the entropy tables of existing weights"),
}
# the call's ends leave without the interpreter's slow final garbage collection (cli.exit_now)
FAST_EXIT = {"join", "send", "receive"}


def usage() -> str:
    lines = ["usage: neural-call COMMAND [options]   (neural-call COMMAND --help for its options)", ""]
    lines += [f"  {name:10s} {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"neural-call: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        run: Callable[[list[str]], object] = module.main
        code = run(rest)
        if asyncio.iscoroutine(code):  # the server's main is a coroutine
            code = asyncio.run(code)
    except KeyboardInterrupt:  # Ctrl-C while loading torch: nothing to clean up yet
        return 130
    except ModuleNotFoundError as e:  # an optional dependency of that command
        extra = "train" if name in ("train", "evaluate", "tables") else "dev"
        print(f"neural-call {name}: missing module {e.name!r}: pip install 'neural-video-call[{extra}]'",
              file=sys.stderr)
        return 2
    code = int(code or 0)
    if name in FAST_EXIT:
        from .cli import exit_now

        exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
