"""Answers the client does not read: on the guarded server (4 requests at once, a 2-s body
deadline, which the send deadline follows), clients that pipeline requests with large answers
and never read are dropped, and their slots serve good requests."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx

from clip_runner.web.send_deadline import SendWatch
from tests.helpers import GUARD_AUTH, GUARD_KEY

TEXTS = [f"an answer that is never read, number {i}" for i in range(1000)]


def non_reading_request(texts: list[str]) -> bytes:
    body = json.dumps({"texts": texts}).encode()
    return (
        b"POST /embed_texts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
        % (GUARD_KEY.encode(), len(body), body)
    )


def non_reading_client(port: int, pipelined: int) -> socket.socket:
    """A connection with a tiny receive window that sends `pipelined` requests for large answers
    (1,000 text embeddings each) at once and reads nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(non_reading_request(TEXTS) * pipelined)
    return sock


def held_by_the_server(guarded, clients: list[socket.socket]) -> int:
    """How many of these clients' connections the API worker still holds open."""
    ports = {client.getsockname()[1] for client in clients}
    (worker,) = guarded.api_processes()
    return sum(1 for c in worker.net_connections(kind="tcp") if c.raddr and c.raddr.port in ports)


def test_clients_that_never_read_their_answers_are_dropped(guarded):
    """Each client's answers wait in the API worker, and the requests behind them, for as long
    as it stays connected; dropped, they are gone, and nothing is logged as an error (uvicorn's
    requests waiting behind the unread answer wrote on the closed connection: a traceback each)."""
    port = urlsplit(guarded.url).port
    answer = httpx.post(f"{guarded.url}/embed_texts", json={"texts": TEXTS}, headers=GUARD_AUTH)
    assert answer.status_code == 200
    log_before = len(guarded.log())
    # Each answer about 325 KB: 16 of them are more than the kernel's buffers take (about 3 MB).
    clients = [non_reading_client(port, pipelined=16) for _ in range(4)]
    try:
        started = time.monotonic()
        held = 0  # once the API worker has taken them all
        while time.monotonic() - started < 5 and held < len(clients):
            held = held_by_the_server(guarded, clients)
        assert held == len(clients)
        while time.monotonic() - started < 20 and held_by_the_server(guarded, clients):
            time.sleep(0.5)
        dropped_after_s = time.monotonic() - started
        assert not held_by_the_server(guarded, clients), "clients that read nothing were kept"
        assert dropped_after_s < 10  # the guarded server's deadline: 2 s without progress
        good = httpx.post(
            f"{guarded.url}/embed_texts", json={"texts": ["a cat"]}, headers=GUARD_AUTH
        )
        assert good.status_code == 200
        written = guarded.log()[log_before:]
        assert "Traceback" not in written and "ERROR" not in written, written[-2000:]
    finally:
        for client in clients:
            client.close()


def test_a_client_reading_slowly_keeps_its_connection(guarded):
    """Only a whole period without progress drops a connection: a client taking 64 KB every
    half second (128 KB/s) of a 5-MB stream of answers keeps it past three 2-s deadlines. The
    kernel takes more from the transport only once a third of its buffer (megabytes) is free, so
    where progress was the transport's buffer alone such a client was dropped (a review)."""
    port = urlsplit(guarded.url).port
    client = non_reading_client(port, pipelined=16)
    client.settimeout(5)
    received = 0
    started = time.monotonic()
    try:
        while time.monotonic() - started < 6.5:
            taken = 0
            while taken < 64 * 1024:
                chunk = client.recv(64 * 1024 - taken)
                assert chunk, f"dropped after {time.monotonic() - started:.1f} s"
                taken += len(chunk)
            received += taken
            time.sleep(0.5)
        assert held_by_the_server(guarded, [client]) == 1
    finally:
        client.close()
    assert 600_000 < received < 5_000_000  # slow, and still in the middle of the answers


def test_a_request_behind_unread_answers_waits_for_them_without_a_slot(guarded):
    """Requests sent one after another (not pipelined) on connections whose earlier answers are
    unread: each had started, taken an admission slot and held it, answered, until the deadline
    dropped its connection; four such connections (the guarded server's slot limit) turned
    good requests away with 429s meanwhile."""
    port = urlsplit(guarded.url).port
    httpx.post(f"{guarded.url}/embed_texts", json={"texts": TEXTS}, headers=GUARD_AUTH)
    clients = [non_reading_client(port, pipelined=0) for _ in range(4)]
    filler = non_reading_request(TEXTS)
    last = non_reading_request(["one more"])

    def fill(client: socket.socket) -> None:
        for _ in range(12):  # each answered before the next is sent, until the buffers fill
            client.sendall(filler)
            time.sleep(0.03)
        client.sendall(last)

    try:
        senders = [threading.Thread(target=fill, args=(client,)) for client in clients]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        statuses = []
        until = time.monotonic() + 1.0  # within the 2-s deadline, while the answers wait
        while time.monotonic() < until:
            good = httpx.post(
                f"{guarded.url}/embed_texts", json={"texts": ["a cat"]}, headers=GUARD_AUTH
            )
            statuses.append(good.status_code)
        assert set(statuses) == {200}, statuses
    finally:
        for client in clients:
            client.close()


class WaitingTransport:
    """A transport whose buffer holds `buffered(seconds since the watch began)` bytes."""

    def __init__(self, buffered: Callable[[float], int]) -> None:
        self.buffered = buffered
        self.started = time.monotonic()
        self.aborted = False

    def get_write_buffer_size(self) -> int:
        return self.buffered(time.monotonic() - self.started)

    def get_extra_info(self, name: str) -> None:
        return None  # no kernel queue to read: the buffer alone tells

    def abort(self) -> None:
        self.aborted = True


def dropped_within(buffered: Callable[[float], int], wait_s: float) -> bool:
    """Whether a watch with a 0.1-s deadline over this buffer drops it within `wait_s`."""

    async def run() -> bool:
        protocol = type("Protocol", (), {})()
        protocol.loop, protocol.transport = asyncio.get_running_loop(), WaitingTransport(buffered)
        SendWatch(protocol, 0.1).watch()
        await asyncio.sleep(wait_s)
        return protocol.transport.aborted

    return asyncio.run(run())


def test_the_watch_drops_a_stalled_buffer_of_any_size_and_follows_progress():
    """A few KB left under the high-water mark never paused the writes, so no deadline started,
    and a close waits for them: a client reading nothing held the connection for good (a
    review). The watch starts where a response ends with bytes left, and drops what stands."""
    assert dropped_within(lambda _: 30_000, wait_s=0.35)
    assert not dropped_within(lambda s: int(30_000 - 50_000 * s), wait_s=0.45)  # read on
    assert not dropped_within(lambda s: 30_000 if s < 0.05 else 0, wait_s=0.35)  # all sent
