"""The HTTP listening of `ember serve`, single-process or in front of Ray replicas (ember.cluster.launch): the
sockets, taken before anything loads, and uvicorn's server with ember's graceful stop."""

from __future__ import annotations

import contextlib
import errno
import signal
import socket

from ember.errors import EmberError


class GracefulServer:
    """uvicorn's server, except that SIGTERM/SIGINT call `on_exit` (to start our graceful shutdown) and the exit
    code stays 0."""

    def __new__(cls, config, on_exit=None):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if on_exit is not None:
                    on_exit()
                super().handle_exit(sig, frame)

            @contextlib.contextmanager
            def capture_signals(self):
                # uvicorn re-raises the caught signal after shutdown (exit status 143); a clean stop is 0.
                previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

        return Server(config)


def listen(host: str, port: int, backlog: int = 2048) -> list[socket.socket]:
    """Listening sockets on every address of `host` (as asyncio's create_server would open), taken before
    any model loads: a port already in use fails at once, as one line, instead of after the load with
    uvicorn's logged error."""
    sockets: list[socket.socket] = []
    try:
        addresses = dict.fromkeys(info[:3] + (info[4],) for info in socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE))
        for family, kind, proto, address in addresses:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # its IPv4 twin has a socket of its own
            sock.bind(address)
            sock.listen(backlog)  # now: binding alone would not keep a second server off the port
    except OSError as err:
        for sock in sockets:
            sock.close()
        reason = err.strerror or str(err)
        hint = " (another server, an `ember serve` perhaps, holds it: stop it or choose another --port)" \
            if err.errno == errno.EADDRINUSE else ""
        raise EmberError(f"cannot listen on {host}:{port}: {reason.lower()}{hint}") from None
    return sockets
