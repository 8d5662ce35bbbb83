"""When the server stops, the runner stops after the API workers.

`bentoml serve`'s supervisor (circus) sends SIGTERM to every worker at once, the runner's
included, on `docker stop`, a SageMaker scale-in or the end of a blue/green update. The runner
had nothing in flight and exited at once, its socket with it, while an API worker was still
answering a request (an image URL being fetched, images being decoded): its next runner call
found no runner, and the caller got a 503 `runner_unavailable` from a server that then stopped
"cleanly", with status 0. So a runner holds its SIGTERM while an API worker of the same
supervisor is alive, at most `HOLD_LIMIT_S` (the supervisor kills what is left after 30 s), and
serves their last calls meanwhile; a second SIGTERM is obeyed at once.

And a runner that cannot serve its model at all (the checkpoint's weights do not load: every
restart would fail alike) stops the whole server, rather than be restarted by the supervisor
forever while `/ping` said 503 "the model is still loading".
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

logger = logging.getLogger("clip_runner")

HOLD_LIMIT_S = 25.0
POLL_S = 0.1


def service_of(process: psutil.Process) -> str | None:
    """The service a BentoML worker serves (its `--service-name`), None for another process."""
    try:
        arguments = process.cmdline()
    except psutil.Error:  # ended meanwhile, or not ours to read
        return None
    for flag, value in zip(arguments, arguments[1:], strict=False):
        if flag == "--service-name":
            return value
    return None


def other_services_alive(own_service: str) -> bool:
    """Whether a worker of another service than `own_service` (an API worker, for the runner)
    started by this process's supervisor is alive."""
    try:
        siblings = psutil.Process(os.getppid()).children()
    except psutil.Error:
        return False
    return any(service_of(sibling) not in (None, own_service) for sibling in siblings)


def hold_sigterm_while(alive: Callable[[], bool], limit_s: float = HOLD_LIMIT_S) -> None:
    """Make this process's SIGTERM wait while `alive()` (at most `limit_s`), then act as it
    would have: the handler in place (uvicorn's, which ends the server after its requests) is
    called from a waiting thread. For the main thread, once that handler is set (a signal's
    handler is the main thread's to set)."""
    obey = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or not callable(obey):
        return
    held = threading.Event()

    def wait_then_obey(signum: int) -> None:
        deadline = time.monotonic() + limit_s
        while alive() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        obey(signum, None)

    def hold(signum: int, frame: object) -> None:
        if held.is_set():  # asked twice: now
            obey(signum, frame)
            return
        held.set()
        logger.info("runner: stopping once the API workers have answered (at most %g s)", limit_s)
        threading.Thread(
            target=wait_then_obey, args=(signum,), name="clip-stop-after-api", daemon=True
        ).start()

    signal.signal(signal.SIGTERM, hold)


def order_the_supervisors_stop() -> None:
    """Have this process's BentoML supervisor, when it stops, close its copy of the API's port
    first and remove the runners' unix socket folder last, at its exit.

    The folder: BentoML's supervisor removed it first, then stopped the workers, so the runner,
    holding its SIGTERM (`hold_sigterm_while`), could no longer be reached by a new connection,
    only by one opened before. An API worker opens one for a call after an idle while (an image
    fetched for 7 s) and every 8th call with several runners (a GPU's default), so a request in
    flight at `docker stop` got a 503 `runner_unavailable` (1 or 2 of 6, 2 runners). The
    supervisor still removes the folder (and ends BentoML's usage tracking, the other thing it
    held for the stop) at its exit; a supervisor killed did neither before.

    The port: the API workers stop listening at once, but the kernel let new connections in for
    as long as any process held the listening socket, the supervisor among them (the runner
    closes its inherited copy at start: `close_inherited_listeners`), and reset them unanswered
    at its exit, up to `HOLD_LIMIT_S` later. Closed, they are refused at once, and a client or
    load balancer can go elsewhere."""
    from bentoml._internal.utils import circus as bentoml_circus

    def stop(arbiter: bentoml_circus.Arbiter) -> object:
        for listener in arbiter.sockets.values():
            if listener.family in (socket.AF_INET, socket.AF_INET6):
                listener.close()
        atexit.register(arbiter.exit_stack.close)
        return bentoml_circus._Arbiter.stop(arbiter)  # circus's own: the workers, then the loop

    bentoml_circus.Arbiter.stop = stop  # type: ignore[method-assign]


def own_listener_fd(arguments: list[str]) -> int | None:
    """The socket a BentoML worker was started to serve (its `--fd`), None outside one."""
    for flag, value in zip(arguments, arguments[1:], strict=False):
        if flag == "--fd" and value.isdigit():
            return int(value)
    return None


def close_inherited_listeners(arguments: list[str]) -> int:
    """Close the TCP listening sockets this process inherited but was not started to serve
    (its `--fd`, in `arguments`), and return how many: a BentoML worker inherits every socket
    of its supervisor, and the runner held the API's port open through a stop
    (`order_the_supervisors_stop`). Its own may be TCP too (BentoML's where unix sockets are
    not used: `BENTOML_NO_UDS`, Windows' WSL, Docker Desktop)."""
    own = own_listener_fd(arguments)
    closed = 0
    for connection in psutil.Process().net_connections(kind="inet"):
        if connection.status == psutil.CONN_LISTEN and connection.fd not in (-1, own):
            with contextlib.suppress(OSError):
                os.close(connection.fd)
                closed += 1
    return closed


# The exit status of a server a worker stopped (EX_CONFIG of sysexits.h: its model or settings
# cannot serve). Stopped by SIGTERM, as by `docker stop`, it had exited 0: `make serve && ...`,
# a container's restart policy or a CI job saw a success.
STOPPED_STATUS = 78


def stop_marker(supervisor_pid: int) -> Path:
    """Where a worker leaves word for its supervisor that it stopped the server."""
    return Path(tempfile.gettempdir()) / f"clip-server-stopped-{supervisor_pid}"


def stop_the_server(reason: str) -> None:
    """Log `reason` and ask the supervisor (this process's parent) to stop every worker, as
    `docker stop` does: for a failure every restart of this worker would repeat. It then exits
    with STOPPED_STATUS (`exit_failed_if_stopped`)."""
    logger.error("%s; stopping the server: every restart would fail the same way", reason)
    with contextlib.suppress(OSError):
        stop_marker(os.getppid()).write_text(reason)
        os.kill(os.getppid(), signal.SIGTERM)


def exit_failed_if_stopped() -> None:
    """Have this process (the supervisor, where it runs service.py) exit with STOPPED_STATUS
    at its end where a worker stopped the server (`stop_the_server`); in a worker it never
    finds word of its own."""
    marker = stop_marker(os.getpid())
    marker.unlink(missing_ok=True)  # an earlier process's of this pid, killed before its end

    def exit_failed() -> None:
        if marker.exists():
            marker.unlink(missing_ok=True)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(STOPPED_STATUS)

    atexit.register(exit_failed)  # registered early, so it runs after the others at exit
