"""A deadline on answers the client does not read.

uvicorn writes an answer into its transport, which keeps what the kernel will not take yet,
with no limit in time: a client that sends requests and never reads their answers (a raw
socket with a closed receive window) held its connection, the answer in the API worker's
memory and its file descriptor for as long as it stayed connected. Each such connection costs
the client one request and nothing else, and the server the answer's size (up to megabytes:
1,000 prompt embeddings as JSON are 325 KB for the tiny test model's 16 dimensions, about 10 MB
for ViT-B/32's 512); keep-alive's timeout cannot close it (a close waits for the buffer to be
sent). A request sent on the connection meanwhile (pipelined, or after the answer) started,
took an admission slot (traffic.py) and held it, answered, waiting for its client too.

`bound_unread_answers` gives uvicorn's httptools protocol the bound nginx's `send_timeout` is:
while answer bytes wait in the transport's buffer (past its high-water mark, or left there when
an answer ended), the client must take some within `timeout_s`, else the connection is dropped
(reset: there is no way left to tell it anything), which frees the buffer, and any request
waiting to answer on it ends as one whose client left. A client reading slowly keeps its
connection: only a whole period without progress drops it. And a request on a connection
whose answers wait for the client starts only once the client has read them: no admission slot
is held by a request that cannot be answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import struct
import termios
from collections.abc import Callable
from typing import Any


def waiting_bytes(transport: Any) -> tuple[int, int | None]:
    """Answer bytes waiting for the client: in the transport's buffer, and in the kernel's send
    queue (None where it cannot be read: not Linux).

    The kernel's queue only shrinks as the client takes bytes, and only grows by the transport's
    writes once the client has taken a third of it, so a change there is the client's doing; the
    transport's buffer shrinks only then, and grows with each answer. Watched alone, it stood
    still for a client taking 128 KB a second, which was dropped."""
    queued = None
    connection = transport.get_extra_info("socket")
    if connection is not None:
        with contextlib.suppress(OSError, ValueError):  # not Linux, or closed meanwhile
            sent = fcntl.ioctl(connection.fileno(), termios.TIOCOUTQ, b"\0" * 4)
            queued = struct.unpack("i", sent)[0]
    return transport.get_write_buffer_size(), queued


class SendWatch:
    """One connection's watch over the answer bytes waiting for its client to read them."""

    def __init__(self, protocol: Any, timeout_s: float) -> None:
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.waiting: tuple[int, int | None] = (0, None)  # `waiting_bytes` when last checked
        self.deadline: asyncio.TimerHandle | None = None
        self.next_request: Callable[[], None] | None = None  # held until the client reads

    def watch(self) -> None:
        """Answer bytes wait in the transport: the client must take some within the deadline.
        Where it does, a new period begins, for as long as any wait there."""
        if self.deadline is None:
            self.waiting = waiting_bytes(self.protocol.transport)
            self.deadline = self.protocol.loop.call_later(self.timeout_s, self._expired)

    def cancel(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expired(self) -> None:
        self.deadline = None
        transport = self.protocol.transport
        buffered, queued = waiting_bytes(transport)
        if not buffered:  # the rest is the kernel's to send
            return
        before_buffered, before_queued = self.waiting
        if buffered < before_buffered or queued != before_queued:  # taken some: a new period
            self.watch()
            return
        transport.abort()  # closing or not: a close waits for the buffer to be sent


_timeout_s: float | None = None


def bound_unread_answers(timeout_s: float) -> None:
    """Give uvicorn's httptools protocol this deadline (each call replaces the last; its methods
    are wrapped once). Without httptools installed there is nothing to bound here."""
    global _timeout_s
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
    except ImportError:
        return
    _timeout_s = timeout_s
    if getattr(HttpToolsProtocol, "send_deadline_wrapped", False):
        return
    HttpToolsProtocol.send_deadline_wrapped = True
    connection_made = HttpToolsProtocol.connection_made
    connection_lost = HttpToolsProtocol.connection_lost
    pause_writing = HttpToolsProtocol.pause_writing
    resume_writing = HttpToolsProtocol.resume_writing
    on_response_complete = HttpToolsProtocol.on_response_complete
    start_asgi_task = HttpToolsProtocol._start_asgi_task
    send = RequestResponseCycle.send

    def watched_connection_made(self: Any, transport: Any) -> None:
        connection_made(self, transport)
        self.send_watch = SendWatch(self, _timeout_s)

    def watched_connection_lost(self: Any, exc: Exception | None) -> None:
        self.send_watch.cancel()
        connection_lost(self, exc)

    def watched_pause_writing(self: Any) -> None:
        pause_writing(self)
        self.send_watch.watch()

    def watched_resume_writing(self: Any) -> None:
        resume_writing(self)  # the watch goes on while any answer bytes wait in the buffer
        if (next_request := self.send_watch.next_request) is not None:
            self.send_watch.next_request = None
            next_request()

    def watched_response_complete(self: Any) -> None:
        # Bytes left in the buffer under its high-water mark never paused the writes, and a
        # close waits for them: a client reading nothing had held such a connection for good.
        on_response_complete(self)
        if self.transport.get_write_buffer_size():
            self.send_watch.watch()

    def start_once_read(self: Any, cycle: Any, app: Any) -> None:
        # A request (pipelined, or sent later on the connection) starts once its client reads
        # the answers before it: started at once, it took an admission slot and held it,
        # answered, until the client read or the deadline dropped it; four clients doing so
        # turned 81% of a good client's requests away with 429s on a server allowing four at
        # once. Nothing more is read from the connection meanwhile.
        if self.flow.write_paused and not self.transport.is_closing():
            self.flow.pause_reading()
            self.send_watch.next_request = lambda: start_asgi_task(self, cycle, app)
            return
        start_asgi_task(self, cycle, app)

    async def send_unless_dropped(self: Any, message: Any) -> None:
        # A request pipelined behind an unread answer waits here for the buffer to drain; its
        # connection dropped meanwhile, uvicorn marks only the newest request as left, and this
        # one wrote on the closed transport (a RuntimeError, logged as the app's with its
        # traceback). It left too.
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.transport.is_closing() and not self.disconnected:
            self.disconnected = True
            self.message_event.set()  # a wait for the request's next message ends
            return
        await send(self, message)

    HttpToolsProtocol.connection_made = watched_connection_made
    HttpToolsProtocol.connection_lost = watched_connection_lost
    HttpToolsProtocol.pause_writing = watched_pause_writing
    HttpToolsProtocol.resume_writing = watched_resume_writing
    HttpToolsProtocol.on_response_complete = watched_response_complete
    HttpToolsProtocol._start_asgi_task = start_once_read
    RequestResponseCycle.send = send_unless_dropped
