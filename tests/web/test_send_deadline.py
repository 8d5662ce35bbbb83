"""Answers the client does not read: on the guarded server (4 requests at once, a 2-s body
deadline, which the send deadline follows), clients that pipeline requests with large answers
and never read are dropped, and their slots serve good requests."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx

from tests.helpers import GUARD_AUTH, GUARD_KEY

TEXTS = [f"an answer that is never read, number {i}" for i in range(1000)]


def non_reading_client(port: int, pipelined: int) -> socket.socket:
    """A connection with a tiny receive window that sends `pipelined` requests for large answers
    (1,000 text embeddings each) at once and reads nothing."""
    body = json.dumps({"texts": TEXTS}).encode()
    request = (
        b"POST /embed_texts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
        % (GUARD_KEY.encode(), len(body), body)
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request * pipelined)
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


def test_a_client_reading_slowly_gets_every_answer(guarded):
    """Only a whole period without progress drops a connection: reading a 5-MB stream of
    answers in 256-KB steps 0.3 s apart, well past the 2-s deadline in all, gets all of it."""
    port = urlsplit(guarded.url).port
    client = non_reading_client(port, pipelined=16)
    client.settimeout(10)
    received = b""
    started = time.monotonic()
    try:
        while received.count(b"HTTP/1.1 200 OK") < 16 or not received.endswith(b"]]}"):
            step = b""
            while len(step) < 256 * 1024:
                chunk = client.recv(65536)
                assert chunk, f"dropped after {time.monotonic() - started:.1f} s"
                step += chunk
                if received.count(b"HTTP/1.1 200 OK") + step.count(b"HTTP/1.1 200 OK") >= 16 and (
                    step.endswith(b"]]}")
                ):
                    break
            received += step
            time.sleep(0.3)
    finally:
        client.close()
    assert time.monotonic() - started > 3  # slower than the deadline, in all
    assert received.count(b"HTTP/1.1 200 OK") == 16
