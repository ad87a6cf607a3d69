"""Call server: serves the browser client and relays a room's signaling, pictures and stats.

`python -m server --room demo` runs it; `server.app.run_server` runs it inside a test.
The wire protocol is specified in docs/protocol.md.
"""

from .app import RunningServer, ServerConfig, run_server, serve_in_thread

__all__ = ["RunningServer", "ServerConfig", "run_server", "serve_in_thread"]
