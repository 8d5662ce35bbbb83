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
while the transport's buffer is past its high-water mark, the client must take some of it
within `timeout_s`, else the connection is dropped (reset: there is no way left to tell it
anything), which frees the buffer, and any request waiting to answer on it ends as one whose
client left. A client reading slowly keeps its connection: only a whole period without
progress drops it. And a request on a connection whose answers wait for the client starts only
once the client has read them: no admission slot is held by a request that cannot be answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class SendWatch:
    """One connection's watch over the answer bytes waiting for its client to read them."""

    def __init__(self, protocol: Any, timeout_s: float) -> None:
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.waiting_bytes = 0  # in the transport's buffer when last checked
        self.deadline: asyncio.TimerHandle | None = None
        self.next_request: Callable[[], None] | None = None  # held until the client reads

    def paused(self) -> None:
        """The transport's buffer passed its high-water mark: the client must read on."""
        self.cancel()
        self.waiting_bytes = self.protocol.transport.get_write_buffer_size()
        self.deadline = self.protocol.loop.call_later(self.timeout_s, self._expired)

    def cancel(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expired(self) -> None:
        self.deadline = None
        transport = self.protocol.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() < self.waiting_bytes:  # read some: a new period
            self.paused()
            return
        transport.abort()


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
        self.send_watch.paused()

    def watched_resume_writing(self: Any) -> None:
        self.send_watch.cancel()
        resume_writing(self)
        if (next_request := self.send_watch.next_request) is not None:
            self.send_watch.next_request = None
            next_request()

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
    HttpToolsProtocol._start_asgi_task = start_once_read
    RequestResponseCycle.send = send_unless_dropped
