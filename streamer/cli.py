"""What the call's programs share: their common options, argument checks made before anything
connects, loading the model, and a run loop whose shutdown always ends.

Shutdown. Ctrl-C or SIGTERM sets a `stop` event; the program then closes its peer connection
and signaling socket and its loops end. Some libraries swallow a cancellation (aioice's
`Connection.close()` does, inside aiortc's `RTCPeerConnection.close()`), so a loop cancelled
there goes on running. Nothing here waits on a task without a bound (`finish_tasks`,
`bounded`), and the event loop is closed with the stragglers abandoned rather than awaited, so
the process ends in a few seconds whatever a library does. A second Ctrl-C exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

from .errors import ConfigError, StreamerError
from .transport import DEFAULT_RTO_MIN_S, TURN_CREDENTIAL_ENV, ice_servers

if TYPE_CHECKING:
    from .codec import NeuralCodec

MAX_FRAME_SIZE = 1024  # model input side; the latent shape a receiver accepts follows from it
SHUTDOWN_STEP_S = 1.0  # the longest any one shutdown step may take


# -- options -------------------------------------------------------------------------------

def add_common_args(ap: argparse.ArgumentParser) -> None:
    """Options both ends take: server, room, token, join URL, weights, backend, ICE (host
    addresses, STUN, TURN), threads."""
    ap.add_argument("--server", help="call server websocket, e.g. ws://127.0.0.1:8765/ws (default: that)")
    ap.add_argument("--room", help="room name")
    ap.add_argument("--token", help="the token of this end's role (the server prints one join URL per role)")
    ap.add_argument("--url", help="this end's join URL instead of --server/--room/--token, as the server "
                    "prints it: http://127.0.0.1:8765/?room=R&token=T&role=sender")
    ap.add_argument("--weights", default="default", help="model name or path (default: the shipped default)")
    from .backends import add_backend_arguments

    # eager by default: int8 is faster but compiles for ~20 s at start (README, "Backends")
    add_backend_arguments(ap, default="eager")
    ap.add_argument("--ice-address", action="append", metavar="IP",
                    help="gather ICE host candidates on exactly this address (repeatable; "
                    "e.g. 127.0.0.1 for a loopback call; default: every interface)")
    ap.add_argument("--stun", action="append", default=[], metavar="URL",
                    help="a STUN server, stun:HOST[:PORT] (aiortc uses the first; default none: "
                    "no traffic leaves for one)")
    ap.add_argument("--turn", metavar="URL",
                    help="a TURN relay for peers no direct path joins (NAT on both sides, UDP blocked): "
                    "turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT] (default port 3478 / 5349); "
                    "needs --turn-user and --turn-credential")
    ap.add_argument("--turn-user", metavar="NAME", help="the TURN server's username")
    ap.add_argument("--turn-credential", metavar="SECRET",
                    help=f"the TURN server's password (default: ${TURN_CREDENTIAL_ENV}, which keeps it off "
                    "the command line and out of the process list)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a small shared CPU, intra-op threads "
                    "fight the other end of the call and get slower, not faster)")
    ap.add_argument("--sctp-rto-min", type=float, default=DEFAULT_RTO_MIN_S, metavar="S",
                    help=f"minimum SCTP retransmission timeout (default {DEFAULT_RTO_MIN_S:g} s; aiortc's is 1 s, "
                    "which freezes a lossy call for a second whenever the last chunks in flight are lost)")
    ap.add_argument("--seconds", type=float, default=0, help="stop after this long (0: run until Ctrl-C)")
    ap.add_argument("--summary", metavar="PATH", help="write a JSON summary here at exit (for the bench)")
    ap.add_argument("--quiet", action="store_true", help="no per-second stats line")


def require(ok: bool, message: str) -> None:
    """One argument check: ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)


def check_common_args(args: argparse.Namespace) -> None:
    """The checks every end makes before it loads a model or connects (ConfigError, exit 2)."""
    require(args.threads >= 1, f"--threads must be at least 1, got {args.threads}")
    require(args.seconds >= 0, f"--seconds must be 0 (until Ctrl-C) or more, got {args.seconds:g}")
    require(0 < args.sctp_rto_min <= 60, f"--sctp-rto-min must be in (0, 60] seconds, got {args.sctp_rto_min:g}")
    if args.summary:
        check_writable(args.summary, "--summary")
    check_ice_servers(args)


def check_ice_servers(args: argparse.Namespace) -> None:
    """Validate --stun / --turn / --turn-user / --turn-credential (the credential may come from
    $STREAMER_TURN_CREDENTIAL) and set `args.ice_servers`, the RTCIceServer list. `args.stun`
    is replaced by the same list: the programs hand `args.stun` to
    `transport.create_peer_connection`, which takes URLs or RTCIceServer objects."""
    if getattr(args, "ice_servers", None) is not None:  # already checked (a program checks twice)
        return
    credential = args.turn_credential or os.environ.get(TURN_CREDENTIAL_ENV) or None
    if not args.turn:
        credential = args.turn_credential  # an exported variable alone asks for nothing
    args.ice_servers = ice_servers(args.stun or (), args.turn, args.turn_user, credential)
    args.stun = list(args.ice_servers)


def check_writable(path: str | Path, option: str) -> None:
    """The folder of `path` exists (or can be made) and can be written to."""
    parent = Path(path).expanduser().resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot create the folder {parent}: {e.strerror or e}") from None
    require(os.access(parent, os.W_OK), f"{option} {path}: the folder {parent} is not writable")
    require(not Path(path).is_dir(), f"{option} {path} is a folder; give a file name")


def check_frame_size(codec: "NeuralCodec", size: int) -> int:
    """The model input side for --size (0: the model's own); ConfigError if the model cannot
    code it, said before anything connects instead of when the first receiver joins."""
    size = size or codec.frame_size
    require(0 < size <= MAX_FRAME_SIZE, f"--size must be in 1..{MAX_FRAME_SIZE} pixels, got {size}")
    from .errors import FrameSizeError

    try:
        codec.model.check_size(size, size)
    except FrameSizeError as e:
        raise ConfigError(f"--size {size}: {e}") from None
    return size


def load_codec(weights: str, backend: str = "eager", threads: int | None = 1, precision: str | None = None,
               cache_dir: "Path | None" = None) -> "NeuralCodec":
    """The model for a call: the named weights (a missing or broken file is a WeightsError,
    never a silent fallback to untrained weights), torch threads set, and the backend."""
    import torch

    from .backends import apply_backend
    from .codec import NeuralCodec

    if threads:
        torch.set_num_threads(threads)
    codec = apply_backend(NeuralCodec.load(weights), backend, precision=precision, cache_dir=cache_dir)
    if backend != "eager":
        print(f"backend: {codec.backend}", file=sys.stderr)
    return codec


# -- shutdown ------------------------------------------------------------------------------

async def bounded(aw: Awaitable[Any], timeout: float = SHUTDOWN_STEP_S) -> bool:
    """Await `aw` for at most `timeout` s; True if it finished. An unfinished one is cancelled
    and left behind, not awaited (it may swallow the cancellation). Its errors are dropped:
    this is for closing things."""
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        return False
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" at exit
    return True


async def finish_tasks(tasks: Iterable["asyncio.Future[Any]"], timeout: float = SHUTDOWN_STEP_S) -> int:
    """Cancel `tasks` and wait at most `timeout` s for them; returns how many still run."""
    tasks = [t for t in tasks if not t.done()]
    for t in tasks:
        t.cancel()
    if not tasks:
        return 0
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()
    return len(pending)


# -- running a program ---------------------------------------------------------------------

def report_end(prog: str, sig: Any, stop: asyncio.Event, summary_path: str | None,
               summary: Callable[[], dict[str, Any]]) -> None:
    """After a call: say why the server ended it (unless we were asked to stop), and write the
    JSON summary the bench reads."""
    if sig.closed_reason and not stop.is_set():
        print(f"{prog}: {sig.closed_reason}", file=sys.stderr)
    if summary_path:
        with open(summary_path, "w") as f:
            json.dump(summary(), f)


def run_program(prog: str, amain: Callable[[asyncio.Event], Awaitable[Any]]) -> int:
    """Run one end of a call until it ends or Ctrl-C / SIGTERM. User mistakes (a bad URL or
    token, an unreachable server, a missing webcam or model, a bad option) become one line and
    exit code 2. The exit code is `exit_code` of what `amain` returns when it has one (e.g. 1
    when a recording failed). A second Ctrl-C exits at once."""
    from .signaling import SignalingError

    def on_signal(stop: asyncio.Event) -> None:
        if stop.is_set():  # asked twice: the user means it
            os._exit(130)
        stop.set()

    async def run() -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(s, on_signal, stop)
        return await amain(stop)

    try:
        result = run_bounded(run())
    except SignalingError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except StreamerError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the handlers were installed
        return 130
    return int(getattr(result, "exit_code", 0) or 0)


def exit_now(code: int) -> None:
    """End the process with `code` once a program's `main` has returned: flush and leave
    without the interpreter's final garbage collection, which measured 4-18 s on a loaded
    2-core machine after a call (torch's and aiortc's objects), long after the call closed its
    files, peers and sockets."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(code)


def run_bounded(main: Awaitable[Any], timeout: float = 2 * SHUTDOWN_STEP_S) -> Any:
    """Like asyncio.run, except that tasks still running when `main` returns get `timeout`
    seconds to end after being cancelled and are then abandoned (asyncio.run would wait for
    them for ever, and a library task that swallows its cancellation never ends)."""
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            if pending:
                loop.run_until_complete(finish_tasks(pending, timeout))
            loop.run_until_complete(bounded(loop.shutdown_asyncgens(), timeout))
            loop.run_until_complete(bounded(loop.shutdown_default_executor(), timeout))
        finally:
            # abandoned tasks would complain when garbage-collected: they are known and harmless
            loop.set_exception_handler(lambda _loop, _ctx: None)
            asyncio.set_event_loop(None)
            loop.close()
