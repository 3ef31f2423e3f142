"""Looking at an idle upstream connection without blocking: is it still fit to carry a request?

An idle HTTP/1.1 upstream says nothing until it is asked. So an idle connection with something
to read has been closed by the upstream (EOF, a reset, a TLS close_notify: load balancers cut
idle connections after 60-100 s) or carries bytes nobody asked for; either way it must not carry
another request. This is httpcore's ``is_readable`` check, extended to the bytes that trio's
``SSLStream`` and the CONNECT tunnel's wrapper may already hold above the socket.
"""

from __future__ import annotations

import select

import trio

_poll = getattr(select, "poll", None)


def stream_is_readable(stream: trio.abc.Stream) -> bool:
    """True if ``stream`` has buffered bytes, a pending EOF or error; False if it is quiet.

    Walks ``transport_stream`` links (SSLStream, the tunnel's wrapper) down to the socket and
    polls it with timeout 0. A stream it cannot look into counts as quiet.
    """
    while not isinstance(stream, trio.SocketStream):
        if isinstance(stream, trio.SSLStream) and (
            stream.pending() or _tls_records_buffered(stream)
        ):
            return True
        stream = getattr(stream, "transport_stream", None)
        if stream is None:
            return False
    return _socket_readable(stream.socket.fileno())


def close_nowait(stream: trio.abc.Stream) -> None:
    """Close a stream's socket without awaiting (sockets close synchronously; an idle TLS
    connection is dropped without close_notify, as ``aclose_forcefully`` does)."""
    while not isinstance(stream, trio.SocketStream):
        stream = getattr(stream, "transport_stream", None)
        if stream is None:
            return
    stream.socket.close()


def _tls_records_buffered(stream: trio.SSLStream) -> bool:
    """Encrypted bytes already taken off the socket but not yet decrypted, e.g. a close_notify
    that came in with the end of the last response. trio keeps them in a private MemoryBIO, so
    this degrades to False should that attribute ever go away."""
    incoming = getattr(stream, "_incoming", None)
    return bool(incoming is not None and incoming.pending)


def _socket_readable(fd: int) -> bool:
    """Readable, hung up or in error (``poll`` reports the last two unasked), without waiting."""
    if fd < 0:
        return True  # already closed
    if _poll is None:  # Windows has no poll(); its select() has no FD_SETSIZE limit
        return bool(select.select([fd], [], [], 0)[0])
    poller = _poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))
