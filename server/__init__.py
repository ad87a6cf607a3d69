"""Call server: serves the browser client and relays a room's signaling, pictures and stats.

`python -m server --room demo` runs it (printing one join URL per role); `server.app.run_server` runs it inside a test.
The wire protocol is specified in docs/protocol.md.
"""

from .app import RunningServer, ServerConfig, run_server, serve_in_thread
from .tokens import role_token

__all__ = ["RunningServer", "ServerConfig", "role_token", "run_server", "serve_in_thread"]
